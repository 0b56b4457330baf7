"""Why a BN that no rule matched stays, in words a user can act on; shared by both backends.

A backend says what is on either side of the BN (:class:`Neighbours`); :func:`no_site_detail` turns
that into one sentence: where the BN sits, why no exact fold exists there, and what the user can do.
The common real cases: pre-activation blocks (``Add``/``Concat``/``MaxPool -> BN -> Relu -> Conv``
in DenseNet, DPN, ResNetV2), ``Relu -> BN -> Add`` (ConvMixer's residual), a BN on the model input,
and a BN whose output has several readers. A BN is a per-channel ``x * scale + shift``: it folds
exactly only into a linear layer right before it (whose output nothing else reads) or right after
it (its only reader), and a non-linearity, a join of several tensors or several readers in between
leave no such layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Neighbour", "Neighbours", "REMEDY_ONNX", "REMEDY_TORCH", "no_site_detail", "without_remedy"]

REMEDY_ONNX = (
    "--rewrite-standalone-bn (rewrite_standalone=True) turns it into Mul + Add, which runtimes fuse "
    "into the next op; otherwise nothing to do"
)
REMEDY_TORCH = (
    "the module keeps it; bnfold.export(..., rewrite_standalone=True) turns it into Mul + Add in the "
    "ONNX file; otherwise nothing to do"
)

# Op names (lower case, without "_") by what they do to a BN's per-channel map moved across them.
_NONLINEAR = frozenset(
    "relu relu6 leakyrelu prelu elu selu celu gelu silu swish mish sigmoid hardsigmoid hardswish "
    "hardtanh tanh softplus softsign clip clamp thresholdedrelu abs exp log sqrt pow softmax logsoftmax "
    "clampmin clampmax max min maxpool maxpool1d maxpool2d maxpool3d globalmaxpool adaptivemaxpool1d "
    "adaptivemaxpool2d".split()
)
_JOINS = frozenset("add sum sub mul div concat cat iadd mean".split())


@dataclass(frozen=True)
class Neighbour:
    """A node next to the BN: ``op`` its operation (``Relu``, ``ReLU``, ``relu``, ``add``...) and
    ``label`` how the report names it (``Relu `relu1```)."""

    op: str
    label: str


@dataclass(frozen=True)
class Neighbours:
    """What is on either side of a BN: ``producer`` (None: ``source`` names where the input comes
    from, e.g. "graph input `x`"), the nodes that read its output, and whether it is a graph output."""

    producer: Neighbour | None
    readers: Sequence[Neighbour]
    source: str = ""
    is_graph_output: bool = False


def _kind(op: str) -> str:
    name = op.lower().replace("_", "").removeprefix("torch.").removeprefix("f.")
    name = name.rsplit(".", 1)[-1]
    if name in _NONLINEAR:
        return "nonlinear"
    if name in _JOINS:
        return "join"
    return "other"


def _why(neighbour: Neighbour) -> str:
    kind = _kind(neighbour.op)
    if kind == "nonlinear":
        return f"{neighbour.op} is not linear"
    if kind == "join":
        return f"{neighbour.op} combines several tensors"
    return f"{neighbour.op} is no layer a rule folds into"


def _before(neighbours: Neighbours) -> tuple[str, str]:
    """(where, why) for the input side."""
    producer = neighbours.producer
    if producer is None:
        source = neighbours.source or "a graph input"
        return source, f"{source} is no layer's output"
    return producer.label, _why(producer)


def _after(neighbours: Neighbours) -> tuple[str, str]:
    """(where, why) for the output side."""
    readers = [reader.label for reader in neighbours.readers]
    if neighbours.is_graph_output:
        readers.append("a graph output")
    if not readers:
        return "nothing", "nothing reads its output"
    if len(readers) > 1:
        shown = ", ".join(readers[:3]) + (", ..." if len(readers) > 3 else "")
        return shown, f"its output has {len(readers)} readers, so no one of them can absorb it"
    if not neighbours.readers:
        return "a graph output", "its output is a graph output"
    return readers[0], _why(neighbours.readers[0])


def no_site_detail(neighbours: Neighbours, remedy: str) -> str:
    """``between A and B: no exact fold exists (why before; why after); remedy``."""
    where_before, why_before = _before(neighbours)
    where_after, why_after = _after(neighbours)
    return (
        f"between {where_before} and {where_after}: no exact fold exists ({why_before}; {why_after}); "
        + remedy
    )


def without_remedy(detail: str | None) -> str | None:
    """``detail`` without the remedy clause: for a BN that was rewritten, or whose rewrite refused."""
    if not detail:
        return detail
    for remedy in (REMEDY_ONNX, REMEDY_TORCH):
        detail = detail.removesuffix(f"; {remedy}")
    return detail
