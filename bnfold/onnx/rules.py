"""The ONNX rule registry: every rule of :data:`bnfold.core.table.RULE_TABLE` that lists ``onnx``,
in the order the driver tries them.

Each rule implements :class:`bnfold.core.protocol.Rule` (``find`` a typed site, ``plan`` the fold or
raise :class:`~bnfold.core.refuse.Refuse`, ``apply`` the plan) and lives with its family:

- :mod:`bnfold.onnx.rules_output` — ``layer -> BN`` (output channels; layers in :mod:`bnfold.onnx.layers`);
- :mod:`bnfold.onnx.rules_reshape` — ``layer -> Reshape/Flatten -> BN``;
- :mod:`bnfold.onnx.rules_pool` — ``layer -> MaxPool/AveragePool/... -> BN``;
- :mod:`bnfold.onnx.rules_input_side` — ``BN -> layer`` (input channels);
- :mod:`bnfold.onnx.rules_affine` — ``layer -> Mul/Add(per-channel constant)``;
- :mod:`bnfold.onnx.rules_branches` — ``Add`` of parallel conv / BN / identity branches;
- :mod:`bnfold.onnx.rules_standalone` — a BN nothing absorbed -> ``Mul`` + ``Add`` (opt-in).
"""

from __future__ import annotations

from bnfold.core.protocol import Rule
from bnfold.onnx.layers import CONV, CONV_TRANSPOSE, GEMM, MATMUL
from bnfold.onnx.rules_affine import LayerThenAffine
from bnfold.onnx.rules_branches import BranchMerge
from bnfold.onnx.rules_input_side import BNThenConv, BNThenConvTranspose, BNThenGemm, BNThenMatMul
from bnfold.onnx.rules_output import LayerThenBN
from bnfold.onnx.rules_pool import LayerPoolBN
from bnfold.onnx.rules_reshape import LayerReshapeBN
from bnfold.onnx.rules_standalone import BNToAffine

__all__ = ["RULES", "Rule"]

RULES: tuple[Rule, ...] = (
    # BN -> the layer before it (output channels)
    LayerThenBN("conv-bn", CONV),
    LayerThenBN("convtranspose-bn", CONV_TRANSPOSE),
    LayerThenBN("gemm-bn", GEMM),
    LayerThenBN("matmul-bn", MATMUL),
    # ... through a channel-preserving Reshape/Flatten between the layer and the BN
    LayerReshapeBN("conv-reshape-bn", CONV),
    LayerReshapeBN("gemm-reshape-bn", GEMM),
    LayerReshapeBN("matmul-reshape-bn", MATMUL, channel_axis=-1),
    # ... through a pooling that commutes with the BN's map
    LayerPoolBN("conv-pool-bn", CONV),
    LayerPoolBN("convtranspose-pool-bn", CONV_TRANSPOSE),
    # BN -> the layer after it (input channels), tried when no producer-side rule folds it
    BNThenConv(),
    BNThenConvTranspose(),
    BNThenGemm(),
    BNThenMatMul(),
    # per-channel Mul/Add after a layer (affine chains from other exporters)
    LayerThenAffine("conv-affine", CONV),
    LayerThenAffine("convtranspose-affine", CONV_TRANSPOSE),
    LayerThenAffine("gemm-affine", GEMM),
    LayerThenAffine("matmul-affine", MATMUL),
    # Add of parallel Conv / BN / identity branches of one input -> one Conv (RepVGG, ACNet)
    BranchMerge(),
    # a BN nothing absorbed -> Mul + Add, only with fold_onnx(rewrite_standalone=True)
    BNToAffine(),
)
