"""Typed sites: *where* a rule can apply at a node, found by ``Rule.find`` and handed to ``plan``.

A site names the graph nodes a fold involves, in the backend's own node type (``onnx.NodeProto``,
``torch.fx.Node``). Its class tells the driver (:mod:`bnfold.core.driver`) how to report the
outcome, so no rule has to say which "side" it is on:

- ``subject`` is the node the report's decision is about (a normalization, a Mul/Add, an Add);
- ``outcome`` is what the subject becomes when the plan is applied (folded, merged, rewritten);
- ``reports_refusal``: whether a refusal is reported as the subject being kept (a BN is always
  reported; a Mul/Add or an Add of branches only when folded or merged: most are no candidates);
- ``carried_norms``: normalizations folded along with the subject (an identity-branch BN of an Add),
  reported folded with it, or kept with the refusal;
- ``absorbed``: other nodes the fold removes that the report shows with the subject's outcome (the
  ``Add`` of a constant between a branch and the sum);
- ``after_fixed_point``: the driver tries the site only once every other fold is done (standalone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from bnfold.report import Outcome

__all__ = [
    "Site",
    "LayerThenNorm",
    "NormThenLayer",
    "ThroughReshape",
    "ThroughPool",
    "AffineChain",
    "Branch",
    "ParallelBranches",
    "Standalone",
]


@dataclass(frozen=True, eq=False)
class Site:
    """Base of the sites; subclasses add the nodes of their pattern."""

    outcome: ClassVar[Outcome] = Outcome.FOLDED
    reports_refusal: ClassVar[bool] = True
    after_fixed_point: ClassVar[bool] = False

    @property
    def subject(self) -> Any:
        raise NotImplementedError

    @property
    def carried_norms(self) -> tuple[Any, ...]:
        return ()

    @property
    def absorbed(self) -> tuple[Any, ...]:
        return ()

    def carried_refusal_detail(self, subject_label: str, detail: str) -> str:
        """The detail a carried normalization is kept with when the site's plan refuses."""
        return detail


@dataclass(frozen=True, eq=False)
class LayerThenNorm(Site):
    """``layer -> norm``: the norm folds into the layer's output channels."""

    norm: Any
    layer: Any

    @property
    def subject(self) -> Any:
        return self.norm


@dataclass(frozen=True, eq=False)
class NormThenLayer(Site):
    """``norm -> layer``: the norm folds into the layer's input channels."""

    norm: Any
    layer: Any

    @property
    def subject(self) -> Any:
        return self.norm


@dataclass(frozen=True, eq=False)
class ThroughReshape(Site):
    """``layer -> reshape -> norm``: folds into the layer where the reshape keeps channels one-to-one."""

    norm: Any
    reshape: Any
    layer: Any

    @property
    def subject(self) -> Any:
        return self.norm


@dataclass(frozen=True, eq=False)
class ThroughPool(Site):
    """``layer -> pool -> norm``: folds into the layer where the pool commutes with the norm's map."""

    norm: Any
    pool: Any
    layer: Any

    @property
    def subject(self) -> Any:
        return self.norm


@dataclass(frozen=True, eq=False)
class AffineChain(Site):
    """``layer -> Mul/Add(constant)``: a per-channel affine node other exporters write instead of a BN.

    Reported only when folded (``reports_refusal`` is False): most Mul/Add nodes are no candidates.
    """

    reports_refusal: ClassVar[bool] = False

    node: Any
    layer: Any
    data_slot: int
    constant_slot: int

    @property
    def subject(self) -> Any:
        return self.node


@dataclass(frozen=True, eq=False)
class Branch:
    """One summand of a parallel-branch Add: a layer of ``source``, a norm of it, or ``source`` itself
    (``node`` None), possibly plus constants (``offsets``: the ``Add`` nodes of a constant between the
    branch and the sum, nearest the branch first, e.g. MobileOne's ``0 + BN(conv(x))``)."""

    tensor: Any
    node: Any
    is_layer: bool
    offsets: tuple[Any, ...] = ()


@dataclass(frozen=True, eq=False)
class ParallelBranches(Site):
    """``Add(layer(x), layer(x) | norm(x) | x)``: branches of one input merged into one layer."""

    outcome: ClassVar[Outcome] = Outcome.MERGED
    reports_refusal: ClassVar[bool] = False

    add: Any
    source: Any
    branches: tuple[Branch, ...]
    identity_norm: Any = None

    @property
    def subject(self) -> Any:
        return self.add

    @property
    def carried_norms(self) -> tuple[Any, ...]:
        return () if self.identity_norm is None else (self.identity_norm,)

    @property
    def absorbed(self) -> tuple[Any, ...]:
        return tuple(offset for branch in self.branches for offset in branch.offsets)

    def carried_refusal_detail(self, subject_label: str, detail: str) -> str:
        return f"identity branch of Add {subject_label}: {detail}"


@dataclass(frozen=True, eq=False)
class Standalone(Site):
    """A norm nothing absorbed, rewritten on its own (``--rewrite-standalone-bn``)."""

    outcome: ClassVar[Outcome] = Outcome.REWRITTEN
    after_fixed_point: ClassVar[bool] = True

    norm: Any

    @property
    def subject(self) -> Any:
        return self.norm
