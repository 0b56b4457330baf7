"""The torch rule registry: every rule of :data:`bnfold.core.table.RULE_TABLE` that lists ``torch``, in
the order the core driver (:func:`bnfold.core.driver.run_rules`) tries them.

Each rule implements :class:`bnfold.core.protocol.Rule` (``find`` a typed site, ``plan`` the fold or
raise :class:`~bnfold.core.refuse.Refuse`, ``apply`` the plan) over :class:`~bnfold.fx.view.FxView`,
and lives with its family:

- :mod:`bnfold.fx.rules_output` — ``layer -> BN`` (output channels);
- :mod:`bnfold.fx.rules_reshape` — ``Linear -> flatten/reshape/view -> BN``;
- :mod:`bnfold.fx.rules_pool` — ``layer -> pool -> BN``;
- :mod:`bnfold.fx.rules_input_side` — ``BN -> layer`` (input channels);
- :mod:`bnfold.fx.rules_affine` — ``layer -> mul/add(per-channel constant)``;
- :mod:`bnfold.fx.rules_branches` — ``add`` of parallel conv / BN / identity branches.

Reading (:mod:`bnfold.fx.reading`), checks (:mod:`bnfold.fx.checks`) and writing
(:mod:`bnfold.fx.writing`) are shared by the families; the fold math is :mod:`bnfold.folds`'.
"""

from __future__ import annotations

from bnfold.core.protocol import Rule
from bnfold.core.table import TORCH, rule_names
from bnfold.fx.rules_affine import LayerThenAffine
from bnfold.fx.rules_branches import BranchMerge
from bnfold.fx.rules_input_side import BNThenLayer
from bnfold.fx.rules_output import LayerThenBN
from bnfold.fx.rules_pool import LayerPoolBN
from bnfold.fx.rules_reshape import LinearReshapeBN
from bnfold.report import Reason

__all__ = ["RULES", "Rule", "TORCH_REASONS"]

# A torch BN layer (or torch.export's ATen call made by one), and one whose class overrides forward():
# the latter is found so that the driver's check reports it (custom-forward).
_MODULE_FORMS = ("module", "custom")

RULES: tuple[Rule, ...] = (
    # BN -> the layer before it (output channels)
    LayerThenBN("conv-bn", ("conv",), _MODULE_FORMS),
    LayerThenBN("convtranspose-bn", ("conv_transpose",), _MODULE_FORMS),
    LayerThenBN("linear-bn", ("linear",), _MODULE_FORMS),
    LayerThenBN("functional-bn", ("conv", "conv_transpose", "linear"), ("functional",)),
    # ... through flatten/reshape/view calls between a Linear and the BN (LeViT's Linear_BN)
    LinearReshapeBN(),
    # ... through a pooling that commutes with the BN's map (timm ResNetV2's stem max pool)
    LayerPoolBN("conv-pool-bn", "conv"),
    LayerPoolBN("convtranspose-pool-bn", "conv_transpose"),
    # BN -> the layer after it (input channels), tried when no rule above folds it
    BNThenLayer("bn-conv", "conv"),
    BNThenLayer("bn-convtranspose", "conv_transpose"),
    BNThenLayer("bn-linear", "linear"),
    # per-channel mul/add/sub/div by a constant after a layer (FrozenBatchNorm2d, scale-and-shift code)
    LayerThenAffine("conv-affine", "conv"),
    LayerThenAffine("convtranspose-affine", "conv_transpose"),
    LayerThenAffine("linear-affine", "linear"),
    # add of parallel Conv / BN / identity branches of one input -> one Conv (RepVGG, ACNet)
    BranchMerge(),
)
assert tuple(rule.name for rule in RULES) == rule_names(TORCH), "RULES must follow the rule table"

#: Every reason code the PyTorch path can give (the tests hold one negative case for each).
TORCH_REASONS = frozenset(
    {
        Reason.NO_FOLDABLE_PRODUCER,
        Reason.PRODUCER_HAS_OTHER_CONSUMERS,
        Reason.PRODUCER_OUTPUT_IS_GRAPH_OUTPUT,
        Reason.BN_OUTPUT_HAS_OTHER_CONSUMERS,
        Reason.PADDING_AFTER_BN,
        Reason.UNEVEN_TAPS_AFTER_BN,
        Reason.PARAM_NOT_CONSTANT,
        Reason.PARAM_SHAPE_MISMATCH,
        Reason.TRAINING_MODE,
        Reason.EXTRA_OUTPUTS_USED,
        Reason.NONPOSITIVE_VARIANCE,
        Reason.NONFINITE_STATISTICS,
        Reason.WEIGHT_NOT_CONSTANT,
        Reason.UNSUPPORTED_DTYPE,
        Reason.CHANNEL_AXIS_MISMATCH,
        Reason.FOLD_OVERFLOWS_DTYPE,
        Reason.RULE_DISABLED,
        Reason.PER_SAMPLE_STATISTICS,
        Reason.SHARED_MODULE,
        Reason.NO_RUNNING_STATISTICS,
        Reason.UNKNOWN_SHAPE,
        Reason.HOOKS_REGISTERED,
        Reason.CUSTOM_FORWARD,
        Reason.BRANCHES_INCOMPATIBLE,
        Reason.RESHAPE_NOT_CHANNEL_PRESERVING,
        Reason.SHAPE_DEPENDENT,
        Reason.MUTATED_IN_PLACE,
        Reason.POOL_DOES_NOT_COMMUTE,
    }
)
