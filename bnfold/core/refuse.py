"""The one way a rule says "no": raise :class:`Refuse` anywhere under ``plan()``.

The driver (:mod:`bnfold.core.driver`) catches it and turns it into the report's
:class:`~bnfold.report.Decision` (kept, with the reason code and the detail), so helpers deep inside
a plan can refuse without every caller checking a returned value — the way the onnxscript rewriter's
match-failure exception works. Both backends raise this one type.
"""

from __future__ import annotations

from bnfold.report import Reason

__all__ = ["Refuse"]


class Refuse(Exception):
    """A refusal with a stable :class:`~bnfold.report.Reason` code and the specifics a person needs."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason
        self.detail = detail

    def with_detail(self, detail: str) -> Refuse:
        """The same reason with another detail (e.g. prefixed with where the refusal happened)."""
        return Refuse(self.reason, detail)
