"""What the command line accepts as a model, decided without importing torch.

An ONNX file is folded by ``bnfold.onnx``; a PyTorch source — a ``torch.export`` program (``.pt2``)
or a factory spec (``package.module:function``) — goes through ``bnfold.fx``, which imports torch.
The CLI must tell them apart before torch is imported (or when it is not installed at all); rule
names come from the torch-free table :data:`bnfold.core.table.RULE_TABLE`.
"""

from __future__ import annotations

import re

from bnfold.core.table import TORCH, rule_names

__all__ = ["TORCH_RULE_NAMES", "PICKLE_SUFFIXES", "FACTORY_SPEC", "is_torch_source"]

# The names of bnfold.fx.RULES, in order, from the one rule table (tests/fx pin that the two agree).
TORCH_RULE_NAMES = rule_names(TORCH)

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
