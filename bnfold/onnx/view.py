"""The ONNX graph as the core driver sees it: :class:`OnnxView`, a :class:`~bnfold.onnx.graph.GraphIndex`
that also implements :class:`bnfold.core.protocol.GraphView`.

Rules get this same object: the driver's questions (which nodes, which are norms, how to name them)
are answered here, the rules' (producers, consumers, constants, scoped shapes, write-back) by the
index it extends.
"""

from __future__ import annotations

from onnx import FunctionProto, GraphProto, NodeProto

from bnfold.core.kept import REMEDY_ONNX, Neighbour, Neighbours, no_site_detail
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
        name = norm.input[0] if norm.input else ""
        producer = self.producer.get(name) if name else None
        source = (
            f"graph input `{name}`" if name in self.graph_inputs else f"`{name}`, not computed in this graph"
        )
        output = norm.output[0] if norm.output else ""
        neighbours = Neighbours(
            producer=None if producer is None else self._neighbour(producer),
            readers=[self._neighbour(reader) for reader in self.live_consumers(output)] if output else [],
            source=source,
            is_graph_output=bool(output) and self.is_graph_output(output),
        )
        return no_site_detail(neighbours, REMEDY_ONNX)

    def _neighbour(self, node: NodeProto) -> Neighbour:
        return Neighbour(node.op_type, f"{node.op_type} `{self.node_label(node)}`")

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
