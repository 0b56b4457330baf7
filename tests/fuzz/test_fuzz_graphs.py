"""Fuzzing: random valid graphs, and random mutations of them, through ``fold_onnx`` and ``verify``.

The contract, for every model: either bnfold refuses it cleanly (a ``BnfoldError`` with one line),
or it returns a folded model that passes ``onnx.checker`` and that ONNX Runtime shows computes the
same outputs. Along the way: every kept BN carries a reason code, no BN with degenerate statistics
is folded, and a fold never adds inf/NaN values to the model's constants.

Sizes (issue 12): the drawn graphs declare the batch and the spatial sizes symbolic wherever the
graph runs at size 1 too (ONNX Runtime is asked), so folds are decided without knowing them, and
each folded model is verified at the sizes it was built at (seed 0) and with every dynamic dim at 1
(seed 1). A fold that relies on a size fails here (checked by treating the reshape rules' symbolic
dims as 1: the Reshape test caught it in 6 of 8 seeds at the default 25 examples).

A short run is part of the normal test suite (25 examples per test, the default hypothesis profile
in tests/conftest.py). Fuzz longer on demand::

    BNFOLD_HYPOTHESIS_PROFILE=long .venv/bin/pytest tests/fuzz -q --hypothesis-show-statistics

(500 examples per test; add ``--hypothesis-seed N`` to explore elsewhere). A failure prints the
recipe (layers, dtype, opset, mutations) and hypothesis replays it from its example database.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import bnfold
from bnfold import BnfoldError, Outcome, Reason
from tests.fuzz.strategies import BREAKS_THE_FOLD, Recipe, graphs, mutations

BN = "BatchNormalization"
FUZZ_SETTINGS = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _value(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's value; empty when its data does not decode (a mutation may have broken it)."""
    try:
        return numpy_helper.to_array(tensor)
    except (ValueError, KeyError, TypeError):
        return np.zeros(0)


def _constants(model: onnx.ModelProto) -> list[np.ndarray]:
    values = [_value(tensor) for tensor in model.graph.initializer]
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                values.append(_value(attribute.t))
    return values


def _nonfinite_count(model: onnx.ModelProto) -> int:
    return sum(int(np.count_nonzero(~np.isfinite(v))) for v in _constants(model) if v.dtype.kind == "f")


def _passes_checker(model: onnx.ModelProto, full_check: bool) -> bool:
    try:
        onnx.checker.check_model(model, full_check=full_check)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError):
        return False
    return True


def _dynamic_dims(model: onnx.ModelProto) -> str:
    """Which input dims are symbolic: ``batch``, ``batch+spatial`` or ``none``."""
    dims = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else []
    named = [axis for axis, dim in enumerate(dims) if dim.dim_param]
    return "none" if not named else "batch" if named == [0] else "batch+spatial"


def fold_and_verify(
    model: onnx.ModelProto,
    degenerate: dict[str, str] | None = None,
    built_shapes: dict[str, list[int]] | None = None,
) -> str:
    """Run the contract on ``model``; return the outcome ("refused ..." or "verified ...").

    Verification runs twice: dynamic dims at ``built_shapes`` (default 1) with one seed, then every
    dynamic dim at a second size (1, or 3 after 1) with another; a model that rejects the second
    size is verified at the first only and the outcome says so."""
    with tempfile.TemporaryDirectory(prefix="bnfold-fuzz-") as directory:
        path = Path(directory) / "model.onnx"
        path.write_bytes(model.SerializeToString())
        try:
            result = bnfold.fold_onnx(path)  # loads and checks like the CLI does
        except BnfoldError as error:
            assert "\n" not in str(error)
            note(f"refused: {error}")
            return "refused on load"
        assert path.read_bytes() == model.SerializeToString(), "the input file changed"

    note(result.report.to_text())
    for decision in result.report.decisions:
        if decision.outcome is Outcome.KEPT:
            assert isinstance(decision.reason, Reason), decision
        if decision.outcome is Outcome.FOLDED:
            assert decision.reason is None and decision.rule, decision
    for name, kind in (degenerate or {}).items():
        if kind in BREAKS_THE_FOLD:
            decision = next(d for d in result.report.decisions if d.node == name)
            assert decision.outcome is not Outcome.FOLDED, f"{name} ({kind}) was folded"
    kept = [d for d in result.report.decisions if d.op_type == BN and d.outcome is Outcome.KEPT]
    remaining = [n for n in result.model.graph.node if n.op_type == BN and n.domain in ("", "ai.onnx")]
    assert len(remaining) == len(kept)
    assert _nonfinite_count(result.model) <= _nonfinite_count(model), "a fold made inf/NaN constants"
    assert _passes_checker(result.model, full_check=False), "the folded model fails onnx.checker"
    if _passes_checker(model, full_check=True):
        assert _passes_checker(result.model, full_check=True), "the folded model fails full_check"

    try:
        verification = bnfold.verify(model, result.model, provider="cpu", input_shapes=built_shapes)
    except BnfoldError as error:
        # Only the original may be what ONNX Runtime cannot load or run: never bnfold's output.
        assert "original model" in str(error) or "cannot generate" in str(error), str(error)
        assert "\n" not in str(error)
        note(f"refused: {error}")
        return "refused by ONNX Runtime"
    note(verification.to_text())
    if _dynamic_dims(model) == "none":
        sizes = "fixed sizes"
    elif any("second size" in line for line in verification.uncovered):
        sizes = "one size"
    else:
        sizes = "two sizes"
    if verification.passed:
        return f"verified at {sizes}, {len(result.report.folded)} folded"
    # A BN with inf statistics or an overflowing (or, in float16, large) scale feeds inf into what
    # follows, or magnifies last-place rounding differences past any tolerance: outputs behind one
    # may legitimately differ (and the CLI then writes nothing, exit 1). No other output may.
    failing = {output.name for output in verification.outputs if not output.passed}
    poisoned = _downstream(model, _poison_sources(model, result.report))
    assert failing <= poisoned, verification.to_text()
    return "mismatch behind an overflowing BN"


POISONING = (Reason.NONFINITE_STATISTICS, Reason.FOLD_OVERFLOWS_DTYPE)


def _poison_sources(model: onnx.ModelProto, report) -> set[str]:
    """Tensors that carry inf or amplified rounding: outputs of BNs kept for inf statistics or an
    overflowing scale, of BNs whose scale amplifies (whether kept or folded, and why), and of nodes
    that read a non-finite constant."""
    sources = {d.output for d in report.decisions if d.outcome is Outcome.KEPT and d.reason in POISONING}
    constants = {tensor.name: _value(tensor) for tensor in model.graph.initializer}
    for node in model.graph.node:
        if (
            node.op_type == "Constant"
            and node.attribute
            and node.attribute[0].type == onnx.AttributeProto.TENSOR
        ):
            constants[node.output[0]] = _value(node.attribute[0].t)
    nonfinite = {name for name, v in constants.items() if v.dtype.kind == "f" and not np.isfinite(v).all()}
    for node in model.graph.node:
        if any(name in nonfinite for name in node.input) or (
            node.op_type == BN and _amplifies(node, constants)
        ):
            sources.update(node.output)
    return sources


def _amplifies(bn: onnx.NodeProto, constants: dict[str, np.ndarray]) -> bool:
    """Whether the BN's scale overflows its dtype, or (float16) magnifies rounding noise: float16
    keeps 3 significant digits, so a scale of 30 (var = 0, epsilon = 1e-3) turns the last-place
    differences between two equally valid roundings into errors past the float16 tolerance."""
    if len(bn.input) < 5 or not all(name in constants for name in bn.input[1:5]):
        return False
    gamma, _, _, var = (constants[name] for name in bn.input[1:5])
    if gamma.dtype.kind != "f" or var.dtype.kind != "f" or gamma.shape != var.shape:
        return False
    epsilon = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    with np.errstate(all="ignore"):
        scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + epsilon)
        if not np.isfinite(scale.astype(gamma.dtype)).all():
            return True
    return gamma.dtype == np.float16 and bool(np.abs(scale).max(initial=0.0) > 8)


def _downstream(model: onnx.ModelProto, sources: set[str]) -> set[str]:
    reached = set(sources)
    changed = True
    while changed:  # to a fixed point: a mutated graph need not be sorted
        changed = False
        for node in model.graph.node:
            if any(name in reached for name in node.input) and not set(node.output) <= reached:
                reached.update(node.output)
                changed = True
    return reached


@FUZZ_SETTINGS
@given(graphs())
def test_random_valid_graphs_fold_and_verify(recipe: Recipe):
    outcome = fold_and_verify(recipe.model, recipe.degenerate, recipe.built_shapes)
    event(outcome.split(",")[0])
    event(f"dynamic: {_dynamic_dims(recipe.model)}")
    # Every graph the strategy draws is valid and runs: a refusal here would be a bnfold bug. The
    # strategy declares dynamic only the dims the graph accepts at 1: every fold is checked there too.
    assert not outcome.startswith("refused"), outcome
    assert "one size" not in outcome, outcome


@FUZZ_SETTINGS
@given(graphs(first="reshape_bn"))
def test_reshape_folds_hold_at_every_size_the_graph_accepts(recipe: Recipe):
    """Layer -> Reshape/Flatten -> BN with the batch (and spatial sizes) dynamic: whether the Reshape
    keeps the channels may depend on a size (``[-1, 2]`` of ``[N, 2]`` does, ``[1, -1]`` only at
    N = 1), so each fold is checked at the built sizes and at 1."""
    outcome = fold_and_verify(recipe.model, recipe.degenerate, recipe.built_shapes)
    event(outcome.split(",")[0])
    event(f"dynamic: {_dynamic_dims(recipe.model)}")
    assert not outcome.startswith("refused"), outcome
    assert "one size" not in outcome, outcome


@FUZZ_SETTINGS
@given(st.data())
def test_mutated_graphs_fold_and_verify_or_are_refused_cleanly(data):
    recipe = data.draw(graphs(), label="recipe")
    mutated, edits = data.draw(mutations(recipe.model), label="mutations")
    note(f"edits: {edits}")
    event(fold_and_verify(mutated).split(",")[0])


@FUZZ_SETTINGS
@given(graphs(), st.booleans())
def test_the_lazy_cli_path_writes_the_bytes_of_the_in_memory_fold(recipe: Recipe, external: bool):
    """What the CLI does (weights left on disk, new ones kept as arrays, streamed save) writes the same
    files as loading everything, folding in memory and saving: on random graphs, inline and with
    external data."""
    from bnfold.onnx.io import load_model, save_model

    with tempfile.TemporaryDirectory(prefix="bnfold-fuzz-") as directory:
        root = Path(directory)
        source = root / "in" / "model.onnx"
        source.parent.mkdir()
        if external:
            onnx.save_model(
                recipe.model,
                str(source),
                save_as_external_data=True,
                location="model.onnx.data",
                size_threshold=0,
            )
        else:
            source.write_bytes(recipe.model.SerializeToString())
        before = {path.name: path.read_bytes() for path in source.parent.iterdir()}

        eager, lazy = root / "eager" / "out.onnx", root / "lazy" / "out.onnx"  # one name: it is in the file
        eager.parent.mkdir(), lazy.parent.mkdir()
        save_model(bnfold.fold_onnx(source).model, eager, external_data=external)
        loaded = load_model(source, lazy=True)
        bnfold.fold_onnx(loaded.model, inplace=True)
        save_model(loaded.model, lazy, external_data=external)

        assert lazy.read_bytes() == eager.read_bytes()
        if external:
            data = "out.onnx.data"
            assert (lazy.parent / data).read_bytes() == (eager.parent / data).read_bytes()
        assert {path.name: path.read_bytes() for path in source.parent.iterdir()} == before
