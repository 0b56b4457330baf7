"""Folds inside torch.export's control-flow subgraphs: ``torch.cond`` branches, ``while_loop`` bodies,
``map`` bodies and ``torch.no_grad()`` regions, whose parameters torch.export passes in as operands.

Every fold is checked against the original module for both predicate values and at two input sizes
(a dynamic batch axis), and the original's tensors are checked unchanged.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch._higher_order_ops.map import map as map_over  # noqa: E402
from torch._higher_order_ops.scan import scan  # noqa: E402
from torch._higher_order_ops.while_loop import while_loop  # noqa: E402

import bnfold  # noqa: E402
from bnfold import Reason  # noqa: E402
from bnfold.fx.rules import RULES  # noqa: E402
from bnfold.fx.rules_output import LayerThenBN  # noqa: E402
from bnfold.fx.subgraphs import localize_constants  # noqa: E402
from tests.fx import nets  # noqa: E402

BATCH = torch.export.Dim("batch", min=1, max=16)


def fold(model: nn.Module, example: torch.Tensor, **options):
    return bnfold.fold_module(model, example, dynamic_shapes=({0: BATCH},), **options)


def assert_same_function(result, model: nn.Module, *inputs: torch.Tensor) -> None:
    with torch.no_grad():
        for values in inputs:
            torch.testing.assert_close(result.module(values), model(values), rtol=1e-5, atol=1e-5)


def both_branches(shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Inputs whose sum is positive and negative, at the shape given and at another batch size."""
    generator = torch.Generator().manual_seed(1)
    inputs = []
    for batch in (shape[0], shape[0] + 3):
        values = torch.rand(batch, *shape[1:], generator=generator) + 0.1
        inputs += [values, -values]
    return inputs


def rows(result) -> list[tuple[str, str, str | None, str | None]]:
    return [(d.node, d.graph, d.outcome.value, d.rule or d.reason) for d in result.report.decisions]


def tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


class SharedConvCond(nn.Module):
    """One conv read by the outer graph and by both branches; a BN after it in each of the three
    (``false_bn=False``: the false branch reads the conv's original output)."""

    def __init__(self, false_bn: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.outer_bn = nn.BatchNorm2d(4)
        self.true_bn = nn.BatchNorm2d(4)
        self.false_bn = nn.BatchNorm2d(4) if false_bn else nn.Identity()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outer = self.outer_bn(self.conv(inputs))
        branch = torch.cond(
            inputs.sum() > 0,
            lambda values: self.true_bn(self.conv(values)),
            lambda values: self.false_bn(self.conv(values)) * 2,
            (inputs,),
        )
        return outer + branch


def _branch_reads(result) -> list:
    """The get_attr nodes inside the folded module's branches (torch.export has none there)."""
    return [
        node
        for branch in (result.module.true_graph_0, result.module.false_graph_0)
        for node in branch.graph.nodes
        if node.op == "get_attr"
    ]


def test_cond_branches_fold_and_a_conv_shared_with_the_outer_graph_is_copied() -> None:
    model = nets.randomized(SharedConvCond())
    before = tensors_of(model)
    result = fold(model, torch.randn(2, 3, 6, 6))

    assert rows(result) == [
        ("outer_bn", "main", "folded", "conv-bn"),
        ("true_bn", "true_graph_0", "folded", "conv-bn"),
        ("false_bn", "false_graph_0", "folded", "conv-bn"),
        ("mul", "false_graph_0", "folded", "conv-affine"),  # the `* 2` (torch.export's aten.mul)
    ]
    assert [d.into for d in result.report.folded] == ["conv", "conv", "conv", "conv"]
    # Three folds of one conv: three new weights, none written into another's; the branches get
    # theirs as operands again, as torch.export passes them.
    weights = [value for name, value in result.module.state_dict().items() if name.endswith("conv_weight")]
    weights.append(result.module.conv.weight)
    assert len({weight.data_ptr() for weight in weights}) == 3
    assert not any(isinstance(node.target, str) and "." in node.target for node in _branch_reads(result))
    assert all(weight.data_ptr() != model.conv.weight.data_ptr() for weight in weights)
    assert_same_function(result, model, *both_branches((2, 3, 6, 6)))
    assert_unchanged(model, before)
    assert result.verification
    # Each run takes one branch; both are checked locally on the operands the cond received.
    local = [(check.subgraph, check.status, check.runs, check.passed) for check in result.verification.local]
    runs = len(result.verification.runs)
    assert local == [
        ("cond true_graph_0", "checked", runs, True),
        ("cond false_graph_0", "checked", runs, True),
    ]
    assert not any("control-flow" in line for line in result.verification.uncovered)


class MisfoldInFalseBranch(LayerThenBN):
    """conv-bn, but a wrong weight in ``false_graph_0``: a bug only a local check can see when the
    verification inputs all take the true branch."""

    def plan(self, view, site):
        plan = super().plan(view, site)
        return replace(plan, weight=plan.weight * 1.01) if view.path == "false_graph_0" else plan


class NeverFalse(SharedConvCond):
    """A predicate no input makes false: the false branch never runs end to end."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.cond(
            inputs.abs().sum() >= 0,
            lambda values: self.true_bn(self.conv(values)),
            lambda values: self.false_bn(self.conv(values)) * 2,
            (inputs,),
        )


def test_a_wrong_fold_in_a_branch_no_run_takes_fails_the_local_check() -> None:
    model = nets.randomized(NeverFalse())
    rules = [MisfoldInFalseBranch("conv-bn", ("conv",), ("module", "custom")), *RULES[1:]]
    result = fold(model, torch.randn(2, 3, 6, 6), rules=rules)

    # the false branch: its BN (misfolded) and its `* 2` (conv-affine)
    assert [d.graph for d in result.report.folded] == ["true_graph_0", "false_graph_0", "false_graph_0"]
    assert all(output.passed for output in result.verification.outputs)  # end to end: fine
    checks = {check.subgraph: check.passed for check in result.verification.local}
    assert checks == {"cond true_graph_0": True, "cond false_graph_0": False}
    assert not result.verification
    assert "MISMATCH" in result.verification.to_text()


def test_a_branch_that_reads_a_conv_the_outer_graph_folded_keeps_the_original() -> None:
    model = nets.randomized(SharedConvCond(false_bn=False))
    before = tensors_of(model)
    # conv-affine skipped: it would fold the false branch's `conv(x) * 2` (a copy of its own)
    result = fold(model, torch.randn(2, 3, 6, 6), inplace=True, skip_rules=["conv-affine"])

    assert rows(result) == [
        ("outer_bn", "main", "folded", "conv-bn"),
        ("true_bn", "true_graph_0", "folded", "conv-bn"),
    ]
    originals = [
        value for value in result.module.state_dict().values() if torch.equal(value, before["conv.weight"])
    ]
    assert len(originals) == 1  # the false branch's operand: the conv's weight as it was
    assert_same_function(result, model, *both_branches((2, 3, 6, 6)))
    assert_unchanged(model, before)  # in place or not, the user's tensors are never written


def test_an_exported_program_with_cond_is_folded_without_touching_its_subgraphs() -> None:
    """ExportedProgram.module() shares the branch modules with the program: the fold edits copies."""
    model = nets.randomized(SharedConvCond())
    example = torch.randn(2, 3, 6, 6)
    program = torch.export.export(model, (example,))
    branches = {name: str(module.graph) for name, module in program.graph_module.named_children()}
    result = bnfold.fold_module(program, example)

    assert len(result.report.folded) == 4  # three BNs and the false branch's `* 2` (conv-affine)
    assert {name: str(module.graph) for name, module in program.graph_module.named_children()} == branches
    assert_same_function(result, model, *both_branches((2, 3, 6, 6))[:2])  # static batch size
    with torch.no_grad():
        for values in both_branches((2, 3, 6, 6))[:2]:
            torch.testing.assert_close(program.module()(values), model(values))


class BranchBNs(nn.Module):
    """Branch BNs that must stay: the conv's output also leaves the branch; statistics computed by
    the caller; and a BN that folds, to show the others are kept for their own reason."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.returned_bn = nn.BatchNorm2d(4)
        self.computed_bn = nn.BatchNorm2d(4)
        self.other = nn.Conv2d(3, 4, 1)
        self.folding_bn = nn.BatchNorm2d(4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        mean = self.computed_bn.running_mean * 1.5  # computed in the outer graph: an operand

        def true_branch(values: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
            features = self.conv(values)
            computed = nn.functional.batch_norm(
                self.other(values), mean, self.computed_bn.running_var, training=False
            )
            return self.returned_bn(features) + features + computed

        def false_branch(values: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
            return self.folding_bn(self.other(values))

        return torch.cond(inputs.sum() > 0, true_branch, false_branch, (inputs, mean))


def test_branch_bns_that_cannot_fold_are_kept_with_their_reason() -> None:
    model = nets.randomized(BranchBNs())
    result = fold(model, torch.randn(2, 3, 5, 5))

    kept = {(d.graph, d.reason) for d in result.report.kept}
    assert kept == {
        ("true_graph_0", Reason.PRODUCER_HAS_OTHER_CONSUMERS),
        ("true_graph_0", Reason.PARAM_NOT_CONSTANT),
    }
    assert [(d.node, d.graph, d.rule) for d in result.report.folded] == [
        ("folding_bn", "false_graph_0", "conv-bn")
    ]
    assert_same_function(result, model, *both_branches((2, 3, 5, 5)))


class ScanBody(nn.Module):
    """conv -> BN in a scan's combine function, added to the carry."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        def combine(carry: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            total = self.bn(self.conv(values)) + carry
            return total, total.clone()

        return scan(combine, torch.zeros_like(inputs[0]), inputs)[1]


class AutocastRegion(nn.Module):
    """A ``with torch.autocast(..., enabled=False):`` block, another subgraph of torch.export."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            features = self.bn(self.conv(inputs))
        return features + 1


class LoopBody(nn.Module):
    """conv -> BN applied three times by a while_loop (the weights are loop constants)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        def condition(step: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            return step < 3

        def body(step: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return step + 1, torch.tanh(self.bn(self.conv(values)))

        return while_loop(condition, body, (torch.tensor(0), inputs))[1]


class MapBody(nn.Module):
    """conv -> BN mapped over the leading axis."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return map_over(lambda values: self.bn(self.conv(values)), inputs)


class NoGradRegion(nn.Module):
    """A ``with torch.no_grad():`` block, which torch.export writes as a subgraph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.bn(self.conv(inputs))
        return features + 1


@pytest.mark.parametrize(
    ("model", "shape", "graph"),
    [
        (LoopBody(), (2, 4, 5, 5), "while_loop_body_graph_0"),
        (MapBody(), (3, 2, 4, 5, 5), "body_graph_0"),
        (NoGradRegion(), (2, 4, 5, 5), "submod_1"),
        (ScanBody(), (3, 2, 4, 5, 5), "scan_combine_graph_0"),
        (AutocastRegion(), (2, 4, 5, 5), "submod_1"),
    ],
    ids=["while_loop", "map", "no_grad", "scan", "autocast"],
)
def test_loop_map_scan_and_region_bodies_fold(model: nn.Module, shape: tuple[int, ...], graph: str) -> None:
    model = nets.randomized(model)
    before = tensors_of(model)
    result = fold(model, torch.randn(*shape), tracer="export")

    assert rows(result) == [("bn", graph, "folded", "conv-bn")]
    checked = [check.subgraph.split()[-1] for check in result.verification.local if check.status == "checked"]
    assert checked == [graph] and result.verification
    generator = torch.Generator().manual_seed(2)
    inputs = [torch.randn(batch, *shape[1:], generator=generator) for batch in (shape[0], shape[0] + 2)]
    assert_same_function(result, model, *inputs)
    assert_unchanged(model, before)


class NestedCond(nn.Module):
    """A cond inside a cond branch, with a conv -> BN in the inner true branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        def inner(values: torch.Tensor) -> torch.Tensor:
            return torch.cond(
                values.mean() > 0.5,
                lambda chosen: self.bn(self.conv(chosen)),
                lambda chosen: self.conv(chosen),
                (values,),
            )

        return torch.cond(inputs.sum() > 0, inner, lambda values: -self.conv(values), (inputs,))


def test_a_cond_inside_a_cond_branch_folds() -> None:
    model = nets.randomized(NestedCond())
    result = fold(model, torch.randn(2, 3, 4, 4))

    assert rows(result) == [("bn", "true_graph_0/true_graph_0", "folded", "conv-bn")]
    # The inner cond runs only inside the outer true branch: its operands come from a local run of it.
    statuses = {check.subgraph: check.status for check in result.verification.local}
    assert statuses == {
        "cond true_graph_0/true_graph_0": "checked",
        "cond true_graph_0/false_graph_0": "unchanged",
        "cond false_graph_0": "unchanged",
    }
    assert result.verification
    generator = torch.Generator().manual_seed(3)
    inputs = []
    for batch in (2, 5):
        small = torch.rand(batch, 3, 4, 4, generator=generator) * 0.5  # mean < 0.5: inner false
        inputs += [small + 0.01, small + 0.6, -small - 0.01]
    assert_same_function(result, model, *inputs)


def test_parameters_computed_by_the_caller_stay_operands() -> None:
    """Only operands the caller reads from module attributes become constants of a branch."""
    model = nets.randomized(BranchBNs())
    program = torch.export.export(model, (torch.randn(2, 3, 5, 5),))
    graph_module = program.module()
    cond = next(
        node for node in graph_module.graph.nodes if node.op == "call_function" and "cond" in node.name
    )
    before = [operand.op for operand in cond.args[3]]
    moved = localize_constants(graph_module)

    assert moved == before.count("get_attr") and moved > 0
    assert [operand.op for operand in cond.args[3]] == [op for op in before if op != "get_attr"]
    for branch in (graph_module.true_graph_0, graph_module.false_graph_0):
        placeholders = [node for node in branch.graph.nodes if node.op == "placeholder"]
        assert len(placeholders) == len(cond.args[3])
    values = torch.rand(2, 3, 5, 5) + 0.1
    with torch.no_grad():
        for inputs in (values, -values):
            torch.testing.assert_close(graph_module(inputs), model(inputs))


def test_subgraph_folds_do_not_rely_on_unchecked_input_ranks() -> None:
    """A GraphModule that is not torch.export's own has no enforced shapes: a fold in a branch that
    needs a rank its graph does not fix is refused (only top-level inputs get a rank check)."""
    model = nets.randomized(nets.CondNet())
    example = torch.randn(4, 5)
    exported = torch.export.export(model, (example,)).module()
    plain = torch.fx.GraphModule(exported, exported.graph).eval()
    result = bnfold.fold_module(plain, example)

    assert result.tracer == "graph-module"
    (branch,) = [d for d in result.report.decisions if d.graph == "true_graph_0"]
    assert (branch.outcome.value, branch.reason) == ("kept", Reason.SHAPE_DEPENDENT)
    assert_same_function(result, model, example, -example.abs() - 10, example.abs() + 10)


onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")


def test_folded_cond_exports_to_onnx_and_matches_on_both_branches() -> None:
    model = nets.randomized(SharedConvCond())
    example = torch.randn(2, 3, 6, 6)
    result = bnfold.export(model, example, None, exporter="dynamo", opset=18)

    assert len(result.report.folded) == 4 and not result.report.kept  # 3 BNs and the `* 2`
    assert result.onnx_report.decisions == []  # nothing left for the ONNX fold
    op_types = {node.op_type for node in result.model.graph.node}
    assert "If" in op_types
    assert not any(
        node.op_type == "BatchNormalization"
        for graph_node in result.model.graph.node
        for attribute in graph_node.attribute
        if attribute.type == onnx.AttributeProto.GRAPH
        for node in attribute.g.node
    )
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(result.model.SerializeToString(), options)
    (name,) = [value.name for value in session.get_inputs()]
    for values in both_branches((2, 3, 6, 6))[:2]:  # the export fixed the batch size
        (actual,) = session.run(None, {name: values.numpy()})
        with torch.no_grad():
            expected = model(values).numpy()
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def test_the_torchscript_exporter_refuses_cond_with_a_pointer_to_dynamo() -> None:
    model = nets.randomized(nets.CondNet())
    with pytest.raises(bnfold.BnfoldError, match="need exporter='dynamo'") as error:
        bnfold.export(model, torch.randn(4, 5), None, exporter="torchscript")
    assert "\n" not in str(error.value)
