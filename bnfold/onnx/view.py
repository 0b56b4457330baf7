"""The ONNX graph as the core driver sees it: :class:`OnnxView`, a :class:`~bnfold.onnx.graph.GraphIndex`
that also implements :class:`bnfold.core.protocol.GraphView`.

Rules get this same object: the driver's questions (which nodes, which are norms, how to name them)
are answered here, the rules' (producers, consumers, constants, scoped shapes, write-back) by the
index it extends.
"""

from __future__ import annotations

from onnx import FunctionProto, GraphProto, NodeProto

from bnfold.core.protocol import NodeIdentity
from bnfold.core.refuse import Refuse
from bnfold.onnx.batchnorm import BATCHNORM, PER_SAMPLE_NORMS, NormParams, read_batchnorm
from bnfold.onnx.graph import GraphIndex, ModelContext
from bnfold.onnx.nodes import is_op, subgraphs_of

__all__ = ["OnnxView"]


class OnnxView(GraphIndex):
    """One graph, subgraph or model-local function body of an ONNX model, for the fold driver."""

    def __init__(
        self,
        graph: GraphProto | FunctionProto,
        context: ModelContext,
        path: str = "main",
        parent: OnnxView | None = None,
    ) -> None:
        super().__init__(graph, context, path, parent)
        # read_batchnorm's answer per BN: folds never write a BN's statistics (a shared one is copied
        # for the layer that is written), so it holds for the whole fold.
        self._norms: dict[int, NormParams | Refuse] = {}

    # -- bnfold.core.protocol.GraphView -----------------------------------------------------------
    def is_removed(self, node: NodeProto) -> bool:
        return id(node) in self.removed

    def is_norm(self, node: NodeProto) -> bool:
        return is_op(node, BATCHNORM)

    def is_per_sample_norm(self, node: NodeProto) -> bool:
        return is_op(node, *PER_SAMPLE_NORMS)

    def check_norm(self, norm: NodeProto) -> None:
        self.norm_params(norm)

    def identity(self, node: NodeProto) -> NodeIdentity:
        return NodeIdentity(node.name, node.op_type, node.output[0] if node.output else "")

    def label(self, node: NodeProto) -> str:
        return self.node_label(node)

    def no_site_detail(self, norm: NodeProto) -> str:
        producer = self.producer.get(norm.input[0]) if norm.input else None
        if producer is None:
            where = (
                "a graph input"
                if norm.input and norm.input[0] in self.graph_inputs
                else "not produced in this graph"
            )
            detail = f"input `{norm.input[0] if norm.input else ''}` is {where}"
        else:
            detail = f"input comes from {producer.op_type} {self.node_label(producer)}"
        readers = self.live_consumers(norm.output[0]) if norm.output else []
        if readers:
            labels = ", ".join(f"{node.op_type} {self.node_label(node)}" for node in readers[:3])
            detail += f"; output feeds {labels}, which no rule folds into"
        return detail

    def subgraphs(self) -> list[OnnxView]:
        views = []
        for node in self.live_nodes():
            for attribute_name, subgraph in subgraphs_of(node):
                path = f"{self.path}/{self.node_label(node)}.{attribute_name}"
                views.append(OnnxView(subgraph, self.context, path, parent=self))
        return views

    # -- for the rules -----------------------------------------------------------------------------
    def norm_params(self, norm: NodeProto) -> NormParams:
        """The BN's affine map (raises :class:`~bnfold.core.refuse.Refuse`), read once per BN."""
        known = self._norms.get(id(norm))
        if known is None:
            try:
                known = read_batchnorm(self, norm)
            except Refuse as refusal:
                known = refusal
            self._norms[id(norm)] = known
        if isinstance(known, Refuse):
            raise known.with_detail(known.detail)
        return known
