"""The FX graph as the core driver sees it: :class:`FxView`, a :class:`~bnfold.fx.state.FoldState` that
also implements :class:`bnfold.core.protocol.GraphView`.

Rules get this same object: the driver's questions (which nodes, which are norms, how to name them)
are answered here, the rules' (layers, constants, uses, shapes, in-place writes) by the state.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from bnfold.core.kept import REMEDY_TORCH, Neighbour, Neighbours, no_site_detail
from bnfold.core.protocol import NodeIdentity
from bnfold.fx.checks import require_not_shared
from bnfold.fx.no_ops import remove_no_ops
from bnfold.fx.nodes import function_label
from bnfold.fx.reading import LAYOUTS, identify, layer_kind, norm_input, read_batchnorm
from bnfold.fx.state import FoldState
from bnfold.fx.subgraphs import subgraph_modules

__all__ = ["FxView"]


class FxView(FoldState):
    """One graph of a torch fold: the top-level graph (``path`` "main") or a control-flow subgraph
    (``torch.cond`` branch, ``while_loop`` body, ...; ``path`` like ``true_graph_0``), whose
    parameters :func:`bnfold.fx.subgraphs.localize_constants` made its own constants."""

    def __init__(self, *args: Any, path: str = "main", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.path = path
        self._identities: dict[fx.Node, NodeIdentity] = {}
        self._kinds: dict[fx.Node, str | None] = {}

    # -- bnfold.core.protocol.GraphView -----------------------------------------------------------
    def live_nodes(self) -> list[fx.Node]:
        return list(self.graph_module.graph.nodes)

    def is_removed(self, node: fx.Node) -> bool:
        return getattr(node, "_erased", False) or node.graph is not self.graph_module.graph

    def is_norm(self, node: fx.Node) -> bool:
        return self._kind(node) == "batchnorm"

    def is_per_sample_norm(self, node: fx.Node) -> bool:
        return self._kind(node) == "per-sample"

    def _kind(self, node: fx.Node) -> str | None:
        """``batchnorm``, ``per-sample`` or None; remembered, since a fold may delete a node's module."""
        if node not in self._kinds:
            call = identify(self, node) if not self.is_removed(node) else None
            self._kinds[node] = call.kind if call is not None else None
        return self._kinds[node]

    def check_norm(self, norm: fx.Node) -> None:
        require_not_shared(self, read_batchnorm(self, identify(self, norm)))

    def identity(self, node: fx.Node) -> NodeIdentity:
        """How the report names ``node``; kept from before a fold erased it (its module may be gone)."""
        known = self._identities.get(node)
        if known is not None:
            return known
        call = identify(self, node) if not self.is_removed(node) else None
        if call is not None:
            identity = NodeIdentity(call.name, call.op_type, node.name)
        else:
            label = node.target if isinstance(node.target, str) else function_label(node.target)
            identity = NodeIdentity(node.name, report_op_type(str(label)), node.name)
        self._identities[node] = identity
        return identity

    def label(self, node: Any) -> str:
        return node if isinstance(node, str) else self.identity(node).node

    def no_site_detail(self, norm: fx.Node) -> str:
        source = norm_input(identify(self, norm))
        readers = [user for user in norm.users if user.op != "output"]
        neighbours = Neighbours(
            producer=self._neighbour(source)
            if isinstance(source, fx.Node) and source.op not in ("placeholder", "get_attr")
            else None,
            readers=[self._neighbour(user) for user in readers],
            source=f"graph input `{source.name}`"
            if isinstance(source, fx.Node) and source.op == "placeholder"
            else "a value not computed in the graph",
            is_graph_output=any(user.op == "output" for user in norm.users),
        )
        return no_site_detail(neighbours, REMEDY_TORCH)

    def _neighbour(self, node: fx.Node) -> Neighbour:
        if node.op == "call_module":
            op = type(self.graph_module.get_submodule(str(node.target))).__name__
        elif node.op in ("call_function", "call_method"):
            op = function_label(node.target) if node.op == "call_function" else str(node.target)
        else:
            op = node.op
        return Neighbour(op, self.describe(node))

    def subgraphs(self) -> list[FxView]:
        """Views of the subgraphs the live nodes call, folded after this graph, each on its own: a
        fold writes new tensors into the subgraph's module, never into this graph's."""
        views = []
        for target, subgraph in subgraph_modules(self.graph_module):
            view = FxView(
                subgraph,
                root=self.root,
                trusted_shapes=self.trusted_shapes,
                input_ranks=False,  # only the top-level graph's inputs get a rank check
                path=target if self.path == "main" else f"{self.path}/{target}",
            )
            remove_no_ops(view)
            views.append(view)
        return views

    # -- for the rules and messages -------------------------------------------------------------
    def describe(self, node: fx.Node) -> str:
        """``ReLU `act``` for a module, ``relu `relu``` for a function."""
        if node.op == "call_module":
            module = self.graph_module.get_submodule(str(node.target))
            return f"{type(module).__name__} `{node.target}`"
        label = function_label(node.target) if node.op == "call_function" else str(node.target)
        return f"{label} `{node.name}`"

    def layer_node(self, node: Any, kinds: tuple[str, ...] = tuple(LAYOUTS)) -> fx.Node | None:
        """``node`` when it is a Conv / ConvTranspose / Linear of one of ``kinds`` (module or function)."""
        return node if isinstance(node, fx.Node) and layer_kind(self, node) in kinds else None


# The report names elementwise nodes by their ONNX ops, so that both backends' reports (and their
# summaries, which count folded Mul/Add apart from BNs) read the same.
_REPORT_OPS = {
    **dict.fromkeys(("mul", "imul", "div", "truediv", "itruediv"), "Mul"),
    **dict.fromkeys(("add", "iadd", "sub", "isub"), "Add"),
}


def report_op_type(label: str) -> str:
    """``Mul`` for a multiply or divide, ``Add`` for an add or subtract (``operator.add``,
    ``torch.add``, ``Tensor.add_``, ``aten.add.Tensor``), else the label itself."""
    name = label.removeprefix("aten.").split(".")[0].rstrip("_").lower()
    return _REPORT_OPS.get(name, label)
