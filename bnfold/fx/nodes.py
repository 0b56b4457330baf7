"""What FX nodes mean: which calls are BatchNorm, per-sample norms or foldable layers, and their arguments.

Three tracers produce three spellings of the same layer, and the rules must read all of them:

- ``symbolic_trace`` keeps torch's own modules as ``call_module`` nodes, and records the functional
  calls made inside modules it traces through (``F.batch_norm``, ``F.conv2d``); it moves positional
  arguments into kwargs as it sees fit.
- ``torch.export`` (``ExportedProgram.module()``) has only ``call_function`` nodes on ATen operators
  (``aten.conv2d.default``, ``aten.batch_norm.default``), with parameters as ``get_attr`` nodes.
- ``run_decompositions()`` goes further (``aten.convolution.default``,
  ``aten._native_batch_norm_legit_no_training.default`` returning a tuple read by ``getitem``).

Arguments are therefore always read by name through :func:`bind`, which knows the Python signatures
of the torch functions and reads ATen schemas.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as functional
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = [
    "bind",
    "is_batchnorm_call",
    "is_per_sample_norm_call",
    "BATCHNORM_MODULES",
    "PER_SAMPLE_MODULES",
    "producer_kind_of_function",
    "behaves_like_torch",
    "resolve_attr",
    "owner_path",
    "output_rank",
    "output_shape",
    "argument_names",
    "TensorUses",
    "AttributeCache",
    "reads_only_metadata",
    "value_readers",
]

aten = torch.ops.aten

# Positional parameter names of the Python-level torch functions symbolic_trace records. ATen
# operators are bound from their schemas instead (see bind()).
_SIGNATURES: dict[Any, tuple[str, ...]] = {
    functional.batch_norm: (
        "input",
        "running_mean",
        "running_var",
        "weight",
        "bias",
        "training",
        "momentum",
        "eps",
    ),
    torch.batch_norm: (
        "input",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "training",
        "momentum",
        "eps",
        "cudnn_enabled",
    ),
    functional.linear: ("input", "weight", "bias"),
    functional.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
    torch.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable"),
    functional.group_norm: ("input", "num_groups", "weight", "bias", "eps"),
    torch.group_norm: ("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled"),
    functional.instance_norm: (
        "input",
        "running_mean",
        "running_var",
        "weight",
        "bias",
        "use_input_stats",
        "momentum",
        "eps",
    ),
    torch.instance_norm: (
        "input",
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "use_input_stats",
        "momentum",
        "eps",
        "cudnn_enabled",
    ),
    functional.rms_norm: ("input", "normalized_shape", "weight", "eps"),
}
for _function in (functional.conv1d, functional.conv2d, functional.conv3d):
    _SIGNATURES[_function] = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
for _function in (functional.conv_transpose1d, functional.conv_transpose2d, functional.conv_transpose3d):
    _SIGNATURES[_function] = (
        "input",
        "weight",
        "bias",
        "stride",
        "padding",
        "output_padding",
        "groups",
        "dilation",
    )

_BATCHNORM_FUNCTIONS = frozenset({functional.batch_norm, torch.batch_norm})
_BATCHNORM_OPS = frozenset(
    {
        aten.batch_norm,
        aten._native_batch_norm_legit_no_training,
        aten._native_batch_norm_legit,
        aten._native_batch_norm_legit_functional,
        aten.native_batch_norm,
    }
)
#: ATen batch norms that return a tuple (output, saved statistics...), read through getitem.
TUPLE_BATCHNORM_OPS = _BATCHNORM_OPS - {aten.batch_norm}

_PER_SAMPLE_FUNCTIONS = frozenset(
    {
        functional.layer_norm,
        torch.layer_norm,
        functional.group_norm,
        torch.group_norm,
        functional.instance_norm,
        torch.instance_norm,
        functional.rms_norm,
    }
)
_PER_SAMPLE_OPS = frozenset(
    {
        aten.layer_norm,
        aten.native_layer_norm,
        aten.group_norm,
        aten.native_group_norm,
        aten.instance_norm,
        aten.rms_norm,
    }
)

BATCHNORM_MODULES = (_BatchNorm, nn.SyncBatchNorm)
PER_SAMPLE_MODULES = (nn.LayerNorm, nn.GroupNorm, _InstanceNorm, nn.RMSNorm)

_CONV_FUNCTIONS = frozenset({functional.conv1d, functional.conv2d, functional.conv3d})
_CONV_TRANSPOSE_FUNCTIONS = frozenset(
    {functional.conv_transpose1d, functional.conv_transpose2d, functional.conv_transpose3d}
)
_CONV_OPS = frozenset({aten.conv1d, aten.conv2d, aten.conv3d})
_CONV_TRANSPOSE_OPS = frozenset({aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d})


def _packet(target: Any) -> Any:
    """The ATen operator of an overload (``aten.conv2d.default`` -> ``aten.conv2d``), or the packet itself.

    symbolic_trace records a packet when the model calls ``torch.ops.aten.x(...)`` directly.
    """
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target
    return None


def _schema(target: Any):
    if isinstance(target, torch._ops.OpOverload):
        return target._schema
    if isinstance(target, torch._ops.OpOverloadPacket) and "default" in target.overloads():
        return target.default._schema
    return None


def argument_names(target: Any) -> tuple[str, ...]:
    """The positional parameter names of a torch function or ATen operator; () when unknown."""
    schema = _schema(target)
    if schema is not None:
        return tuple(argument.name for argument in schema.arguments)
    return _SIGNATURES.get(target, ())


def bind(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by parameter name (positional and keyword alike); {} when unknown."""
    names = argument_names(node.target)
    if len(node.args) > len(names):
        return {}
    bound = dict(zip(names, node.args, strict=False))
    bound.update(node.kwargs)
    return bound


def is_batchnorm_call(node: fx.Node) -> bool:
    return node.op == "call_function" and (
        node.target in _BATCHNORM_FUNCTIONS or _packet(node.target) in _BATCHNORM_OPS
    )


def returns_tuple(node: fx.Node) -> bool:
    return _packet(node.target) in TUPLE_BATCHNORM_OPS


def is_per_sample_norm_call(node: fx.Node) -> bool:
    return node.op == "call_function" and (
        node.target in _PER_SAMPLE_FUNCTIONS or _packet(node.target) in _PER_SAMPLE_OPS
    )


def function_label(target: Any) -> str:
    """``aten.conv2d`` for ATen operators, ``batch_norm`` for Python functions."""
    packet = _packet(target)
    if packet is not None:
        return f"aten.{packet.__name__}"
    return getattr(target, "__name__", str(target))


def producer_kind_of_function(node: fx.Node) -> str | None:
    """``conv``, ``conv_transpose`` or ``linear`` for a functional layer call, else None."""
    if node.op != "call_function":
        return None
    target, packet = node.target, _packet(node.target)
    if target in _CONV_FUNCTIONS or packet in _CONV_OPS:
        return "conv"
    if target in _CONV_TRANSPOSE_FUNCTIONS or packet in _CONV_TRANSPOSE_OPS:
        return "conv_transpose"
    if target is functional.linear or packet is aten.linear:
        return "linear"
    if packet is aten.convolution:
        transposed = bind(node).get("transposed")
        if isinstance(transposed, bool):
            return "conv_transpose" if transposed else "conv"
    return None


def _torch_base(module_type: type) -> type | None:
    """The first class in the MRO that torch itself defines (``nn.Conv2d`` for a user subclass)."""
    for klass in module_type.__mro__:
        if klass.__module__.startswith("torch.nn.modules"):
            return klass
    return None


# Methods whose override changes what a layer computes. _check_input_dim only validates and is
# overridden by BatchNorm1d/2d/3d themselves, so a subclass may change it freely.
_COMPUTING_METHODS = ("forward", "_conv_forward", "_output_padding")


def behaves_like_torch(module: nn.Module) -> bool:
    """Whether the module computes exactly what its torch base class does (no overridden forward).

    timm and torchvision subclass BatchNorm2d and Conv2d; a subclass that only adds attributes or
    changes construction computes the plain function and can be folded as a module. One that
    overrides ``forward`` (BatchNormAct2d, Conv2dSame) must be traced through instead.
    """
    base = _torch_base(type(module))
    if base is None:
        return False
    return all(getattr(type(module), name, None) is getattr(base, name, None) for name in _COMPUTING_METHODS)


def module_kind(module: nn.Module) -> str | None:
    """``batchnorm``, ``per-sample``, ``conv``, ``conv_transpose``, ``linear`` or None."""
    if isinstance(module, BATCHNORM_MODULES):
        return "batchnorm"
    if isinstance(module, PER_SAMPLE_MODULES):
        return "per-sample"
    if isinstance(module, _ConvTransposeNd):
        return "conv_transpose"
    if isinstance(module, _ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def resolve_attr(root: nn.Module, target: str) -> Any:
    """The object at dotted path ``target`` under ``root``, or None when there is none."""
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def owner_path(target: str) -> str:
    """``block.bn`` for ``block.bn.running_mean``."""
    return target.rpartition(".")[0]


def get_attr_value(root: nn.Module, value: Any) -> Any:
    """What a get_attr node refers to (a tensor, a subgraph GraphModule); None for anything else."""
    if isinstance(value, fx.Node) and value.op == "get_attr":
        return resolve_attr(root, value.target)
    return None


def get_attr_tensor(root: nn.Module, value: Any) -> tuple[str, torch.Tensor] | None:
    """(target, tensor) when ``value`` is a get_attr node that holds a tensor."""
    if isinstance(value, fx.Node) and value.op == "get_attr":
        tensor = resolve_attr(root, value.target)
        if isinstance(tensor, torch.Tensor):
            return value.target, tensor
    return None


def output_shape(node: fx.Node) -> tuple[Any, ...] | None:
    """The node's output shape, from ShapeProp (``tensor_meta``) or torch.export (``val``).

    Sizes are ints, or SymInts where torch.export kept a dimension dynamic.
    """
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None:
        shape = getattr(node.meta.get("val"), "shape", None)
    return tuple(shape) if shape is not None else None


def output_rank(node: fx.Node) -> int | None:
    """The rank of the node's value, from ShapeProp (``tensor_meta``) or torch.export (``val``)."""
    shape = output_shape(node)
    return len(shape) if shape is not None else None


def getitem_users(node: fx.Node) -> dict[int, list[fx.Node]]:
    """For a node returning a tuple: its ``operator.getitem`` users by index."""
    by_index: dict[int, list[fx.Node]] = defaultdict(list)
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
            by_index[user.args[1]].append(user)
        else:
            by_index[-1].append(user)
    return by_index


class TensorUses:
    """Where every parameter and buffer is used: the call sites that read it.

    A ``get_attr`` node counts once per node that reads it; a ``call_module`` node counts for every
    tensor its module owns. Identity (not name) decides, so a module registered under two names or
    a weight tied between two layers is seen as shared. Torch's own ``fuse`` skips this check and
    silently changes the second call of a conv module that is called twice (pytorch issue 104593).

    Rebuilt after every fold (a fold replaces modules and tensors and rewires readers), so the
    rebuild is kept cheap: ``attributes`` (an :class:`AttributeCache` the fold keeps) answers each
    node's target from the dicts it was found in last time, checked entry by entry, and a layer's
    tensors are read from its own dicts rather than by the recursive ``parameters()``.
    """

    def __init__(self, graph_module: fx.GraphModule, attributes: AttributeCache | None = None) -> None:
        attributes = AttributeCache(graph_module) if attributes is None else attributes
        self._sites: dict[int, list[fx.Node]] = defaultdict(list)
        self._module_sites: dict[int, list[fx.Node]] = defaultdict(list)
        for node in graph_module.graph.nodes:
            if node.op == "get_attr":
                tensor = attributes.get(node.target)
                if isinstance(tensor, torch.Tensor):
                    self._sites[id(tensor)].extend(node.users)
            elif node.op == "call_module":
                module = attributes.get(node.target)
                if not isinstance(module, nn.Module):
                    module = graph_module.get_submodule(node.target)  # raises, naming what is missing
                self._module_sites[id(module)].append(node)
                for tensor in _owned_tensors(module):
                    self._sites[id(tensor)].append(node)

    def module_sites(self, module: nn.Module) -> list[fx.Node]:
        return list(self._module_sites.get(id(module), ()))

    def other_sites(self, tensors: Iterable[torch.Tensor | None], *own: fx.Node) -> list[fx.Node]:
        """Nodes other than ``own`` that read any of ``tensors``, in first-seen order."""
        seen: dict[fx.Node, None] = {}
        for tensor in tensors:
            if tensor is None:
                continue
            for site in self._sites.get(id(tensor), ()):
                if site not in own:
                    seen[site] = None
        return list(seen)


def _owned_tensors(module: nn.Module) -> Iterable[torch.Tensor]:
    """The parameters and buffers of ``module`` and its children, each once (a module without
    children, every layer a graph calls, is read from its own dicts: what ``parameters()`` and
    ``buffers()`` give, without their recursion)."""
    if module._modules:
        yield from module.parameters()
        yield from (buffer for buffer in module.buffers() if buffer is not None)
        return
    seen: set[int] = set()
    for store in (module._parameters, module._buffers):
        for tensor in store.values():
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                yield tensor


class AttributeCache:
    """The object at a dotted path under a module, as :func:`resolve_attr` finds it, remembered
    with the registry dicts (``_modules``, ``_parameters``, ``_buffers``) each step was found in.

    A remembered answer is used only while every step still holds the same object in the same dict
    (a fold that replaces a module or a tensor, or deletes one, puts another object there or none),
    so it is never stale; anything found otherwise (a plain attribute, a property such as a
    parametrized weight) is looked up every time.
    """

    def __init__(self, root: nn.Module) -> None:
        self._root = root
        self._chains: dict[str, tuple[tuple[dict, str, Any], ...]] = {}

    def get(self, target: str) -> Any:
        chain = self._chains.get(target)
        if chain is not None and all(store.get(name) is found for store, name, found in chain):
            return chain[-1][2]
        value = resolve_attr(self._root, target)
        chain = self._registered_chain(target)
        if chain is not None and chain[-1][2] is value:
            self._chains[target] = chain
        else:
            self._chains.pop(target, None)
        return value

    def _registered_chain(self, target: str) -> tuple[tuple[dict, str, Any], ...] | None:
        steps = []
        value: Any = self._root
        for name in target.split("."):
            if not isinstance(value, nn.Module):
                return None
            for store in (value._modules, value._parameters, value._buffers):
                if store.get(name) is not None:
                    break
            else:
                return None
            value = store[name]
            steps.append((store, name, value))
        return tuple(steps)


# Attributes and methods that read a tensor's metadata (shape, rank, dtype, device), never its values.
_METADATA_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})
_METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "get_device"})
_SHAPE_OF_OTHER_METHODS = frozenset({"reshape_as", "view_as", "expand_as"})
_METADATA_OPS = frozenset({aten.sym_size, aten.sym_numel, aten.dim})
_SHAPE_OF_OTHER_OPS = frozenset({aten.reshape_as, aten.view_as, aten.expand_as})


def reads_only_metadata(user: fx.Node, tensor: fx.Node) -> bool:
    """Whether ``user`` reads nothing of ``tensor`` but its shape, rank, dtype or device.

    Such readers see the same thing before and after a fold (a folded layer's output has the BN
    output's shape, dtype and device): timm's BatchNormAct2d reads ``x.ndim`` before ``F.batch_norm``,
    LeViT's ``reshape_as(features)`` reads only ``features``' sizes.
    """
    if user.op == "call_function" and user.target is getattr:
        return len(user.args) == 2 and user.args[0] is tensor and user.args[1] in _METADATA_ATTRIBUTES
    if user.op == "call_method":
        if user.target in _METADATA_METHODS:
            return user.args[0] is tensor
        return user.target in _SHAPE_OF_OTHER_METHODS and user.args[0] is not tensor
    if user.op == "call_function":
        packet = _packet(user.target)
        if packet in _METADATA_OPS:
            return True
        return packet in _SHAPE_OF_OTHER_OPS and user.args[0] is not tensor
    return False


def value_readers(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values (every user but the metadata readers)."""
    return [user for user in node.users if not reads_only_metadata(user, node)]
