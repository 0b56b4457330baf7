"""What the command line accepts as a model, decided without importing torch.

An ONNX file is folded by ``bnfold.onnx``; a PyTorch source — a ``torch.export`` program (``.pt2``)
or a factory spec (``package.module:function``) — goes through ``bnfold.fx``, which imports torch.
The CLI must tell them apart, and list every rule name for ``--skip-rule``, before torch is imported
(or when it is not installed at all).
"""

from __future__ import annotations

import re

__all__ = ["TORCH_RULE_NAMES", "PICKLE_SUFFIXES", "FACTORY_SPEC", "is_torch_source"]

# The names of bnfold.fx.RULES, in order (tests/fx pin that the two agree).
TORCH_RULE_NAMES = (
    "conv-bn",
    "convtranspose-bn",
    "linear-bn",
    "functional-bn",
    "linear-reshape-bn",
    "bn-conv",
    "bn-convtranspose",
    "bn-linear",
    "branch-merge",
)

FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
# torch.save files: bnfold never unpickles them (loading runs arbitrary code from the file).
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")


def is_torch_source(spec: str) -> bool:
    """Whether ``spec`` names a PyTorch model: a ``.pt2`` file, a pickle, or ``package.module:factory``.

    Pickles count so that the PyTorch loader can refuse them with its explanation; a name ending in
    ``.onnx`` is always an ONNX file.
    """
    if spec.endswith(".onnx"):
        return False
    return spec.endswith((".pt2", *PICKLE_SUFFIXES)) or bool(FACTORY_SPEC.match(spec))
