"""Hostile and broken inputs, degenerate statistics, atomic outputs and interrupted runs.

tests/test_cli.py covers the ordinary user errors one by one; this module throws a generated corpus
at the command — truncations at twenty offsets, seeded bit flips, files of other kinds, models that
fail the checker or name unknown domains, broken external data — and asserts the same contract for
every one: a known exit code, one line on stderr naming the file, no traceback, no crash signal,
the input's bytes unchanged, and no output or temporary file left behind. Then it kills real runs
of a 300 MB fold at several moments and checks what is left at the output path.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold.cli
import bnfold.onnx.io as bnfold_io
import bnfold.onnx.outputs as bnfold_outputs
import bnfold.pipeline
from bnfold import Outcome, Reason, fold_onnx, load_model
from bnfold.verify import compare_output
from tests.builders import conv_bn_model, gemm_bn_model, matmul_bn_model, op_types
from tests.test_cli import as_process, in_process, snapshot, temporary_files

# -- the contract ------------------------------------------------------------------------------------


def assert_user_error(ran, names: Path, before: dict[str, str], directory: Path) -> str:
    """Exit 2, one line on stderr that starts like every bnfold error and names the file; nothing
    written and nothing changed. Returns the line."""
    assert ran.code == 2, ran.output
    assert "Traceback" not in ran.output
    assert ran.stdout == ""
    (line,) = ran.stderr.strip().splitlines()
    assert line.startswith("bnfold: error: "), line
    assert str(names) in line, line
    assert snapshot(directory) == before  # the input untouched, no output, no temporary file
    return line


def valid_model_bytes() -> bytes:
    return conv_bn_model(in_channels=4, out_channels=8, seed=7).SerializeToString()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- the corpus: each case writes its input under tmp_path ------------------------------------------
def _truncated(offset_fraction: float):
    def make(directory: Path) -> Path:
        data = valid_model_bytes()
        return write(directory / "truncated.onnx", data[: max(1, int(len(data) * offset_fraction))])

    return make


def _png(directory: Path) -> Path:
    header = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(64))
    return write(directory / "picture.onnx", header)


class _Marker:
    """Unpickling this touches a file: proof that something executed code from a model file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _pickle(directory: Path) -> Path:
    state = {"conv.weight": np.ones((8, 4, 3, 3), np.float32), "hook": _Marker(directory / "EXECUTED")}
    return write(directory / "weights.onnx", pickle.dumps(state, protocol=4))


def _torch_style_zip(directory: Path) -> Path:
    # What torch.save writes: a zip with a pickle inside.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"hook": _Marker(directory / "EXECUTED")}))
        archive.writestr("archive/version", "3\n")
    return write(directory / "model.pt.onnx", buffer.getvalue())


def _text(directory: Path) -> Path:
    return write(directory / "notes.onnx", b"ir_version: 8\ngraph { node { op_type: 'Conv' } }\n")


def _edited(name: str, edit):
    def make(directory: Path) -> Path:
        model = conv_bn_model(in_channels=4, out_channels=8, seed=7)
        edit(model)
        return write(directory / f"{name}.onnx", model.SerializeToString())

    return make


def _unknown_op(model: onnx.ModelProto) -> None:
    model.graph.node[0].op_type = "ConvolutionFromTheFuture"


def _dangling_input(model: onnx.ModelProto) -> None:
    model.graph.node[1].input[0] = "produced_by_nobody"


def _missing_initializer(model: onnx.ModelProto) -> None:
    (weight,) = [tensor for tensor in model.graph.initializer if tensor.name == "W"]
    model.graph.initializer.remove(weight)


def _duplicate_output(model: onnx.ModelProto) -> None:
    model.graph.node[1].output[0] = "conv_out"


def _future_ir_version(model: onnx.ModelProto) -> None:
    model.ir_version = 99


def _domain_without_import(model: onnx.ModelProto) -> None:
    model.graph.node[0].domain = "com.example.vendor"


def _imported_unknown_domain(model: onnx.ModelProto) -> None:
    # The checker cannot judge ops of a domain it does not know; ONNX Runtime refuses them.
    model.graph.node[0].domain = "com.example.vendor"
    model.opset_import.append(helper.make_opsetid("com.example.vendor", 1))


def _no_default_opset(model: onnx.ModelProto) -> None:
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("com.example.vendor", 1))


def _not_utf8(message, text: str) -> None:
    """Replace the string ``text`` in ``message`` by as many bytes that are not UTF-8 (0xff)."""
    encoded = text.encode()
    data = message.SerializeToString()
    assert data.count(bytes([len(encoded)]) + encoded) == 1
    message.ParseFromString(
        data.replace(bytes([len(encoded)]) + encoded, bytes([len(encoded)]) + b"\xff" * len(encoded))
    )


def _node_name_not_utf8(model: onnx.ModelProto) -> None:
    _not_utf8(model.graph.node[1], "bn")  # reports (JSON, tables) failed on the bytes


def _dimension_not_utf8(model: onnx.ModelProto) -> None:
    _not_utf8(model.graph.input[0], "N")  # ONNX Runtime's Python binding failed on the shape


def _group_zero(model: onnx.ModelProto) -> None:
    # Passes the checker; ONNX Runtime refuses to run it (and logs to stderr unless told not to).
    for attribute in model.graph.node[0].attribute:
        if attribute.name == "group":
            attribute.i = 0


def _external(name: str, damage):
    def make(directory: Path) -> Path:
        path = directory / f"{name}.onnx"
        onnx.save_model(
            conv_bn_model(in_channels=16, out_channels=16, seed=7),
            path,
            save_as_external_data=True,
            location=f"{name}.weights",
            size_threshold=0,
        )
        damage(directory / f"{name}.weights")
        return path

    return make


def _truncate_file(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _replace_with_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _empty_file(path: Path) -> None:
    path.write_bytes(b"")


TRUNCATION_POINTS = [k / 21 for k in range(1, 21)]

CORPUS = [
    *[
        pytest.param(_truncated(fraction), "", id=f"truncated-at-{fraction:.0%}")
        for fraction in TRUNCATION_POINTS
    ],
    pytest.param(_png, "not an ONNX model", id="png-image"),
    pytest.param(_pickle, "not an ONNX model", id="python-pickle"),
    pytest.param(_torch_style_zip, "not an ONNX model", id="torch-style-zip"),
    pytest.param(_text, "not an ONNX model", id="text"),
    pytest.param(_edited("unknown_op", _unknown_op), "invalid ONNX model", id="unknown-op"),
    pytest.param(_edited("dangling", _dangling_input), "produced_by_nobody", id="dangling-input"),
    pytest.param(_edited("no_weight", _missing_initializer), "input 'W'", id="missing-initializer"),
    pytest.param(_edited("duplicate", _duplicate_output), "invalid ONNX model", id="duplicate-output"),
    pytest.param(_edited("future", _future_ir_version), "ir_version", id="future-ir-version"),
    pytest.param(
        _edited("no_import", _domain_without_import), "com.example.vendor", id="domain-not-imported"
    ),
    pytest.param(
        _edited("vendor", _imported_unknown_domain), "ONNX Runtime cannot load", id="unknown-opset-domain"
    ),
    pytest.param(_edited("no_default", _no_default_opset), "invalid ONNX model", id="no-default-opset"),
    pytest.param(
        _edited("name", _node_name_not_utf8), "graph.node.name is not UTF-8", id="node-name-not-utf8"
    ),
    pytest.param(_edited("dim", _dimension_not_utf8), "dim_param is not UTF-8", id="dimension-name-not-utf8"),
    pytest.param(_edited("group0", _group_zero), "ONNX Runtime failed to run", id="runtime-refuses-model"),
    pytest.param(_external("short", _truncate_file), "external data", id="external-data-truncated"),
    pytest.param(_external("emptied", _empty_file), "external data", id="external-data-empty"),
    pytest.param(
        _external("dir", _replace_with_directory), "external data", id="external-data-is-a-directory"
    ),
]


@pytest.mark.parametrize(("make", "expected"), CORPUS)
def test_broken_inputs_are_one_line_errors_that_touch_nothing(make, expected, tmp_path):
    source = make(tmp_path)
    before = snapshot(tmp_path)

    line = assert_user_error(in_process(source, "-o", tmp_path / "out.onnx"), source, before, tmp_path)

    assert expected in line
    assert not (tmp_path / "EXECUTED").exists()


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(_truncated(0.5), "", id="truncated"),
        pytest.param(_pickle, "not an ONNX model", id="python-pickle"),
        pytest.param(_edited("vendor", _imported_unknown_domain), "ONNX Runtime", id="unknown-opset-domain"),
        # ONNX Runtime logs its own error to stderr from C++ unless its logging is turned down.
        pytest.param(_edited("group0", _group_zero), "ONNX Runtime", id="runtime-refuses-model"),
        pytest.param(_external("short", _truncate_file), "external data", id="external-data-truncated"),
    ],
)
def test_broken_inputs_in_a_real_process(make, expected, tmp_path):
    source = make(tmp_path)
    before = snapshot(tmp_path)

    line = assert_user_error(as_process(source, "-o", tmp_path / "out.onnx"), source, before, tmp_path)

    assert expected in line
    assert not (tmp_path / "EXECUTED").exists()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(_truncated(0.4), id="truncated"),
        pytest.param(_pickle, id="python-pickle"),
        pytest.param(_edited("dangling", _dangling_input), id="dangling-input"),
        pytest.param(_edited("name", _node_name_not_utf8), id="node-name-not-utf8"),
        pytest.param(_external("short", _truncate_file), id="external-data-truncated"),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "verify-original", "verify-folded"])
def test_broken_inputs_to_the_other_subcommands(make, command, tmp_path):
    source = make(tmp_path)
    good = write(tmp_path / "good.onnx", valid_model_bytes())
    args = {
        "inspect": ["inspect", source],
        "verify-original": ["verify", source, good],
        "verify-folded": ["verify", good, source],
    }[command]
    before = snapshot(tmp_path)

    assert_user_error(in_process(*args), source, before, tmp_path)
    assert not (tmp_path / "EXECUTED").exists()


@pytest.mark.parametrize("position", ["original", "folded"])
def test_verify_names_the_model_onnx_runtime_cannot_load(position, tmp_path):
    vendor = _edited("vendor", _imported_unknown_domain)(tmp_path)
    good = write(tmp_path / "good.onnx", valid_model_bytes())
    before = snapshot(tmp_path)

    args = ["verify", vendor, good] if position == "original" else ["verify", good, vendor]
    line = assert_user_error(in_process(*args), vendor, before, tmp_path)

    assert f"cannot load the {position} model" in line


def _tensor(model: onnx.ModelProto, name: str) -> TensorProto:
    (tensor,) = [t for t in model.graph.initializer if t.name == name]
    return tensor


def _raw_data_too_long(model: onnx.ModelProto) -> None:
    _tensor(model, "bn_var").raw_data += b"\0" * 8


def _unknown_data_type(model: onnx.ModelProto) -> None:
    _tensor(model, "W").data_type = 99


def _too_many_float_data(model: onnx.ModelProto) -> None:
    tensor = _tensor(model, "bn_mean")
    tensor.ClearField("raw_data")
    tensor.float_data.extend([0.5] * 9)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(_raw_data_too_long, id="raw-data-too-long"),
        pytest.param(_unknown_data_type, id="unknown-data-type"),
        pytest.param(_too_many_float_data, id="too-many-float-data"),
    ],
)
@pytest.mark.parametrize("command", [["--no-verify"], ["inspect"]], ids=["fold-no-verify", "inspect"])
def test_tensors_numpy_cannot_decode_are_one_line_errors(edit, command, tmp_path):
    # The checker accepts these; decoding them crashed the fold (ValueError/KeyError: exit 3).
    # With verification, ONNX Runtime refuses the model first.
    source = _edited("undecodable", edit)(tmp_path)
    args = ["inspect", source] if command == ["inspect"] else [source, "-o", tmp_path / "out.onnx", *command]
    before = snapshot(tmp_path)

    line = assert_user_error(in_process(*args), source, before, tmp_path)

    assert "has data that does not match its type and shape" in line


def test_checker_messages_are_joined_onto_one_line(tmp_path):
    # The checker splits "input 'x' of node: <newline>name: bn ..." over three lines.
    source = _edited("dangling", _dangling_input)(tmp_path)

    ran = in_process(source, "-o", tmp_path / "out.onnx")

    assert ran.code == 2
    assert "of node: name: bn OpType: BatchNormalization is not output of any previous nodes" in ran.stderr


# -- bit flips: any outcome but a crash --------------------------------------------------------------
def _flipped(data: bytes, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    flipped = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        flipped[int(rng.integers(0, len(flipped)))] ^= 1 << int(rng.integers(0, 8))
    return bytes(flipped)


FLIP_MODELS = {
    "conv": lambda: conv_bn_model(in_channels=4, out_channels=8, seed=7),
    "convtranspose": lambda: conv_bn_model(transpose=True, groups=2, seed=7),
    "gemm": lambda: gemm_bn_model(seed=7),
    "matmul": lambda: matmul_bn_model(with_add=True, seed=7),
}


def assert_clean_outcome(ran, source: Path, source_bytes: bytes, output: Path, directory: Path) -> None:
    """Exit 0 with a complete, valid, verified output; or exit 1/2 with no output. Never a crash."""
    assert ran.code in (0, 1, 2), ran.output
    assert "Traceback" not in ran.output
    assert source.read_bytes() == source_bytes
    assert temporary_files(directory) == []
    if ran.code == 0:
        assert "verification passed" in ran.stdout
        onnx.checker.check_model(onnx.load(output))
    else:
        assert not output.exists()
        (line,) = ran.stderr.strip().splitlines()
        assert line.startswith("bnfold: ")


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("model", sorted(FLIP_MODELS))
def test_bit_flipped_models_fold_verified_or_fail_cleanly(model, seed, tmp_path):
    source_bytes = _flipped(FLIP_MODELS[model]().SerializeToString(), seed)
    source = write(tmp_path / "flipped.onnx", source_bytes)
    output = tmp_path / "out.onnx"

    assert_clean_outcome(
        in_process(source, "-o", output, "--provider", "cpu"), source, source_bytes, output, tmp_path
    )


@pytest.mark.parametrize("seed", [3, 57, 279])
def test_bit_flipped_models_in_a_real_process(seed, tmp_path):
    # Seeds whose flips give a valid model, a checker failure, a parse failure and a model ONNX
    # Runtime refuses.
    for name in ("conv", "gemm"):
        source_bytes = _flipped(FLIP_MODELS[name]().SerializeToString(), seed)
        source = write(tmp_path / f"{name}.onnx", source_bytes)
        output = tmp_path / f"{name}.out.onnx"

        ran = as_process(source, "-o", output, "--provider", "cpu")

        assert_clean_outcome(ran, source, source_bytes, output, tmp_path)


# -- no code runs from input files ---------------------------------------------------------------------
def test_the_marker_pickle_does_run_code_when_unpickled(tmp_path):
    # So that "no EXECUTED file" in the tests above means something.
    pickle.loads(pickle.dumps(_Marker(tmp_path / "EXECUTED")))

    assert (tmp_path / "EXECUTED").exists()


def test_pickled_arrays_in_inputs_npz_are_refused_not_unpickled(tmp_path):
    source = write(tmp_path / "model.onnx", valid_model_bytes())
    data = tmp_path / "inputs.npz"
    marker = np.empty(1, dtype=object)
    marker[0] = _Marker(tmp_path / "EXECUTED")
    np.savez(data, x=marker)
    before = snapshot(tmp_path)

    line = assert_user_error(
        in_process(source, "-o", tmp_path / "out.onnx", "--inputs", data), data, before, tmp_path
    )

    assert "not a readable .npz file" in line
    assert not (tmp_path / "EXECUTED").exists()


def test_folding_an_onnx_file_never_imports_torch(tmp_path):
    # torch.load would unpickle (run) whatever a .pt file holds; ONNX files are read as protobuf only.
    source = write(tmp_path / "model.onnx", valid_model_bytes())
    script = (
        "import sys\n"
        "sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
        "from bnfold.cli import main\n"
        f"main([{str(source)!r}, '-o', {str(tmp_path / 'out.onnx')!r}, '-q', '--provider', 'cpu'])\n"
    )

    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    assert ran.returncode == 0, ran.stderr
    assert op_types(onnx.load(tmp_path / "out.onnx")) == ["Conv"]


# -- outputs that would destroy an input ---------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--no-verify", "--force"])
def test_writing_over_the_input_needs_a_verified_fold(flag, tmp_path):
    source = write(tmp_path / "model.onnx", valid_model_bytes())
    before = snapshot(tmp_path)

    line = assert_user_error(in_process(source, "-o", source, flag), source, before, tmp_path)

    assert "is the input model" in line


def test_writing_over_the_input_through_another_name_needs_a_verified_fold(tmp_path):
    source = write(tmp_path / "model.onnx", valid_model_bytes())
    (tmp_path / "link.onnx").hardlink_to(source)
    before = snapshot(tmp_path)

    line = assert_user_error(
        in_process(source, "-o", tmp_path / "link.onnx", "--no-verify"),
        tmp_path / "link.onnx",
        before,
        tmp_path,
    )

    assert "is the input model" in line


def test_folding_in_place_replaces_the_input_only_with_a_verified_complete_model(tmp_path):
    source = write(tmp_path / "model.onnx", valid_model_bytes())

    ran = in_process(source, "-o", source, "-q")

    assert ran.code == 0, ran.output
    assert op_types(onnx.load(source)) == ["Conv"]
    assert temporary_files(tmp_path) == []


def test_folding_in_place_that_fails_verification_leaves_the_input(tmp_path, monkeypatch):
    source = write(tmp_path / "model.onnx", valid_model_bytes())
    before = snapshot(tmp_path)
    real_compare = bnfold.pipeline.Verifier.compare

    def failing(self, *args, **kwargs):
        result = real_compare(self, *args, **kwargs)
        result.outputs[0] = compare_output("y", np.zeros(3, np.float32), np.ones(3, np.float32))
        return result

    monkeypatch.setattr(bnfold.pipeline.Verifier, "compare", failing)

    ran = in_process(source, "-o", source, "-q")

    assert ran.code == 1, ran.output
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("output_name", ["model.weights", "model2.onnx"])
def test_output_that_would_overwrite_the_input_external_data_is_refused(output_name, tmp_path):
    # model2.onnx would write model2.onnx.data, the data file of the input below.
    location = "model.weights" if output_name == "model.weights" else "model2.onnx.data"
    source = tmp_path / "model.onnx"
    onnx.save_model(
        conv_bn_model(seed=7), source, save_as_external_data=True, location=location, size_threshold=0
    )
    before = snapshot(tmp_path)

    line = assert_user_error(
        in_process(source, "-o", tmp_path / output_name, "--external-data"),
        tmp_path / output_name,
        before,
        tmp_path,
    )

    assert "would overwrite the input's external data" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_in_a_read_only_directory(tmp_path):
    source = write(tmp_path / "model.onnx", valid_model_bytes())
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        before = snapshot(tmp_path)
        line = assert_user_error(
            in_process(source, "-o", locked / "out.onnx"), locked / "out.onnx", before, tmp_path
        )
    finally:
        locked.chmod(0o755)
    assert "is not writable" in line


def test_output_in_an_unwritable_directory_even_as_root(tmp_path, monkeypatch):
    source = write(tmp_path / "model.onnx", valid_model_bytes())
    real_access = os.access
    # os.access answers True for root everywhere: pretend the output directory is read-only.
    monkeypatch.setattr(
        os,
        "access",
        lambda path, *args, **kwargs: Path(path) != tmp_path and real_access(path, *args, **kwargs),
    )
    before = snapshot(tmp_path)

    line = assert_user_error(
        in_process(source, "-o", tmp_path / "out.onnx"), tmp_path / "out.onnx", before, tmp_path
    )

    assert "is not writable" in line


# -- numerically degenerate BNs: kept, reported, never folded into inf/NaN weights ---------------------
def _set(model: onnx.ModelProto, name: str, edit) -> None:
    (tensor,) = [t for t in model.graph.initializer if t.name == name]
    values = numpy_helper.to_array(tensor).copy()
    edit(values)
    tensor.CopyFrom(numpy_helper.from_array(values, name))


def _degenerate(name: str, edit, *, dtype: str = "float32", bn_dtype: str | None = None):
    def make() -> onnx.ModelProto:
        model = conv_bn_model(dtype=dtype, bn_dtype=bn_dtype, opset=15, seed=7)
        for tensor_name, change in edit.items():
            _set(model, tensor_name, change)
        return model

    return make


def _put(index: int, value: float):
    def change(values: np.ndarray) -> None:
        values[index] = value

    return change


def _fill(value: float):
    def change(values: np.ndarray) -> None:
        values[...] = value

    return change


DEGENERATE = [
    pytest.param(
        _degenerate("negative", {"bn_var": _put(2, -1.0)}),
        Reason.NONPOSITIVE_VARIANCE,
        id="negative-variance",
    ),
    pytest.param(
        _degenerate("zero_eps", {"bn_var": _put(2, 0.0)}), None, id="zero-variance-folds-thanks-to-epsilon"
    ),
    pytest.param(
        _degenerate("nan_var", {"bn_var": _put(1, np.nan)}), Reason.NONFINITE_STATISTICS, id="nan-variance"
    ),
    pytest.param(
        _degenerate("inf_gamma", {"bn_gamma": _put(0, np.inf)}), Reason.NONFINITE_STATISTICS, id="inf-gamma"
    ),
    pytest.param(
        _degenerate("nan_weight", {"W": _put(0, np.nan)}),
        Reason.FOLD_OVERFLOWS_DTYPE,
        id="nan-in-the-conv-weight",
    ),
    pytest.param(
        _degenerate("huge32", {"bn_gamma": _put(3, 3e38), "bn_var": _put(3, 1e-3)}),
        Reason.FOLD_OVERFLOWS_DTYPE,
        id="float32-scale-overflows",
    ),
    pytest.param(
        _degenerate("huge16", {"bn_gamma": _put(3, 6e4), "bn_var": _put(3, 1e-3)}, dtype="float16"),
        Reason.FOLD_OVERFLOWS_DTYPE,
        id="float16-scale-overflows",
    ),
    pytest.param(
        # Folded weights (1e-3 * 1e5) and bias (0) would fit float16; the scale does not.
        _degenerate(
            "mixed",
            {"bn_gamma": _put(3, 1e5), "bn_mean": _put(3, 0.0), "bn_beta": _put(3, 0.0), "B": _put(3, 0.0)}
            | {"W": _fill(1e-3)},
            dtype="float16",
            bn_dtype="float32",
        ),
        Reason.FOLD_OVERFLOWS_DTYPE,
        id="float32-scale-too-big-for-float16-weights",
    ),
]


@pytest.mark.parametrize(("make", "reason"), DEGENERATE)
def test_degenerate_batchnorms_are_kept_reported_and_verified(make, reason, tmp_path):
    source = write(tmp_path / "model.onnx", make().SerializeToString())
    output, report = tmp_path / "out.onnx", tmp_path / "report.json"

    ran = in_process(source, "-o", output, "--report", report, "--provider", "cpu")

    # Verification passes: NaN outputs match NaN, and nothing else changed.
    assert ran.code == 0, ran.output
    folded = onnx.load(output)
    original = {t.name: numpy_helper.to_array(t) for t in make().graph.initializer}
    for tensor in folded.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if not np.isfinite(values).all():  # only ever a constant the input already had
            np.testing.assert_array_equal(values, original[tensor.name])
    decision = fold_onnx(make()).report.decisions[0]
    if reason is None:
        assert decision.outcome is Outcome.FOLDED
    else:
        assert (decision.outcome, decision.reason) == (Outcome.KEPT, reason)
        assert op_types(folded) == ["Conv", "BatchNormalization"]
        assert f'"reason": "{reason}"' in report.read_text()


def test_nan_outputs_in_both_models_verify(tmp_path):
    # Before: NaN == NaN matched, but the bound atol + rtol*|NaN| is NaN, so every NaN "failed".
    comparison = compare_output("y", np.array([1.0, np.nan], np.float32), np.array([1.0, np.nan], np.float32))

    assert comparison.passed
    assert (comparison.max_abs_error, comparison.max_rel_error, comparison.needed_atol) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("expected", "actual", "passed"),
    [
        ([np.inf, -np.inf], [np.inf, -np.inf], True),
        ([np.inf], [1e30], False),  # before: the bound atol + rtol*inf let any finite value pass
        ([np.inf], [-np.inf], False),
        ([np.nan], [0.0], False),
        ([1.0], [np.nan], False),
        ([1.0], [np.inf], False),
    ],
)
def test_non_finite_values_match_only_themselves(expected, actual, passed):
    comparison = compare_output("y", np.array(expected, np.float32), np.array(actual, np.float32))

    assert comparison.passed is passed


def test_bfloat16_outputs_compare_with_tolerances_not_exactly():
    import ml_dtypes

    bfloat16 = ml_dtypes.bfloat16
    expected = np.array([1.0, 2.0, -3.0], bfloat16)
    near = np.array([1.0078125, 2.0, -3.0], bfloat16)  # one bfloat16 ulp off at 1.0: within tolerance
    far = np.array([1.5, 2.0, -3.0], bfloat16)

    close = compare_output("y", expected, near)
    assert close.passed and close.dtype == "bfloat16" and close.note != "compared exactly"
    assert close.max_abs_error == pytest.approx(0.0078125)
    assert not compare_output("y", expected, far).passed


# -- shapes the checker lets through and the arithmetic cannot take -------------------------------------
def _reshape(model: onnx.ModelProto, name: str, values: np.ndarray) -> None:
    (tensor,) = [t for t in model.graph.initializer if t.name == name]
    tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float32), name))


def _convtranspose_group_not_dividing_its_input_channels():
    model = conv_bn_model(transpose=True, in_channels=3, out_channels=3, seed=7)
    for attribute in model.graph.node[0].attribute:
        if attribute.name == "group":
            attribute.i = 2  # weight [3, 3, 3, 3]: 3 * 2 = 6 output channels, but 3 rows do not split in 2
    for name in ("B", "bn_gamma", "bn_beta", "bn_mean", "bn_var"):
        _reshape(model, name, np.linspace(0.5, 1.0, 6))
    return model


def _scalar_conv_weight():
    model = conv_bn_model(seed=7)
    _reshape(model, "W", np.array(0.5))
    return model


def _vector_gemm_weight():
    model = gemm_bn_model(seed=7)
    _reshape(model, "W", np.ones(7))
    return model


def _conv_bias_too_long():
    model = conv_bn_model(seed=7)
    _reshape(model, "B", np.ones(7))
    return model


def _gemm_bias_wrong_width():
    model = gemm_bn_model(seed=7)
    _reshape(model, "C", np.ones(3))
    return model


def _matmul_bias_wrong_width():
    model = matmul_bn_model(with_add=True, seed=7)
    _reshape(model, "bias", np.ones(3))
    return model


@pytest.mark.parametrize(
    "make",
    [
        _convtranspose_group_not_dividing_its_input_channels,
        _scalar_conv_weight,
        _vector_gemm_weight,
        _conv_bias_too_long,
        _gemm_bias_wrong_width,
        _matmul_bias_wrong_width,
    ],
)
def test_malformed_layer_shapes_are_refused_not_crashed_on(make, tmp_path):
    # Each crashed the fold (ValueError/IndexError: exit 3) before the rules checked the shapes.
    model = make()
    onnx.checker.check_model(model)
    decision = fold_onnx(model).report.decisions[0]
    assert (decision.outcome, decision.reason) == (Outcome.KEPT, Reason.PARAM_SHAPE_MISMATCH), decision

    source = write(tmp_path / "model.onnx", model.SerializeToString())
    ran = in_process(source, "-o", tmp_path / "out.onnx", "--no-verify", "-q")
    assert ran.code == 0, ran.output


# -- atomic writes ---------------------------------------------------------------------------------------
def test_signals_during_the_commit_arrive_after_it():
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with bnfold_outputs.signals_held():
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.01)
            reached.append("the rest of the block")
        reached.append("after the block")
    assert reached == ["the rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_interrupt_between_the_data_and_the_model_rename_keeps_the_pair_together(tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    model = conv_bn_model(in_channels=16, out_channels=16, seed=7)
    real_replace = os.replace

    def replace_then_interrupt(source, destination):
        real_replace(source, destination)
        if str(destination).endswith(".data"):
            signal.raise_signal(signal.SIGINT)  # Ctrl-C right after the data file is in place

    monkeypatch.setattr(os, "replace", replace_then_interrupt)

    with pytest.raises(KeyboardInterrupt):
        bnfold_io.save_model(model, target, external_data=True)

    # The model rename still happened: the model and its data match.
    loaded = bnfold_io.load_model(target)
    assert loaded.used_external_data
    assert temporary_files(tmp_path) == []


# -- the kill test ------------------------------------------------------------------------------------------
def _big_model(path: Path, megabytes: int = 300) -> None:
    """Conv -> BN blocks of 1024x1024x3x3 float32 weights (36 MB each), written straight to disk.

    (No shape inference, which would copy the whole model: the output shape is declared.)
    """
    channels = 1024
    rng = np.random.default_rng(0)
    pattern = (rng.standard_normal(channels * channels * 9 // 16).astype(np.float32) * 0.01).tobytes()
    nodes, initializers, current = [], [], "x"
    for block in range(max(1, megabytes // 36)):
        weight = TensorProto(name=f"w{block}", data_type=TensorProto.FLOAT, dims=[channels, channels, 3, 3])
        weight.raw_data = pattern * 16
        initializers.append(weight)
        stats = [rng.uniform(0.5, 2, channels), rng.standard_normal(channels)]
        stats += [rng.standard_normal(channels), rng.uniform(0.5, 2, channels)]
        names = [f"{role}{block}" for role in ("gamma", "beta", "mean", "var")]
        initializers += [
            numpy_helper.from_array(v.astype(np.float32), n) for n, v in zip(names, stats, strict=True)
        ]
        nodes.append(helper.make_node("Conv", [current, f"w{block}"], [f"c{block}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("BatchNormalization", [f"c{block}", *names], [f"y{block}"]))
        current = f"y{block}"
    shape = [1, channels, 2, 2]
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, shape)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    path.write_bytes(model.SerializeToString())


@dataclass
class Kill:
    signum: int
    after: float | None  # seconds after start; None: the moment the output's temporary file appears
    existing: bool = False  # out.onnx already holds an older model
    external: bool = False  # write with --external-data: a model file and a data file

    def __str__(self) -> str:
        moment = "mid-write" if self.after is None else f"{self.after}s"
        extras = [
            word for word, on in (("over an older output", self.existing), ("external", self.external)) if on
        ]
        return " ".join([signal.Signals(self.signum).name, "at", moment, *extras])


KILLS = [
    Kill(signal.SIGINT, 0.2),
    Kill(signal.SIGINT, 0.6),
    Kill(signal.SIGINT, None),
    Kill(signal.SIGTERM, 1.0),
    Kill(signal.SIGINT, None, existing=True),
    Kill(signal.SIGTERM, 2.0, existing=True),
    Kill(signal.SIGTERM, None, external=True),
]


def _run_and_kill(source: Path, output: Path, kill: Kill) -> tuple[subprocess.CompletedProcess, bool]:
    """Run the fold, signal it at the moment ``kill`` names; (result, whether it was signalled)."""
    extra = ["--external-data"] if kill.external else []
    process = subprocess.Popen(
        [sys.executable, "-m", "bnfold.cli", str(source), "-o", str(output), "--no-verify", "-q", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    start = time.monotonic()
    while process.poll() is None and time.monotonic() - start < 60:
        if kill.after is not None and time.monotonic() - start >= kill.after:
            break
        if kill.after is None and any(p.name.startswith(f".{output.name}.") for p in output.parent.iterdir()):
            break
        time.sleep(0.002)
    signalled = process.poll() is None
    if signalled:
        process.send_signal(kill.signum)
    stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), signalled


@pytest.mark.slow
def test_interrupted_folds_leave_no_output_or_a_complete_one(tmp_path):
    source = tmp_path / "in" / "big.onnx"
    source.parent.mkdir()
    _big_model(source)
    digest_before = hashlib.sha256(source.read_bytes()).hexdigest()
    identity = (source.stat().st_size, source.stat().st_mtime_ns)
    older = conv_bn_model(seed=1).SerializeToString()

    outcomes = []
    for number, kill in enumerate(KILLS):
        directory = tmp_path / f"run{number}"
        directory.mkdir()
        output = directory / "out.onnx"
        if kill.existing:
            output.write_bytes(older)

        ran, signalled = _run_and_kill(source, output, kill)

        what = f"{kill}: rc {ran.returncode}"
        outcomes.append(what)
        assert temporary_files(directory) == [], what
        assert (source.stat().st_size, source.stat().st_mtime_ns) == identity, what
        if ran.returncode in (130, 143):  # caught: one line, no traceback
            assert ran.stderr.strip().splitlines() == [
                f"bnfold: interrupted ({signal.Signals(kill.signum).name}); no partial file left"
            ], what
        else:  # finished before the signal (0), or signalled while Python was still importing
            assert ran.returncode in (0, -signal.SIGINT, -signal.SIGTERM), (what, ran.stderr)
        if kill.after is None and signalled:  # signalled mid-write: nothing new was renamed into place
            assert ran.returncode in (130, 143), what
            assert sorted(p.name for p in directory.iterdir()) == (["out.onnx"] if kill.existing else []), (
                what
            )
        if output.exists() and output.read_bytes() != older:
            folded = load_model(output).model  # complete and valid, external data and all
            assert "BatchNormalization" not in op_types(folded), what
        elif ran.returncode == 0:
            pytest.fail(f"{what}: exit 0 without an output")
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest_before
    print("\n".join(outcomes))
