"""The float64 values of folded weights, kept so that a chain of folds on one weight rounds once.

A weight a fold wrote may be folded again (``Conv -> BN -> BN``, conv-bn then a branch merge, a
per-channel Mul after a folded BN); starting the next fold from its float64 value keeps the whole
chain rounded once. The cache belongs to one fold (the backend's fold context creates it), never to
the process, and is keyed by (scope, name): sibling subgraphs may each hold a weight of one name.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from bnfold.affine import Rounded

__all__ = ["EXACT_VALUES_BUDGET", "ExactValues"]

EXACT_VALUES_BUDGET = 256 * 2**20
"""How many bytes of float64 values of folded weights one fold keeps for folds that may follow.

Only weights whose layer feeds another foldable node keep it, and the oldest go first beyond this
budget (a later fold then starts from the rounded weight: one more rounding, never a wrong value).
Such chains are local in the graph, so the budget is rarely reached.
"""


class ExactValues:
    """Folded weights that carry their float64 value (:class:`~bnfold.affine.Rounded`), oldest first."""

    def __init__(self, budget: int = EXACT_VALUES_BUDGET) -> None:
        self.budget = budget
        self.values: OrderedDict[Hashable, Rounded] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.values)

    def get(self, key: Hashable) -> Rounded | None:
        return self.values.get(key)

    def remember(self, key: Hashable, value: object) -> None:
        """Keep ``value``'s float64 value under ``key`` if it carries one, else forget the key."""
        self.forget(key)
        if not isinstance(value, Rounded) or value.exact is None:
            return
        value.flags.writeable = False
        self.values[key] = value
        self.bytes += value.exact.nbytes
        while self.bytes > self.budget and self.values:
            _, oldest = self.values.popitem(last=False)
            self.bytes -= oldest.exact.nbytes

    def forget(self, key: Hashable) -> None:
        previous = self.values.pop(key, None)
        if previous is not None:
            self.bytes -= previous.exact.nbytes
