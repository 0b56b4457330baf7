"""Reference architectures (plain torch) for testing BatchNorm folding, and their registry.

The ONNX export helper lives in ``models.export``; it is not imported here so that
``python -m models.export`` runs without a double-import warning.
"""

from __future__ import annotations

from models.architectures import (
    Conv1dNet,
    Conv3dNet,
    ConvNeXtDownsample,
    DecoderTiny,
    GhostModule,
    GhostNetTiny,
    MLPBatchNorm,
    MobileNetTiny,
    ResNetTiny,
)
from models.registry import REFERENCE_MODELS, ModelSpec, build, count_batchnorms

__all__ = [
    "REFERENCE_MODELS",
    "Conv1dNet",
    "Conv3dNet",
    "ConvNeXtDownsample",
    "DecoderTiny",
    "GhostModule",
    "GhostNetTiny",
    "MLPBatchNorm",
    "MobileNetTiny",
    "ModelSpec",
    "ResNetTiny",
    "build",
    "count_batchnorms",
]
