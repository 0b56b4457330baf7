"""What happened to every normalization node: one :class:`Decision` each, gathered in a :class:`Report`.

Pipelines match on stable codes (:class:`Reason`, rule names); people read the messages. The report
knows nothing of how decisions were made: the ONNX and PyTorch backends both fill it in.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

__all__ = ["Reason", "Outcome", "Decision", "Report", "Summary"]


class Reason(StrEnum):
    """Why a normalization node was kept. The value is the stable code; :attr:`explanation` is prose."""

    NO_FOLDABLE_PRODUCER = "no-foldable-producer"
    PRODUCER_HAS_OTHER_CONSUMERS = "producer-has-other-consumers"
    PRODUCER_OUTPUT_IS_GRAPH_OUTPUT = "producer-output-is-graph-output"
    PARAM_NOT_CONSTANT = "param-not-constant"
    PARAM_IS_GRAPH_INPUT = "param-is-graph-input"
    PARAM_SHAPE_MISMATCH = "param-shape-mismatch"
    TRAINING_MODE = "training-mode"
    PER_ACTIVATION_STATISTICS = "per-activation-statistics"
    EXTRA_OUTPUTS_USED = "extra-outputs-used"
    NONPOSITIVE_VARIANCE = "nonpositive-variance"
    NONFINITE_STATISTICS = "nonfinite-statistics"
    WEIGHT_NOT_CONSTANT = "weight-not-constant"
    UNSUPPORTED_DTYPE = "unsupported-dtype"
    CHANNEL_AXIS_MISMATCH = "channel-axis-mismatch"
    FOLD_OVERFLOWS_DTYPE = "fold-overflows-dtype"
    RULE_DISABLED = "rule-disabled"
    PER_SAMPLE_STATISTICS = "per-sample-statistics"
    # Folding into the layer after the BN (input channels).
    BN_OUTPUT_HAS_OTHER_CONSUMERS = "bn-output-has-other-consumers"
    PADDING_AFTER_BN = "padding-after-bn"
    UNEVEN_TAPS_AFTER_BN = "uneven-taps-after-bn"
    # An identity-branch BN that the Add of parallel branches cannot merge into their conv.
    BRANCHES_INCOMPATIBLE = "branches-incompatible"
    # Folding through a Reshape/Flatten between the layer and the BN (bnfold.onnx.rules_reshape).
    RESHAPE_SHAPE_NOT_CONSTANT = "reshape-shape-not-constant"
    RESHAPE_NOT_CHANNEL_PRESERVING = "reshape-not-channel-preserving"
    # Folding through a pooling between the layer and the BN (bnfold.onnx.rules_pool).
    POOL_DOES_NOT_COMMUTE = "pool-does-not-commute"
    # PyTorch path (bnfold.fx): facts about modules and traces that ONNX graphs do not have.
    SHARED_MODULE = "shared-module"
    NO_RUNNING_STATISTICS = "no-running-statistics"
    UNKNOWN_SHAPE = "unknown-shape"
    HOOKS_REGISTERED = "hooks-registered"
    CUSTOM_FORWARD = "custom-forward"
    SHAPE_DEPENDENT = "shape-dependent"
    MUTATED_IN_PLACE = "mutated-in-place"

    @property
    def explanation(self) -> str:
        return _EXPLANATIONS[self]


_EXPLANATIONS: dict[Reason, str] = {
    Reason.NO_FOLDABLE_PRODUCER: "its input does not come from a layer a rule can fold into, nor does "
    "its output feed one (e.g. between a Relu and a Conv: no exact fold exists; --rewrite-standalone-bn "
    "turns it into Mul + Add)",
    Reason.PRODUCER_HAS_OTHER_CONSUMERS: "the producer's output is also used elsewhere, which would "
    "then see normalized values",
    Reason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT: "the producer's output is a graph output, which would "
    "then be normalized",
    Reason.PARAM_NOT_CONSTANT: "a BatchNormalization parameter is computed at run time",
    Reason.PARAM_IS_GRAPH_INPUT: "a parameter is a graph input (an initializer listed as an input "
    "can be overridden at run time)",
    Reason.PARAM_SHAPE_MISMATCH: "parameter shapes do not match the layer's channel count",
    Reason.TRAINING_MODE: "training mode normalizes with batch statistics, not running ones",
    Reason.PER_ACTIVATION_STATISTICS: "spatial=0 keeps statistics per activation, not per channel",
    Reason.EXTRA_OUTPUTS_USED: "its running mean/variance outputs are used",
    Reason.NONPOSITIVE_VARIANCE: "var + epsilon is not positive in some channel",
    Reason.NONFINITE_STATISTICS: "a statistic or affine parameter is NaN or infinite",
    Reason.WEIGHT_NOT_CONSTANT: "the layer's weight or bias is computed at run time",
    Reason.UNSUPPORTED_DTYPE: "the layer's weight is not float16, bfloat16, float32 or float64",
    Reason.CHANNEL_AXIS_MISMATCH: "the normalized axis is not the layer's output-channel axis",
    Reason.FOLD_OVERFLOWS_DTYPE: "the folded weights do not fit the weight's dtype (inf or NaN)",
    Reason.RULE_DISABLED: "the rule that would fold it was disabled",
    Reason.PER_SAMPLE_STATISTICS: "it normalizes with statistics of each sample, computed at run "
    "time; never foldable",
    Reason.BN_OUTPUT_HAS_OTHER_CONSUMERS: "the BN's output is also used elsewhere (or is a graph output), "
    "which would still need the normalized values",
    Reason.PADDING_AFTER_BN: "the layer after the BN pads its input with zeros, where the folded "
    "layer would need the BN's shift",
    Reason.UNEVEN_TAPS_AFTER_BN: "the transposed conv after the BN adds up a different number of input "
    "values at different output positions, so the BN's shift is not one bias per channel",
    Reason.BRANCHES_INCOMPATIBLE: "the branches the Add sums cannot be one conv (strides, dilations, groups, "
    "channels or pads differ)",
    Reason.RESHAPE_SHAPE_NOT_CONSTANT: "the target shape of the Reshape between the layer and the BN is "
    "computed at run time, so which layer channel each BN channel sees cannot be checked",
    Reason.RESHAPE_NOT_CHANNEL_PRESERVING: "the Reshape/Flatten between the layer and the BN does not map "
    "the BN's channel axis one-to-one onto the layer's output channels (or the shapes that would show it "
    "are unknown)",
    Reason.POOL_DOES_NOT_COMMUTE: "the pooling between the layer and the BN gives a different result "
    "on the normalized values (a max with a negative scale in some channel, an average that counts its "
    "zero padding)",
    Reason.SHARED_MODULE: "the BN (or one of its parameters), or a conv branch-merge would replace, is "
    "used at more than one call site, which would all see the folded values",
    Reason.NO_RUNNING_STATISTICS: "track_running_stats=False: it normalizes with batch statistics even "
    "in eval mode",
    Reason.UNKNOWN_SHAPE: "the layer's output rank is unknown, so the normalized axis cannot be checked "
    "against its channel axis; pass example_inputs",
    Reason.HOOKS_REGISTERED: "a forward hook or pre-hook on the layer or the BN would see different "
    "values after folding",
    Reason.CUSTOM_FORWARD: "the module's class overrides forward(), so what it computes is not a plain "
    "BatchNorm",
    Reason.SHAPE_DEPENDENT: "the fold would be exact only for some input shapes (e.g. a reshape that keeps "
    "the channels on the BN's axis only when a dynamic size is 1, or a rank the graph does not fix)",
    Reason.MUTATED_IN_PLACE: "an in-place operation writes into a tensor the fold would read at another "
    "point (or into one sharing its storage), so the folded layer would see different values",
}


class Outcome(StrEnum):
    FOLDED = "folded"
    KEPT = "kept"
    NEVER_FOLDABLE = "never-foldable"
    # A BN nothing could absorb, replaced by Mul + Add on request (``rewrite_standalone``).
    REWRITTEN = "rewritten"
    # An Add of parallel branches (RepVGG, ACNet) merged into one conv (rule branch-merge).
    MERGED = "merged"
    # A BN bnfold kept that ``--simplify`` (onnxsim) then removed: the written file has no such node.
    SIMPLIFIED = "simplified"


# Elementwise affine nodes (Conv -> Mul -> Add chains) appear in the report only when folded.
ELEMENTWISE_AFFINE_OPS = ("Mul", "Add")


@dataclass(frozen=True)
class Decision:
    """What happened to one normalization node.

    ``node`` is the node's name (may be empty in ONNX); ``output`` its first output tensor, which
    identifies it even when unnamed. ``graph`` is ``"main"`` or the path of a subgraph
    (``"loop_node/body"``). ``into`` names the node it was folded into; ``detail`` adds the specifics
    of a refusal (which tensor, which consumer).
    """

    node: str
    op_type: str
    output: str
    outcome: Outcome
    rule: str | None = None
    into: str | None = None
    reason: Reason | None = None
    detail: str = ""
    graph: str = "main"

    @property
    def label(self) -> str:
        return self.node or f"<{self.op_type} -> {self.output}>"

    @property
    def message(self) -> str:
        """One line a person reads: the rule and target, or the reason and its specifics."""
        if self.outcome is Outcome.FOLDED:
            return f"folded into {self.into} by {self.rule}"
        if self.outcome is Outcome.MERGED:
            return f"branches merged into {self.into} by {self.rule}"
        if self.outcome is Outcome.SIMPLIFIED:
            text = f"removed by {self.rule} after bnfold kept it"
            return f"{text} ({self.detail})" if self.detail else text
        if self.outcome is Outcome.REWRITTEN:
            text = f"rewritten as Mul {self.into} + Add by {self.rule}"
            return f"{text} ({self.detail})" if self.detail else text
        text = f"{self.reason}: {self.reason.explanation}" if self.reason else "kept"
        return f"{text} ({self.detail})" if self.detail else text

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["outcome"] = str(self.outcome)
        data["reason"] = str(self.reason) if self.reason else None
        data["message"] = self.message
        return data


@dataclass(frozen=True, eq=False)
class Summary:
    """The counts of a report: BatchNormalization nodes by outcome, and the other nodes it lists.

    ``str(summary)`` is the one line the CLI prints; :meth:`to_dict` is the report's JSON
    ``summary``. It also compares equal to its line, for code written when ``Report.summary()``
    returned text.
    """

    batchnorm: int
    folded: int
    kept: int
    rewritten: int = 0
    simplified: int = 0
    affine_folded: int = 0
    merged: int = 0
    never_foldable: int = 0

    def to_dict(self) -> dict[str, int]:
        data = {"batchnorm": self.batchnorm, "folded": self.folded, "kept": self.kept}
        # Present only when non-zero, so reports of plain folds keep their familiar shape.
        for name in ("rewritten", "simplified", "affine_folded", "merged"):
            if getattr(self, name):
                data[name] = getattr(self, name)
        data["never_foldable"] = self.never_foldable
        return data

    def to_text(self) -> str:
        text = f"{self.batchnorm} BatchNormalization: {self.folded} folded, {self.kept} kept"
        if self.rewritten:
            text += f", {self.rewritten} rewritten as Mul+Add"
        if self.simplified:
            text += f", {self.simplified} removed by --simplify (onnxsim)"
        if self.affine_folded:
            text += f"; {self.affine_folded} Mul/Add folded"
        if self.merged:
            text += f"; {self.merged} Add of parallel branches merged"
        if self.never_foldable:
            text += f"; {self.never_foldable} per-sample normalization never foldable"
        return text

    def __str__(self) -> str:
        return self.to_text()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return self.to_text() == other
        if isinstance(other, Summary):
            return self.to_dict() == other.to_dict()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.to_text())


@dataclass
class Report:
    """All decisions for one model, in graph order, plus free-form extras (e.g. verification)."""

    decisions: list[Decision] = field(default_factory=list)
    source: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    def add(self, decision: Decision) -> None:
        self.decisions.append(decision)

    def count(self, outcome: Outcome, op_type: str | None = None) -> int:
        return sum(
            1
            for decision in self.decisions
            if decision.outcome is outcome and (op_type is None or decision.op_type == op_type)
        )

    @property
    def folded(self) -> list[Decision]:
        return [d for d in self.decisions if d.outcome is Outcome.FOLDED]

    @property
    def kept(self) -> list[Decision]:
        return [d for d in self.decisions if d.outcome is Outcome.KEPT]

    @property
    def merged(self) -> list[Decision]:
        """Adds whose parallel branches were merged into one conv (reported besides the BNs)."""
        return [d for d in self.decisions if d.outcome is Outcome.MERGED]

    @property
    def never_foldable(self) -> list[Decision]:
        return [d for d in self.decisions if d.outcome is Outcome.NEVER_FOLDABLE]

    @property
    def rewritten(self) -> list[Decision]:
        return [d for d in self.decisions if d.outcome is Outcome.REWRITTEN]

    @property
    def affine_folded(self) -> list[Decision]:
        """Folded elementwise Mul/Add nodes (affine chains), reported besides the BNs."""
        return [d for d in self.folded if d.op_type in ELEMENTWISE_AFFINE_OPS]

    @property
    def simplified(self) -> list[Decision]:
        """BNs bnfold kept that onnxsim removed afterwards (``--simplify``)."""
        return [d for d in self.decisions if d.outcome is Outcome.SIMPLIFIED]

    def summary(self) -> Summary:
        """The counts by outcome; ``str()`` of it is the line the CLI prints."""
        affine = len(self.affine_folded)
        others = len(self.never_foldable) + affine + len(self.merged)
        return Summary(
            batchnorm=len(self.decisions) - others,
            folded=len(self.folded) - affine,
            kept=len(self.kept),
            rewritten=len(self.rewritten),
            simplified=len(self.simplified),
            affine_folded=affine,
            merged=len(self.merged),
            never_foldable=len(self.never_foldable),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "summary": self.summary().to_dict(),
            "decisions": [decision.to_dict() for decision in self.decisions],
            **self.extras,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_text(self) -> str:
        """A table for the terminal: one row per normalization node, then the summary."""
        rows = [("node", "op", "decision", "rule / reason")]
        for decision in self.decisions:
            name = decision.label if decision.graph == "main" else f"{decision.graph}:{decision.label}"
            rows.append((name, decision.op_type, str(decision.outcome), decision.message))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = []
        for index, row in enumerate(rows):
            cells = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
            lines.append("  ".join([*cells, row[3]]).rstrip())
            if index == 0:
                lines.append("  ".join("-" * width for width in widths) + "  " + "-" * 13)
        lines.append(self.summary().to_text())
        return "\n".join(lines)
