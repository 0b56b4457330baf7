"""The backend-free fold engine: one rule protocol, one driver, one rule table, one refusal type.

- :mod:`bnfold.core.refuse` — :class:`Refuse`, raised anywhere under a rule's ``plan``;
- :mod:`bnfold.core.sites` — typed sites a rule finds (layer-then-norm, norm-then-layer, ...);
- :mod:`bnfold.core.protocol` — :class:`Rule` and :class:`GraphView`, what a backend implements;
- :mod:`bnfold.core.driver` — :func:`run_rules`, the fixed point, refusal aggregation, the report;
- :mod:`bnfold.core.table` — :data:`RULE_TABLE`, the torch-free list of rule names and patterns;
- :mod:`bnfold.core.exact` — :class:`ExactValues`, float64 values of folded weights for chains.

The fold math itself is in :mod:`bnfold.affine` (and :mod:`bnfold.folds`), shared by both backends.
"""

from __future__ import annotations

from bnfold.core.driver import run_rules
from bnfold.core.exact import EXACT_VALUES_BUDGET, ExactValues
from bnfold.core.protocol import Applied, GraphView, NodeIdentity, Rule
from bnfold.core.refuse import Refuse
from bnfold.core.table import RULE_TABLE, RuleInfo, check_skip_rules, rule_info, rule_names

__all__ = [
    "Applied",
    "EXACT_VALUES_BUDGET",
    "ExactValues",
    "GraphView",
    "NodeIdentity",
    "RULE_TABLE",
    "Refuse",
    "Rule",
    "RuleInfo",
    "check_skip_rules",
    "rule_info",
    "rule_names",
    "run_rules",
]
