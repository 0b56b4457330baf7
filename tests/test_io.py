"""Model files: clear load errors, atomic writes, and external data kept, round-tripped and runnable."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import bnfold.onnx.io as io
from bnfold.cli import cli
from bnfold.errors import ModelLoadError, OutputError
from bnfold.onnx.io import check_output_path, load_model, save_model, saving, write_atomically
from tests.builders import conv_bn_model, op_types, run


def big_conv_model() -> onnx.ModelProto:
    """Conv with 64x64x3x3 weights (147 kB): well over the external-data threshold."""
    return conv_bn_model(in_channels=64, out_channels=64, seed=1)


def x_feeds(channels: int, batch: int = 2) -> dict[str, np.ndarray]:
    shape = (batch, channels, 7, 7)
    return {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def run_path(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a file by path, so ONNX Runtime itself resolves its external data beside it."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def temporary_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob(".*.tmp"))


def external_locations(model: onnx.ModelProto) -> dict[str, dict[str, str]]:
    return {
        tensor.name: {entry.key: entry.value for entry in tensor.external_data}
        for tensor in model.graph.initializer
        if tensor.data_location == TensorProto.EXTERNAL
    }


# -- atomic writes -------------------------------------------------------------------------------
def _fail_replace_onto(monkeypatch, target: Path, error: BaseException):
    real_replace = os.replace

    def replace(source, destination, *args, **kwargs):
        if Path(destination) == target:
            raise error
        return real_replace(source, destination, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_failed_rename_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous model")
    _fail_replace_onto(monkeypatch, target, OSError(28, "No space left on device"))

    with pytest.raises(OSError, match="No space left"):
        save_model(conv_bn_model(), target)

    assert target.read_bytes() == b"previous model"
    assert temporary_files(tmp_path) == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.onnx"]


def test_failed_write_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous model")

    def no_space(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)

    with pytest.raises(OSError):
        save_model(conv_bn_model(), target)

    assert target.read_bytes() == b"previous model"
    assert temporary_files(tmp_path) == []


def test_interrupt_midway_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "report.json"

    def interrupted(descriptor):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, b"{}")

    assert list(tmp_path.iterdir()) == []


def test_failed_external_data_write_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    _fail_replace_onto(monkeypatch, target.with_name("out.onnx.data"), OSError(5, "I/O error"))
    model = big_conv_model()
    before = model.SerializeToString()

    with pytest.raises(OSError):
        save_model(model, target, external_data=True)

    assert list(tmp_path.iterdir()) == []
    assert model.SerializeToString() == before  # weights restored into the model


def test_write_atomically_replaces_content(tmp_path):
    target = tmp_path / "a.json"
    write_atomically(target, b"one")
    write_atomically(target, b"two")

    assert target.read_bytes() == b"two"
    assert list(tmp_path.iterdir()) == [target]


def test_new_files_get_the_umask_mode_and_existing_files_keep_theirs(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    fresh = tmp_path / "fresh.onnx"
    save_model(conv_bn_model(), fresh)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask

    existing = tmp_path / "existing.onnx"
    existing.write_bytes(b"old")
    existing.chmod(0o640)
    save_model(conv_bn_model(), existing, external_data=True)
    assert existing.stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "existing.onnx.data").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("name", ["missing/out.onnx", "."])
def test_check_output_path_refuses_unwritable_targets(tmp_path, name):
    with pytest.raises(OutputError):
        check_output_path(tmp_path / name)


# -- external data -------------------------------------------------------------------------------
def test_external_data_round_trip(tmp_path):
    model = big_conv_model()
    before = model.SerializeToString()
    target = tmp_path / "out.onnx"

    save_model(model, target, external_data=True)

    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    assert model.SerializeToString() == before  # save must not strip the in-memory weights
    assert all(t.data_location != TensorProto.EXTERNAL for t in model.graph.initializer)

    on_disk = onnx.load(target, load_external_data=False)
    locations = external_locations(on_disk)
    assert set(locations) == {"W"}  # the small BN/bias tensors stay inline
    assert locations["W"]["location"] == "out.onnx.data"
    assert int(locations["W"]["offset"]) % 4096 == 0
    assert int(locations["W"]["length"]) == 64 * 64 * 3 * 3 * 4

    loaded = load_model(target)
    assert loaded.used_external_data is True
    assert_same_tensors(loaded.model, model)

    feeds = x_feeds(64)
    (expected,) = run(model, feeds)
    (actual,) = run_path(target, feeds)
    np.testing.assert_array_equal(actual, expected)


def test_inline_model_loads_without_external_data(tmp_path):
    target = tmp_path / "model.onnx"
    save_model(big_conv_model(), target)

    assert [path.name for path in tmp_path.iterdir()] == ["model.onnx"]
    assert load_model(target).used_external_data is False


def _available_memory_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


@pytest.mark.slow
@pytest.mark.skipif(_available_memory_gb() < 8, reason="needs about 6 GB of free memory")
def test_a_model_over_2gb_is_recognised_as_too_big():
    # upb's ByteSize() raises EncodeError past 2 GB instead of returning the size; bnfold crashed
    # on every model over 2 GB (exit 3) before it caught that.
    model = onnx.ModelProto()
    tensor = model.graph.initializer.add()
    tensor.name = "huge"
    tensor.raw_data = bytes(2**31)

    assert io.exceeds_protobuf_limit(model) is True
    del tensor, model


def test_small_model_is_not_too_big():
    assert io.exceeds_protobuf_limit(big_conv_model()) is False


def test_models_over_the_limit_get_external_data_by_default(tmp_path, monkeypatch):
    # Stand-in for a model over 2 GB: lower the limit instead of allocating gigabytes.
    monkeypatch.setattr(saving, "PROTOBUF_LIMIT", 100_000)
    target = tmp_path / "model.onnx"

    save_model(big_conv_model(), target)

    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert load_model(target).used_external_data is True  # checked by path, external data and all


def test_cli_writes_external_data_for_a_model_over_the_limit(tmp_path, monkeypatch):
    source = tmp_path / "model.onnx"
    onnx.save_model(big_conv_model(), source)  # inline
    monkeypatch.setattr(saving, "PROTOBUF_LIMIT", 100_000)
    output = tmp_path / "folded.onnx"

    code, text = _fold_cli(source, "-o", output, "-q")

    assert code == 0, text
    assert (tmp_path / "folded.onnx.data").exists()
    run_path(output, x_feeds(64))


def _save_external(model: onnx.ModelProto, path: Path, location: str) -> Path:
    # onnx.save_model moves the tensors of the model it is given out to the file: save a copy.
    onnx.save_model(
        copy.deepcopy(model),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return path


def tensors_of(graph: onnx.GraphProto) -> list[TensorProto]:
    """Initializers and Constant values of ``graph`` and its subgraphs, in a fixed order."""
    tensors = list(graph.initializer)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                tensors.append(attribute.t)
            elif attribute.type == onnx.AttributeProto.GRAPH:
                tensors += tensors_of(attribute.g)
    return tensors


def assert_same_tensors(actual: onnx.ModelProto, expected: onnx.ModelProto) -> None:
    """Same tensors by value (onnx's loader marks loaded tensors with an explicit DEFAULT location)."""
    actual_tensors = [(t.name, numpy_helper.to_array(t)) for t in tensors_of(actual.graph)]
    expected_tensors = [(t.name, numpy_helper.to_array(t)) for t in tensors_of(expected.graph)]
    assert [name for name, _ in actual_tensors] == [name for name, _ in expected_tensors]
    for (name, got), (_, want) in zip(actual_tensors, expected_tensors, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert all(t.data_location != TensorProto.EXTERNAL for t in tensors_of(actual.graph))


def _fold_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(arg) for arg in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def test_cli_keeps_external_data(tmp_path):
    original = big_conv_model()
    source = _save_external(original, tmp_path / "model.onnx", "weights.bin")
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    output = tmp_path / "folded.onnx"

    code, text = _fold_cli(source, "-o", output, "-q")

    assert code == 0, text
    assert (tmp_path / "folded.onnx.data").exists()
    assert external_locations(onnx.load(output, load_external_data=False))
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.name in before} == before
    folded = load_model(output)
    assert folded.used_external_data
    assert "BatchNormalization" not in op_types(folded.model)
    feeds = x_feeds(64)
    (expected,) = run(original, feeds)
    (actual,) = run_path(output, feeds)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
    assert temporary_files(tmp_path) == []


def test_cli_external_data_into_another_directory(tmp_path):
    # The output's external data must sit beside the output, not be referenced from the input.
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    source = _save_external(big_conv_model(), tmp_path / "in" / "model.onnx", "model.data")
    output = tmp_path / "out" / "folded.onnx"

    code, text = _fold_cli(source, "-o", output, "-q")

    assert code == 0, text
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "folded.onnx",
        "folded.onnx.data",
    ]
    run_path(output, x_feeds(64))


def test_cli_folds_in_place_with_external_data(tmp_path):
    original = big_conv_model()
    source = _save_external(original, tmp_path / "model.onnx", "model.onnx.data")

    code, text = _fold_cli(source, "-o", source, "-q")

    assert code == 0, text
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    feeds = x_feeds(64)
    (expected,) = run(original, feeds)
    (actual,) = run_path(source, feeds)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("flag", "expect_data"), [("--no-external-data", False), ("--external-data", True)])
def test_cli_external_data_flags_override_the_input(tmp_path, flag, expect_data):
    model = big_conv_model()
    if expect_data:
        source = tmp_path / "model.onnx"
        onnx.save_model(model, source)
    else:
        source = _save_external(model, tmp_path / "model.onnx", "model.data")
    output = tmp_path / "folded.onnx"

    code, text = _fold_cli(source, "-o", output, "-q", flag)

    assert code == 0, text
    assert (tmp_path / "folded.onnx.data").exists() == expect_data
    assert load_model(output).used_external_data == expect_data
    run_path(output, x_feeds(64))


def _if_model_with_subgraph_weight() -> onnx.ModelProto:
    """y = If(c, a @ W_then, a): the only big tensor is an initializer of a subgraph."""
    weight = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["a", "W_then"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 16])],
        [numpy_helper.from_array(weight, "W_then")],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 16])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        "if",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 16]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def test_external_data_of_a_subgraph_initializer_is_loaded(tmp_path):
    model = _if_model_with_subgraph_weight()
    source = _save_external(model, tmp_path / "model.onnx", "model.data")
    (tmp_path / "out").mkdir()
    output = tmp_path / "out" / "folded.onnx"

    loaded = load_model(source)
    code, text = _fold_cli(source, "-o", output, "-q")

    assert loaded.used_external_data is True
    assert_same_tensors(loaded.model, model)
    assert code == 0, text
    feeds = {"a": np.ones((2, 16), np.float32), "c": np.array(True)}
    np.testing.assert_array_equal(run_path(output, feeds)[0], run(model, feeds)[0])


def test_external_data_of_a_constant_node_is_loaded(tmp_path):
    weight = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(weight, "W")),
            helper.make_node("MatMul", ["a", "W"], ["y"]),
        ],
        "constant",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    source = tmp_path / "model.onnx"
    onnx.save_model(
        copy.deepcopy(model),
        source,
        save_as_external_data=True,
        location="model.data",
        size_threshold=0,
        convert_attribute=True,
    )
    assert (tmp_path / "model.data").exists()

    loaded = load_model(source)

    assert loaded.used_external_data is True
    assert_same_tensors(loaded.model, model)


# -- load errors ---------------------------------------------------------------------------------
def test_missing_external_data_file(tmp_path):
    source = _save_external(big_conv_model(), tmp_path / "model.onnx", "model.data")
    (tmp_path / "model.data").unlink()

    with pytest.raises(ModelLoadError, match="external data"):
        load_model(source)


def test_truncated_external_data_file(tmp_path):
    source = _save_external(big_conv_model(), tmp_path / "model.onnx", "model.data")
    data = tmp_path / "model.data"
    data.write_bytes(data.read_bytes()[:100])

    with pytest.raises(ModelLoadError, match="external data"):
        load_model(source)


def test_external_data_outside_the_model_directory(tmp_path):
    (tmp_path / "models").mkdir()
    _save_external(big_conv_model(), tmp_path / "elsewhere.onnx", "secret.data")
    escaped = onnx.load(tmp_path / "elsewhere.onnx", load_external_data=False)
    for tensor in escaped.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.data"
    source = tmp_path / "models" / "model.onnx"
    onnx.save_model(escaped, source)

    with pytest.raises(ModelLoadError, match="external data"):
        load_model(source)


def test_load_errors_name_the_file_and_the_problem(tmp_path):
    missing = tmp_path / "missing.onnx"
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff" * 64)
    no_graph = tmp_path / "no_graph.onnx"
    no_graph.write_bytes(onnx.ModelProto(ir_version=8).SerializeToString())
    invalid = conv_bn_model()
    invalid.graph.node[0].input[0] = "undefined"
    invalid_path = tmp_path / "invalid.onnx"
    onnx.save_model(invalid, invalid_path)

    cases = [
        (missing, "no such file"),
        (tmp_path, "is a directory"),
        (empty, "file is empty"),
        (garbage, "not an ONNX model"),
        (no_graph, "no graph, opset or IR version"),
        (invalid_path, "invalid ONNX model"),
    ]
    for path, message in cases:
        with pytest.raises(ModelLoadError) as caught:
            load_model(path)
        assert str(path) in str(caught.value)
        assert message in str(caught.value)
        assert "\n" not in str(caught.value)


def test_load_without_check_accepts_what_the_checker_refuses(tmp_path):
    invalid = conv_bn_model()
    invalid.graph.node[0].input[0] = "undefined"
    path = tmp_path / "invalid.onnx"
    onnx.save_model(invalid, path)

    assert load_model(path, check=False).model.graph.node[0].input[0] == "undefined"
