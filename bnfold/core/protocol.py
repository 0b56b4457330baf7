"""The two protocols a backend implements: :class:`Rule` (one per fold pattern) and :class:`GraphView`.

A rule answers three questions with the same types in every backend:

1. ``find(view, node)``: is there a site for me at this node? A typed :mod:`~bnfold.core.sites`
   value, or None (cheap, structural: op types and wiring only, no refusals).
2. ``plan(view, site)``: everything the fold will write — every new value computed in float64 and
   rounded once into its dtype — or :class:`~bnfold.core.refuse.Refuse` raised from anywhere below.
3. ``apply(view, plan)``: write the plan; it cannot fail half-way (all checks happened in ``plan``).
   Returns :class:`Applied`: the node the subject went into.

The view is the backend's graph: :mod:`bnfold.core.driver` uses only the methods below; rules use
the backend's richer view (producers, consumers, constants, scoped shapes, write-back helpers), which
is the same object. ONNX: :class:`bnfold.onnx.view.OnnxView`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from bnfold.core.sites import Site

__all__ = ["Applied", "NodeIdentity", "Rule", "GraphView"]


@dataclass(frozen=True)
class Applied:
    """What a plan was applied to: the node (layer) that absorbed the subject."""

    into: Any


@dataclass(frozen=True)
class NodeIdentity:
    """How the report names a node, taken before ``apply`` renames outputs."""

    node: str
    op_type: str
    output: str


@runtime_checkable
class Rule(Protocol):
    """One fold pattern. ``name`` is a row of :data:`bnfold.core.table.RULE_TABLE`; ``site`` is the
    :class:`~bnfold.core.sites.Site` subclass ``find`` returns (the driver tries standalone sites
    only after the fixed point)."""

    name: str
    site: type[Site]

    def find(self, view: Any, node: Any) -> Site | None: ...

    def plan(self, view: Any, site: Any) -> Any: ...

    def apply(self, view: Any, plan: Any) -> Applied: ...


class GraphView(Protocol):
    """What the driver needs of one graph (or subgraph) of a backend.

    ``path`` goes into each decision's ``graph`` field ("main", or where a subgraph sits).
    """

    path: str

    def live_nodes(self) -> Sequence[Any]:
        """The live nodes in topological order (a fresh list: folds may remove nodes while it is read)."""

    def is_removed(self, node: Any) -> bool:
        """Whether a fold removed ``node`` (or merged it away)."""

    def is_norm(self, node: Any) -> bool:
        """Whether ``node`` is a normalization the report decides on (BatchNorm)."""

    def is_per_sample_norm(self, node: Any) -> bool:
        """Whether ``node`` normalizes per sample (LayerNorm, GroupNorm, InstanceNorm): never foldable."""

    def check_norm(self, norm: Any) -> None:
        """Raise :class:`~bnfold.core.refuse.Refuse` when no rule may fold ``norm`` whatever its
        neighbours (training mode, statistics not constant or not finite, ...)."""

    def identity(self, node: Any) -> NodeIdentity:
        """The node's name, op type and first output, as the report shows them."""

    def label(self, node: Any) -> str:
        """A short name for messages."""

    def no_site_detail(self, norm: Any) -> str:
        """Why no rule found a site at ``norm`` (what its input comes from, what reads its output)."""

    def subgraphs(self) -> Sequence[GraphView]:
        """Views of the subgraphs of the live nodes (If branches, Loop/Scan bodies, functions), folded
        after this graph."""
