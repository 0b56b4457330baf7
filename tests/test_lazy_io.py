"""Weights left on disk: lazy loads, folds that read and spill only what they change, and saves that
copy every untouched tensor's bytes from the input file (inline or external data) into the output."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
import bnfold.onnx.io as io
from bnfold import fold_onnx
from bnfold.errors import ModelLoadError
from bnfold.onnx.io import WeightStore, load_model, read_tensor, save_model, saving, store_tensor
from bnfold.provenance import record_provenance
from tests.builders import op_types, run
from tests.test_cli import in_process, snapshot, temporary_files
from tests.test_io import _save_external, run_path


def conv_bn_and_plain_conv(channels: int = 32, seed: int = 3) -> onnx.ModelProto:
    """x -Conv(W1)-> BN -> Conv(W2) -> y: W1 (and B1) change in the fold, W2 must come through as is."""
    rng = np.random.default_rng(seed)
    values = {
        "W1": rng.standard_normal((channels, channels, 3, 3)).astype(np.float32) * 0.1,
        "B1": rng.standard_normal(channels).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        "beta": rng.standard_normal(channels).astype(np.float32),
        "mean": rng.standard_normal(channels).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, channels).astype(np.float32),
        "W2": rng.standard_normal((channels, channels, 3, 3)).astype(np.float32) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["n1"], name="bn"),
        helper.make_node("Conv", ["n1", "W2"], ["y"], pads=[1, 1, 1, 1], name="conv2"),
    ]
    shape = [1, channels, 5, 5]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(value, name) for name, value in values.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def feeds(channels: int = 32) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((1, channels, 5, 5)).astype(np.float32)}


def external_bytes(model_path: Path, name: str) -> bytes:
    """The bytes of tensor ``name`` as the file stores them (external data file or raw_data)."""
    model = onnx.load(model_path, load_external_data=False)
    (tensor,) = [t for t in model.graph.initializer if t.name == name]
    if tensor.data_location != TensorProto.EXTERNAL:
        return tensor.raw_data
    info = {entry.key: entry.value for entry in tensor.external_data}
    with open(model_path.parent / info["location"], "rb") as handle:
        handle.seek(int(info.get("offset", 0)))
        return handle.read(int(info["length"]))


def test_lazy_load_leaves_large_weights_on_disk_and_saves_the_same_bytes(tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save_model(conv_bn_and_plain_conv(), source)
    output = tmp_path / "copy.onnx"

    loaded = load_model(source, lazy=True)
    save_model(loaded.model, output)

    on_disk = {t.name for t in loaded.model.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert on_disk == {"W1", "W2"}  # the 128-byte statistics are parsed as usual
    assert loaded.used_external_data is False
    assert output.read_bytes() == source.read_bytes()  # piecewise writing keeps protobuf's field order
    np.testing.assert_array_equal(
        read_tensor(loaded.model.graph.initializer[0]),
        numpy_helper.to_array(conv_bn_and_plain_conv().graph.initializer[0]),
    )


def test_external_data_fold_copies_untouched_tensors_byte_for_byte(tmp_path):
    original = conv_bn_and_plain_conv()
    source = _save_external(original, tmp_path / "model.onnx", "weights.bin")
    before = snapshot(tmp_path)
    output = tmp_path / "out" / "folded.onnx"
    output.parent.mkdir()

    ran = in_process(source, "-o", output, "-q")

    assert ran.code == 0, ran.output
    assert snapshot(tmp_path / "out") and all(
        snapshot(tmp_path)[name] == digest for name, digest in before.items()
    )
    assert sorted(p.name for p in output.parent.iterdir()) == ["folded.onnx", "folded.onnx.data"]
    assert external_bytes(output, "W2") == external_bytes(source, "W2")
    expected = fold_onnx(original).model  # the in-memory fold of the same model
    folded = load_model(output).model
    assert "BatchNormalization" not in op_types(folded)
    for name in ("W1", "B1", "W2"):
        np.testing.assert_array_equal(
            numpy_helper.to_array(next(t for t in folded.graph.initializer if t.name == name)),
            numpy_helper.to_array(next(t for t in expected.graph.initializer if t.name == name)),
            err_msg=name,
        )
    np.testing.assert_allclose(run_path(output, feeds())[0], run(original, feeds())[0], rtol=1e-4, atol=1e-4)
    assert temporary_files(tmp_path) == []


def test_inline_fold_through_the_cli_equals_the_in_memory_fold(tmp_path):
    original = conv_bn_and_plain_conv()
    source = tmp_path / "model.onnx"
    onnx.save_model(original, source)
    source_bytes = source.read_bytes()
    output = tmp_path / "folded.onnx"

    ran = in_process(source, "-o", output, "--no-verify", "-q")

    assert ran.code == 0, ran.output
    assert source.read_bytes() == source_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded.onnx", "model.onnx"]
    # The CLI writes what the in-memory fold gives, plus its provenance (metadata, doc strings).
    expected = fold_onnx(original)
    expected.report.source = str(source)
    record_provenance(
        expected.model,
        expected.report,
        version=bnfold.__version__,
        source_sha256=hashlib.sha256(source_bytes).hexdigest(),
    )
    assert output.read_bytes() == expected.model.SerializeToString()


def location_of(tensor: TensorProto) -> str:
    return {entry.key: entry.value for entry in tensor.external_data}["location"]


def test_a_fold_of_a_lazy_model_keeps_new_weights_in_memory_within_the_budget(tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save_model(conv_bn_and_plain_conv(), source)
    loaded = load_model(source, lazy=True)

    fold_onnx(loaded.model, inplace=True)

    weights = {t.name: t for t in loaded.model.graph.initializer}
    # The new weight is the fold's array, referred to from the tensor, not copied into raw_data.
    assert weights["W1"].data_location == TensorProto.EXTERNAL and not weights["W1"].HasField("raw_data")
    assert location_of(weights["W1"]).startswith(io.MEMORY_LOCATION)
    assert location_of(weights["W2"]) == str(source.resolve())  # untouched: still on disk
    assert weights["B1"].HasField("raw_data")  # small: in the protobuf as usual
    expected = {t.name: t for t in fold_onnx(conv_bn_and_plain_conv()).model.graph.initializer}
    value = read_tensor(weights["W1"])
    assert np.shares_memory(value, read_tensor(weights["W1"]))  # the same array each time, no copy
    np.testing.assert_array_equal(value, numpy_helper.to_array(expected["W1"]))
    assert value.dtype == np.float32 and value.shape == (32, 32, 3, 3)
    assert not value.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        value[0, 0, 0, 0] = 1.0
    # What a rule reads back through the graph index is that array too.
    from bnfold.onnx.graph import GraphIndex, ModelContext

    index = GraphIndex(loaded.model.graph, ModelContext(loaded.model))
    assert np.shares_memory(index.constant("W1").value, value)


def saved_in(directory: Path, model: onnx.ModelProto, external: bool) -> Path:
    """``model`` saved as ``directory/model.onnx`` (a new directory), with external data or inline."""
    directory.mkdir()
    source = directory / "model.onnx"
    if external:
        return _save_external(model, source, "model.data")
    onnx.save_model(model, source)
    return source


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
@pytest.mark.parametrize("budget", [None, 32 * 32 * 9 * 4, 0], ids=["memory", "memory+spill", "spill"])
def test_a_lazy_fold_saves_the_bytes_of_the_in_memory_fold(external, budget, tmp_path):
    original = bn_after_both_convs()
    source = saved_in(tmp_path / "in", original, external)
    before = snapshot(source.parent)
    loaded = load_model(source, lazy=True, store=WeightStore(budget))
    fold_onnx(loaded.model, inplace=True, store=loaded.store)
    lazy_output, plain_output = tmp_path / "lazy" / "out.onnx", tmp_path / "plain" / "out.onnx"
    lazy_output.parent.mkdir()
    plain_output.parent.mkdir()

    save_model(loaded.model, lazy_output, external_data=external)
    in_memory = fold_onnx(source).model  # loaded whole (external data included), folded in memory
    save_model(in_memory, plain_output, external_data=external)

    assert lazy_output.read_bytes() == plain_output.read_bytes()
    if external:
        data = tmp_path / "lazy" / "out.onnx.data"
        assert data.read_bytes() == (tmp_path / "plain" / "out.onnx.data").read_bytes()
    else:
        assert lazy_output.read_bytes() == in_memory.SerializeToString()
        assert lazy_output.read_bytes() == fold_onnx(original).model.SerializeToString()
    assert snapshot(source.parent) == before  # the input files are never written
    assert temporary_files(tmp_path) == []


def test_models_not_loaded_lazily_get_self_contained_new_weights(tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save_model(conv_bn_and_plain_conv(), source)
    proto = conv_bn_and_plain_conv()
    unloaded = _save_external(conv_bn_and_plain_conv(), tmp_path / "ext.onnx", "ext.data")

    expected = fold_onnx(conv_bn_and_plain_conv()).model.SerializeToString()
    for result in (fold_onnx(source), fold_onnx(proto), fold_onnx(proto, inplace=True)):
        assert not io.has_data_on_disk(result.model)
        assert all(t.HasField("raw_data") for t in result.model.graph.initializer)
        assert result.model.SerializeToString() == expected
    # External data that was not loaded is not a lazy load: a fold does not put new weights in memory.
    assert not io.is_lazy(onnx.load(unloaded, load_external_data=False))


def test_read_tensor_maps_the_file_read_only(tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save_model(conv_bn_and_plain_conv(), source)
    loaded = load_model(source, lazy=True)
    (weight,) = [t for t in loaded.model.graph.initializer if t.name == "W2"]

    value = read_tensor(weight)

    assert not value.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        value[0, 0, 0, 0] = 1.0
    source.unlink()  # the mapping outlives the file's name, as after an in-place fold's rename
    np.testing.assert_array_equal(
        value, numpy_helper.to_array(conv_bn_and_plain_conv().graph.initializer[-1])
    )


def bn_after_both_convs(channels: int = 32) -> onnx.ModelProto:
    """x -Conv(W1)-> BN -> Conv(W2) -> BN -> y: two new weights of channels x channels x 3 x 3."""
    model = conv_bn_and_plain_conv(channels)
    rng = np.random.default_rng(5)
    stats = [rng.uniform(0.5, 1.5, channels), rng.standard_normal(channels), rng.standard_normal(channels)]
    stats.append(rng.uniform(0.5, 2.0, channels))
    names = ["gamma2", "beta2", "mean2", "var2"]
    model.graph.initializer.extend(
        numpy_helper.from_array(value.astype(np.float32), name)
        for name, value in zip(names, stats, strict=True)
    )
    model.graph.node[-1].output[0] = "c2"
    model.graph.node.append(helper.make_node("BatchNormalization", ["c2", *names], ["y"], name="bn2"))
    return model


def test_new_weights_beyond_the_budget_go_to_the_spill_file(tmp_path):
    channels = 32
    model = bn_after_both_convs(channels)
    source = tmp_path / "model.onnx"
    onnx.save_model(model, source)
    weight_bytes = channels * channels * 9 * 4
    loaded = load_model(source, lazy=True, store=WeightStore(weight_bytes))  # room for one new weight

    fold_onnx(loaded.model, inplace=True, store=loaded.store)

    weights = {t.name: t for t in loaded.model.graph.initializer}
    assert location_of(weights["W1"]).startswith(io.MEMORY_LOCATION)  # the first fits the budget
    location = location_of(weights["W2"])
    assert weights["W2"].data_location == TensorProto.EXTERNAL and location != str(source.resolve())
    assert os.path.isabs(location)  # the spill file
    expected = {t.name: t for t in fold_onnx(model).model.graph.initializer}
    np.testing.assert_array_equal(read_tensor(weights["W2"]), numpy_helper.to_array(expected["W2"]))
    output = tmp_path / "folded.onnx"
    save_model(loaded.model, output)
    assert output.read_bytes() == fold_onnx(model).model.SerializeToString()


def test_the_memory_budget_is_the_stores_that_the_folds_share(tmp_path):
    # A service gives all its folds one store (one budget): the second fold's weights find the
    # budget used by the first and go to the spill file.
    channels = 32
    source = tmp_path / "model.onnx"
    onnx.save_model(bn_after_both_convs(channels), source)
    with WeightStore(memory_budget=2 * channels * channels * 9 * 4) as shared:
        first = load_model(source, lazy=True, store=shared)
        second = load_model(source, lazy=True, store=shared)

        fold_onnx(first.model, inplace=True, store=shared)
        fold_onnx(second.model, inplace=True, store=shared)

        locations = [location_of(t) for t in second.model.graph.initializer if t.name in ("W1", "W2")]
        assert not any(location.startswith(io.MEMORY_LOCATION) for location in locations)
        assert shared.memory_bytes == 2 * channels * channels * 9 * 4
        assert shared.spill_bytes == 2 * channels * channels * 9 * 4
        assert all(location == shared.spill_path for location in locations)


def test_each_lazy_load_has_a_store_of_its_own_with_a_budget_of_its_own(tmp_path):
    channels = 32
    source = tmp_path / "model.onnx"
    onnx.save_model(bn_after_both_convs(channels), source)
    first, second = load_model(source, lazy=True), load_model(source, lazy=True)

    fold_onnx(first.model, inplace=True, store=first.store)
    fold_onnx(second.model, inplace=True, store=second.store)

    assert first.store is not second.store
    for loaded in (first, second):  # neither fold used the other's budget: both kept theirs in memory
        assert loaded.store.memory_bytes == 2 * channels * channels * 9 * 4
        assert loaded.store.spill_bytes == 0
        for tensor in loaded.model.graph.initializer:
            if tensor.name in ("W1", "W2"):
                assert location_of(tensor).startswith(io.MEMORY_LOCATION)


def test_closing_a_store_frees_its_weights_and_a_model_that_refers_to_them_says_so(tmp_path):
    channels = 32
    source = tmp_path / "model.onnx"
    onnx.save_model(bn_after_both_convs(channels), source)
    with load_model(source, lazy=True, store=WeightStore(channels * channels * 9 * 4)) as loaded:
        fold_onnx(loaded.model, inplace=True, store=loaded.store)
        spill = Path(loaded.store.spill_path)
        assert spill.exists() and loaded.store.memory_bytes > 0
        weights = {t.name: t for t in loaded.model.graph.initializer}
        save_model(loaded.model, tmp_path / "while-open.onnx")  # fine while the store is open

    assert loaded.store.closed and loaded.store.memory_bytes == 0
    assert not spill.exists()  # the spill file is deleted with its store
    with pytest.raises(ModelLoadError, match="weight store that is closed"):
        read_tensor(weights["W1"])  # was in the store's memory
    with pytest.raises(ModelLoadError, match="no longer exists"):
        read_tensor(weights["W2"])  # was in its spill file
    with pytest.raises(ModelLoadError, match="weight store that is closed"):
        save_model(loaded.model, tmp_path / "after-close.onnx")
    assert not (tmp_path / "after-close.onnx").exists()
    with pytest.raises(ValueError, match="closed"):
        loaded.store.keep(TensorProto(), np.zeros(4, np.float32))
    expected = fold_onnx(bn_after_both_convs(channels)).model.SerializeToString()
    assert (tmp_path / "while-open.onnx").read_bytes() == expected


def test_a_store_lives_as_long_as_its_owner(tmp_path):
    # A service that folds model after model and drops each result holds nothing between folds: no
    # store, no spill file. The store belongs to its owner, never to the process.
    import gc
    import weakref

    channels = 32
    source = tmp_path / "model.onnx"
    onnx.save_model(bn_after_both_convs(channels), source)
    expected = {t.name: t for t in fold_onnx(bn_after_both_convs(channels)).model.graph.initializer}
    for round_number in range(3):
        # fold_file: the result owns the store of the model it loaded.
        result = bnfold.fold_file(source, tmp_path / f"out{round_number}.onnx", verify=False)
        assert result.store is not None and result.store.memory_bytes == 2 * channels * channels * 9 * 4
        weight = next(t for t in result.model.graph.initializer if t.name == "W1")
        file_store = weakref.ref(result.store)
        del result
        assert file_store() is None  # released at once, not at some later garbage collection
        with pytest.raises(ModelLoadError, match="weight store that is closed"):
            read_tensor(weight)

        # fold_onnx: a lazily loaded model's new weights go to its loaded model's store ...
        loaded = load_model(source, lazy=True)
        held = fold_onnx(loaded.model, inplace=True)
        assert held.store is loaded.store
        del held
        gc.collect()
        weight = next(t for t in loaded.model.graph.initializer if t.name == "W1")
        np.testing.assert_array_equal(read_tensor(weight), numpy_helper.to_array(expected["W1"]))
        # ... and when that was dropped, to a store the result owns.
        orphan = load_model(source, lazy=True).model
        own = fold_onnx(orphan, inplace=True)
        assert own.store is not None and own.store is not loaded.store
        weight = next(t for t in own.model.graph.initializer if t.name == "W1")
        np.testing.assert_array_equal(read_tensor(weight), numpy_helper.to_array(expected["W1"]))
        own_store = weakref.ref(own.store)
        del own, loaded
        assert own_store() is None
        with pytest.raises(ModelLoadError, match="weight store that is closed"):
            read_tensor(weight)


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_the_cli_verifies_a_fold_whose_weights_are_in_memory_and_spilled(external, tmp_path):
    original = bn_after_both_convs()
    source = saved_in(tmp_path / "in", original, external)
    before = snapshot(source.parent)
    output = tmp_path / "folded.onnx"

    budget = str(32 * 32 * 9 * 4)  # W1 in memory, W2 spilled
    ran = in_process(
        source,
        "-o",
        output,
        "--provider",
        "cpu",
        "--report",
        tmp_path / "report.json",
        "--memory-budget",
        budget,
    )

    assert ran.code == 0, ran.output
    report = (tmp_path / "report.json").read_text()
    assert '"passed": true' in report
    assert snapshot(source.parent) == before
    assert (tmp_path / "folded.onnx.data").exists() == external
    assert "BatchNormalization" not in op_types(load_model(output).model)
    np.testing.assert_allclose(run_path(output, feeds())[0], run(original, feeds())[0], rtol=1e-4, atol=1e-4)
    assert temporary_files(tmp_path) == []


def test_a_fold_of_a_lazy_model_spills_new_weights_to_disk(tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save_model(conv_bn_and_plain_conv(), source)
    loaded = load_model(source, lazy=True, store=WeightStore(memory_budget=0))

    fold_onnx(loaded.model, inplace=True, store=loaded.store)

    (weight,) = [t for t in loaded.model.graph.initializer if t.name == "W1"]
    location = location_of(weight)
    assert weight.data_location == TensorProto.EXTERNAL and location != str(source.resolve())
    assert os.path.isabs(location)  # the spill file: nothing in memory
    expected = fold_onnx(conv_bn_and_plain_conv()).model
    (want,) = [t for t in expected.graph.initializer if t.name == "W1"]
    np.testing.assert_array_equal(read_tensor(weight), numpy_helper.to_array(want))


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_lazy_models_save_either_way(external, tmp_path):
    original = conv_bn_and_plain_conv()
    source = tmp_path / "model.onnx"
    if external:
        _save_external(original, source, "model.data")
    else:
        onnx.save_model(original, source)
    loaded = load_model(source, lazy=True)
    fold_onnx(loaded.model, inplace=True)

    for as_external in (False, True):
        output = tmp_path / f"out_{as_external}.onnx"
        save_model(loaded.model, output, external_data=as_external)
        assert (tmp_path / f"out_{as_external}.onnx.data").exists() == as_external
        onnx.checker.check_model(str(output))
        np.testing.assert_allclose(
            run_path(output, feeds())[0], run(original, feeds())[0], rtol=1e-4, atol=1e-4
        )


def test_lazy_load_still_refuses_raw_data_shorter_than_its_shape(tmp_path):
    model = conv_bn_and_plain_conv()
    (weight,) = [t for t in model.graph.initializer if t.name == "W2"]
    weight.raw_data = weight.raw_data[:-4]
    source = tmp_path / "model.onnx"
    onnx.save_model(model, source)

    for lazy in (False, True):
        with pytest.raises(ModelLoadError, match="is too small for the declared shape"):
            load_model(source, lazy=lazy)


def test_lazy_load_of_a_truncated_file_gives_the_parse_error(tmp_path):
    source = tmp_path / "model.onnx"
    source.write_bytes(conv_bn_and_plain_conv().SerializeToString()[:-3000])

    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        load_model(source, lazy=True)


def test_external_ranges_outside_the_data_file_are_refused_lazily(tmp_path):
    source = _save_external(conv_bn_and_plain_conv(), tmp_path / "model.onnx", "model.data")
    data = tmp_path / "model.data"
    data.write_bytes(data.read_bytes()[:5000])

    with pytest.raises(ModelLoadError, match="cannot load its external data.*lie outside"):
        load_model(source, lazy=True)


def test_models_over_the_limit_from_a_lazy_load_get_external_data(tmp_path, monkeypatch):
    source = tmp_path / "model.onnx"
    onnx.save_model(conv_bn_and_plain_conv(), source)
    monkeypatch.setattr(saving, "PROTOBUF_LIMIT", 50_000)
    output = tmp_path / "folded.onnx"

    ran = in_process(source, "-o", output, "-q", "--provider", "cpu")

    assert ran.code == 0, ran.output
    assert (tmp_path / "folded.onnx.data").exists()
    np.testing.assert_allclose(
        run_path(output, feeds())[0], run(conv_bn_and_plain_conv(), feeds())[0], rtol=1e-4, atol=1e-4
    )


PEAK = """
import sys
from bnfold.cli import main
try:
    main(sys.argv[1:])
finally:
    line = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]
    sys.stderr.write('PEAK_KB ' + line.split()[1] + '\\n')
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_folding_a_large_external_model_keeps_its_weights_out_of_memory(tmp_path):
    from benchmarks.fold_speed import vgg_style_external_model

    source = tmp_path / "model.onnx"
    layers = vgg_style_external_model(0.42, source)  # 12 x 36 MB weights with external data
    data_size = (tmp_path / "model.onnx.data").stat().st_size
    output = tmp_path / "folded.onnx"

    ran = subprocess.run(
        # --memory-budget 36M: one new weight in memory, the rest spilled
        [
            sys.executable,
            "-c",
            PEAK,
            str(source),
            "-o",
            str(output),
            "--no-verify",
            "-q",
            "--memory-budget",
            "36M",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )

    assert ran.returncode == 0, ran.stderr
    peak_mb = int(ran.stderr.rsplit("PEAK_KB ", 1)[1].split()[0]) / 1024
    assert peak_mb < 300 + 36, f"peak RSS {peak_mb:.0f} MB for {layers} weights of 36 MB"
    assert "BatchNormalization" not in op_types(onnx.load(output, load_external_data=False))
    assert (tmp_path / "folded.onnx.data").stat().st_size >= data_size


def test_a_byte_swapped_value_is_stored_as_its_numbers_not_its_bytes():
    tensor = TensorProto(name="w")
    store_tensor(tensor, np.arange(3, dtype=">f4"))
    np.testing.assert_array_equal(numpy_helper.to_array(tensor), [0.0, 1.0, 2.0])


def test_a_lazy_model_whose_source_was_saved_over_says_so_instead_of_reading_other_bytes(tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save_model(conv_bn_and_plain_conv(), source)  # the plain conv's weight stays in the source
    loaded = load_model(source, lazy=True)
    fold_onnx(loaded.model, inplace=True)
    save_model(loaded.model, source)  # in place: a new file is renamed over the one the model points into

    with pytest.raises(ModelLoadError, match="changed since the model was loaded lazily"):
        save_model(loaded.model, tmp_path / "again.onnx")
    assert not (tmp_path / "again.onnx").exists()
    # The file written in place is complete and loads again.
    assert "BatchNormalization" not in op_types(load_model(source).model)


@pytest.mark.parametrize(
    ("size", "expected"),
    [("0", 0), ("4096", 4096), ("64K", 2**16), ("36M", 36 * 2**20), ("2G", 2 * 2**30), ("1.5MiB", 3 * 2**19)],
)
def test_memory_budget_sizes_read_as_people_write_them(size, expected):
    from bnfold.cli_types import ByteSize

    assert ByteSize().convert(size, None, None) == expected


def test_the_cli_memory_budget_decides_what_is_spilled(tmp_path):
    source = tmp_path / "model.onnx"
    onnx.save_model(bn_after_both_convs(), source)
    weight_bytes = 32 * 32 * 9 * 4
    for budget, spilled in (("0", 2), ("36K", 1), ("1G", 0)):
        report = tmp_path / f"report{budget}.json"
        ran = in_process(
            source, "-o", tmp_path / "out.onnx", "-q", "--memory-budget", budget, "--report", report
        )
        assert ran.code == 0, ran.output
        kept = json.loads(report.read_text())["new_weights"]
        assert kept["spilled_bytes"] == spilled * weight_bytes
        assert kept["in_memory_bytes"] == (2 - spilled) * weight_bytes
    for bad in ("lots", "inf", "nan", "1e400G", "-1M"):
        ran = in_process(source, "-o", tmp_path / "bad.onnx", "--memory-budget", bad)
        errors = [line for line in ran.output.splitlines() if line.startswith("Error:")]
        assert ran.code == 2 and len(errors) == 1 and "Traceback" not in ran.output, ran.output
        assert "is not a size" in ran.output or "is negative" in ran.output, ran.output
        assert not (tmp_path / "bad.onnx").exists()
