"""Data safety against a hostile or careless user: what an output path may name, which files bnfold
may replace, and what happens when two runs, a closed terminal or a full disk get in the way.

The table test drives ``-o`` and ``--report`` at every kind of path — a regular file, a symbolic link
(to a file, dangling), a character device, a FIFO, a directory, the input model, its external data
file, the ``--inputs`` file — and checks for each: the exit code, what now holds the bytes, that the
path is still the kind of file it was, that the input is unchanged and that no temporary file is left.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

import bnfold.onnx.io as bnfold_io
import bnfold.onnx.outputs as outputs
from bnfold.errors import OutputError
from tests.builders import conv_bn_model, op_types
from tests.test_cli import digest, in_process, temporary_files


# -- fixtures ----------------------------------------------------------------------------------------
def external_model(directory: Path, name: str = "model.onnx", data: str | None = None) -> Path:
    path = directory / name
    onnx.save_model(
        conv_bn_model(in_channels=16, out_channels=16, seed=3),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data or f"{name}.data",
        size_threshold=0,
    )
    return path


def inline_model(directory: Path, name: str = "model.onnx") -> Path:
    path = directory / name
    onnx.save_model(conv_bn_model(), path)
    return path


def feeds_file(directory: Path, channels: int = 16) -> Path:
    path = directory / "inputs.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((2, channels, 7, 7)).astype(np.float32))
    return path


def char_device(path: Path) -> Path:
    """A character device node like /dev/null (1, 3), made here so that a bug replaces this one."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        with open(path, "wb") as handle:
            handle.write(b"probe")
    except OSError as error:  # not root, or a nodev mount
        pytest.skip(f"cannot make a character device here ({error.strerror})")
    return path


class FifoReader:
    """Reads everything written to a FIFO in a thread (a writer blocks until a reader opens it)."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path, self.data = path, b""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with open(self.path, "rb") as handle:
            self.data = handle.read()

    def result(self) -> bytes:
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()
        return self.data

    def release(self) -> None:
        """Unblock the reader when nothing was written (open for writing once, write nothing)."""
        if self.thread.is_alive():
            with open(self.path, "wb"):
                pass
        self.thread.join(timeout=30)


def kind_of(path: Path) -> str:
    mode = os.lstat(path).st_mode
    for name, test in (
        ("link", stat.S_ISLNK),
        ("fifo", stat.S_ISFIFO),
        ("char", stat.S_ISCHR),
        ("dir", stat.S_ISDIR),
    ):
        if test(mode):
            return name
    return "file"


# -- the table: every kind of output path, for -o and for --report ----------------------------------
# Each case makes the path under test (given the folder, the input model and the --inputs file) and
# says what must happen: "written" (a model / JSON at the path or, through a link, at its target),
# "streamed" (read back from the FIFO or swallowed by the device) or "refused" (exit 2, one line).
def _regular(directory, model, inputs):
    path = directory / "target"
    path.write_bytes(b"previous")
    return path, path, "written"


def _missing(directory, model, inputs):
    return directory / "new", directory / "new", "written"


def _symlink(directory, model, inputs):
    (directory / "real").mkdir()
    target = directory / "real" / "target"
    target.write_bytes(b"previous")
    link = directory / "link"
    link.symlink_to(target)
    return link, target, "written"


def _link_chain(directory, model, inputs):
    link, target, expected = _symlink(directory, model, inputs)
    outer = directory / "outer"
    outer.symlink_to(link)
    return outer, target, expected


def _dangling_symlink(directory, model, inputs):
    (directory / "real").mkdir()
    target = directory / "real" / "not-yet"
    link = directory / "link"
    link.symlink_to(target)
    return link, target, "written"


def _device(directory, model, inputs):
    path = char_device(directory / "null")
    return path, None, "streamed"


def _fifo(directory, model, inputs):
    return directory / "pipe", None, "fifo"


def _directory(directory, model, inputs):
    (directory / "folder").mkdir()
    return directory / "folder", None, "refused"


def _link_loop(directory, model, inputs):
    (directory / "a").symlink_to(directory / "b")
    (directory / "b").symlink_to(directory / "a")
    return directory / "a", None, "refused"


def _the_input_data(directory, model, inputs):
    return directory / "model.onnx.data", None, "refused"


def _a_link_to_the_input_data(directory, model, inputs):
    (directory / "alias").symlink_to(directory / "model.onnx.data")
    return directory / "alias", None, "refused"


def _a_hard_link_to_the_input_data(directory, model, inputs):
    os.link(directory / "model.onnx.data", directory / "hard")
    return directory / "hard", None, "refused"


def _the_inputs_file(directory, model, inputs):
    return inputs, None, "refused"


def _the_input_model(directory, model, inputs):
    return model, None, "refused"


CASES = {
    "regular": _regular,
    "missing": _missing,
    "symlink": _symlink,
    "symlink-chain": _link_chain,
    "dangling-symlink": _dangling_symlink,
    "char-device": _device,
    "fifo": _fifo,
    "directory": _directory,
    "symlink-loop": _link_loop,
    "input-data-file": _the_input_data,
    "symlink-to-input-data": _a_link_to_the_input_data,
    "hard-link-to-input-data": _a_hard_link_to_the_input_data,
    "inputs-file": _the_inputs_file,
}


@pytest.mark.parametrize("option", ["-o", "--report"])
@pytest.mark.parametrize("case", sorted(CASES) + ["input-model"])
def test_every_kind_of_output_path(option, case, tmp_path):
    if case == "input-model" and option == "-o":
        pytest.skip("-o over the input is an in-place fold (tests/test_reliability.py)")
    model = external_model(tmp_path)
    inputs = feeds_file(tmp_path)
    path, holder, expected = (CASES.get(case) or _the_input_model)(tmp_path, model, inputs)
    kind_before = kind_of(path) if os.path.lexists(path) else None
    protected = {p: digest(p) for p in (model, tmp_path / "model.onnx.data", inputs)}
    reader = FifoReader(path) if expected == "fifo" else None
    other = tmp_path / ("other.json" if option == "-o" else "other.onnx")
    args = [model, "--inputs", inputs, option, path]
    args += ["--report", other] if option == "-o" else ["-o", other]

    ran = in_process(*args, "--no-external-data", "-q")

    if expected == "refused":
        if reader is not None:
            reader.release()
        assert ran.code == 2, ran.output
        # bnfold's one line, or click's usage message with its one "Error:" line (--report DIR)
        errors = [line for line in ran.stderr.splitlines() if line.startswith(("bnfold: error: ", "Error:"))]
        assert len(errors) == 1 and "Traceback" not in ran.output, ran.stderr
        assert not other.exists()
    else:
        assert ran.code == 0, ran.output
        if expected == "fifo":
            content = reader.result()
        elif expected == "streamed":
            content = None
        else:
            content = holder.read_bytes()
        if content is not None:
            if option == "-o":
                assert "BatchNormalization" not in op_types(onnx.load_from_string(content))
            else:
                assert json.loads(content)["decisions"]
    if kind_before is not None:
        assert kind_of(path) == kind_before, "the path is still what it was (a link, a device, a FIFO)"
    assert {p: digest(p) for p in protected} == protected
    assert temporary_files(tmp_path) == []


def test_an_output_whose_data_file_is_the_input_model_is_refused(tmp_path):
    source = inline_model(tmp_path, "X.data")
    before = digest(source)
    ran = in_process(source, "-o", tmp_path / "X", "--external-data")
    assert ran.code == 2 and "would overwrite the model" in ran.stderr, ran.output
    assert digest(source) == before and not (tmp_path / "X").exists()


def test_the_report_of_verify_never_overwrites_a_models_data(tmp_path):
    model = external_model(tmp_path)
    before = digest(tmp_path / "model.onnx.data")
    ran = in_process("verify", model, model, "--report", tmp_path / "model.onnx.data")
    assert ran.code == 2 and "--report would overwrite" in ran.stderr, ran.output
    assert digest(tmp_path / "model.onnx.data") == before


def test_model_to_standard_output_and_the_text_to_standard_error(tmp_path):
    source = inline_model(tmp_path)
    completed = subprocess.run(
        [sys.executable, "-m", "bnfold.cli", str(source), "-o", "-"], capture_output=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert "BatchNormalization" not in op_types(onnx.load_from_string(completed.stdout))
    assert b"verification passed" in completed.stderr
    assert [path.name for path in tmp_path.iterdir()] == ["model.onnx"]


def test_report_to_standard_output(tmp_path):
    source = inline_model(tmp_path)
    ran = in_process(source, "-o", tmp_path / "out.onnx", "--report", "-")
    assert ran.code == 0, ran.output
    assert json.loads(ran.stdout)["decisions"][0]["outcome"] == "folded"
    assert "verification passed" in ran.stderr


def test_both_on_standard_output_is_a_usage_error(tmp_path):
    ran = in_process(inline_model(tmp_path), "-o", "-", "--report", "-")
    assert ran.code == 2 and "standard output" in ran.stderr


def test_a_model_is_not_written_to_a_terminal(tmp_path):
    source = inline_model(tmp_path)
    leader, follower = os.openpty()
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "bnfold.cli", str(source), "-o", "-", "-q"],
            stdout=follower,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert completed.returncode == 2, completed.stderr
    assert b"is a terminal" in completed.stderr


def test_external_data_to_a_stream_is_refused(tmp_path):
    device = char_device(tmp_path / "null")
    ran = in_process(inline_model(tmp_path), "-o", device, "--external-data")
    assert ran.code == 2 and "regular file" in ran.stderr, ran.output
    assert kind_of(device) == "char"


def test_writing_through_a_symlink_with_external_data_puts_the_data_beside_the_target(tmp_path):
    (tmp_path / "real").mkdir()
    link = tmp_path / "link.onnx"
    link.symlink_to(tmp_path / "real" / "folded.onnx")
    ran = in_process(external_model(tmp_path), "-o", link, "-q")
    assert ran.code == 0, ran.output
    assert link.is_symlink()
    assert (tmp_path / "real" / "folded.onnx.data").is_file()
    assert bnfold_io.load_model(tmp_path / "real" / "folded.onnx").used_external_data


# -- modes, stale data files ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [0o4755, 0o2755, 0o1755, 0o6775])
def test_special_mode_bits_are_never_carried_into_the_output(mode, tmp_path):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old")
    target.chmod(mode)
    bnfold_io.save_model(conv_bn_model(), target)
    assert stat.S_IMODE(target.stat().st_mode) == mode & 0o777


def test_a_previous_outputs_own_data_file_is_removed_when_the_new_one_is_inline(tmp_path):
    target = tmp_path / "out.onnx"
    bnfold_io.save_model(conv_bn_model(in_channels=16, out_channels=16), target, external_data=True)
    assert (tmp_path / "out.onnx.data").exists()

    bnfold_io.save_model(conv_bn_model(), target, external_data=False)

    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.onnx"]
    assert not bnfold_io.load_model(target).used_external_data


@pytest.mark.parametrize("previous", ["none", "inline", "other-data"])
def test_a_data_file_the_previous_output_did_not_use_is_kept(previous, tmp_path):
    target = tmp_path / "out.onnx"
    if previous == "inline":
        bnfold_io.save_model(conv_bn_model(), target)
    elif previous == "other-data":
        external_model(tmp_path, "out.onnx", data="weights.bin")
    (tmp_path / "out.onnx.data").write_bytes(b"somebody else's file")

    bnfold_io.save_model(conv_bn_model(), target, external_data=False)

    assert (tmp_path / "out.onnx.data").read_bytes() == b"somebody else's file"


# -- two writers -----------------------------------------------------------------------------------
def test_two_writers_of_one_output_never_pair_one_model_with_the_other_data(tmp_path, monkeypatch):
    """Writer A is paused between its data and its model rename while writer B writes the same
    output: B must wait for A's pair to be complete, so that the result is one writer's model with
    that writer's data (today's lock: bnfold writers of a folder rename in turn)."""
    target = tmp_path / "out.onnx"
    first = conv_bn_model(in_channels=16, out_channels=16, seed=1)
    second = conv_bn_model(in_channels=16, out_channels=16, seed=2)
    real_replace = os.replace
    finished = threading.Event()

    def replace(source, destination, *args, **kwargs):
        real_replace(source, destination, *args, **kwargs)
        if threading.current_thread() is threading.main_thread() and str(destination).endswith(".data"):
            other = threading.Thread(
                target=lambda: (bnfold_io.save_model(second, target, external_data=True), finished.set())
            )
            other.start()
            other.join(timeout=1.0)  # with the lock it is still waiting for this writer

    monkeypatch.setattr(os, "replace", replace)
    bnfold_io.save_model(first, target, external_data=True)
    assert finished.wait(timeout=30)
    monkeypatch.undo()

    written = bnfold_io.load_model(target).model
    weights = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in written.graph.initializer}
    expected = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in second.graph.initializer}
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(weights[name], value)
    assert temporary_files(tmp_path) == []


# -- signals -------------------------------------------------------------------------------------------
def test_sighup_is_held_during_the_commit_like_sigint():
    events = []
    previous = signal.signal(signal.SIGHUP, lambda number, frame: events.append("hangup"))
    try:
        with outputs.signals_held():
            signal.raise_signal(signal.SIGHUP)
            events.append("block finished")
        assert events == ["block finished", "hangup"]
    finally:
        signal.signal(signal.SIGHUP, previous)


HANGUP_SCRIPT = """
import os, signal, sys
import bnfold.cli
real_fsync = os.fsync
def fsync(descriptor):
    os.kill(os.getpid(), signal.SIGHUP)  # the terminal closes while the output is being written
    real_fsync(descriptor)
os.fsync = fsync
bnfold.cli.main(sys.argv[1:])
"""


def test_a_closed_terminal_leaves_no_temporary_file(tmp_path):
    source = external_model(tmp_path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    completed = subprocess.run(
        [sys.executable, "-c", HANGUP_SCRIPT, str(source), "-o", str(tmp_path / "out.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert completed.returncode == 128 + signal.SIGHUP, completed.stderr
    assert "interrupted (SIGHUP)" in completed.stderr
    assert temporary_files(tmp_path) == []
    # bnfold's own temporary files (verification copies, spill files); ONNX Runtime keeps a `.ses` file
    assert [path.name for path in scratch.iterdir() if path.name != ".ses"] == []
    assert not (tmp_path / "out.onnx").exists()


# -- a full disk ----------------------------------------------------------------------------------------
def test_a_full_disk_is_a_user_error_that_names_the_path(tmp_path, monkeypatch):
    source = inline_model(tmp_path)
    output = tmp_path / "out.onnx"

    def no_space(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    ran = in_process(source, "-o", output)
    assert ran.code == 2, ran.output
    (line,) = ran.stderr.strip().splitlines()
    assert str(output) in line and "no space left on device" in line
    assert temporary_files(tmp_path) == [] and not output.exists()


def test_a_full_disk_raises_an_output_error_that_is_still_an_os_error(tmp_path, monkeypatch):
    def no_space(descriptor):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OutputError, match="disk quota exceeded") as caught:
        bnfold_io.save_model(conv_bn_model(), tmp_path / "out.onnx", external_data=True)
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.EDQUOT
    assert list(tmp_path.iterdir()) == []


# -- code in model files ------------------------------------------------------------------------------
def crafted_pt2(directory: Path, marker: Path) -> Path:
    """A real torch.export archive whose saved example inputs are a pickle that touches ``marker``."""
    torch = pytest.importorskip("torch")
    import io
    import zipfile

    from tests.test_reliability import _Marker

    plain = directory / "plain.pt2"
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    torch.export.save(torch.export.export(module, (torch.randn(1, 3, 6, 6),)), str(plain))
    payload = io.BytesIO()
    torch.save((_Marker(marker),), payload)
    crafted = directory / "crafted.pt2"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(crafted, "w") as target:
        entries = [info for info in source.infolist() if info.filename.endswith("sample_inputs/model.pt")]
        assert entries, "the archive layout changed: update this test"
        for info in source.infolist():
            target.writestr(info, payload.getvalue() if info in entries else source.read(info))
    return crafted


@pytest.mark.parametrize("command", [[], ["inspect"]])
def test_a_pt2_is_not_loaded_without_trust(command, tmp_path):
    marker = tmp_path / "EXECUTED"
    crafted = crafted_pt2(tmp_path, marker)
    args = [*command, crafted] + ([] if command else ["-o", tmp_path / "out.onnx"])
    ran = in_process(*args)
    assert ran.code == 2, ran.output
    assert "--trust-pt2" in ran.stderr and "run code" in ran.stderr
    assert not marker.exists()
    assert not (tmp_path / "out.onnx").exists()


def test_the_crafted_pt2_does_run_code_when_trusted(tmp_path):
    """Proof that the test above guards something real, and that the flag's warning is true."""
    from bnfold.fx import load_torch_source

    marker = tmp_path / "EXECUTED"
    crafted = crafted_pt2(tmp_path, marker)
    with pytest.raises(Exception):  # noqa: B017 - what it raises after the code ran does not matter
        load_torch_source(str(crafted), trust_code=True)
    assert marker.exists()


FACTORY = """
import torch
def net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
def build():
    return net(), torch.randn(1, 3, 6, 6)
def wrong_inputs():
    return net(), torch.randn(1, 5, 6, 6)
"""


def test_a_factory_is_imported_from_the_current_directory(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from bnfold.fx import load_torch_source

    (tmp_path / "here_models.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", os.getcwd())])
    monkeypatch.delitem(sys.modules, "here_models", raising=False)
    module, inputs = load_torch_source("here_models:build")
    assert inputs[0].shape == (1, 3, 6, 6)
    assert str(tmp_path) not in sys.path  # not left behind for later imports
    sys.modules.pop("here_models", None)


def test_example_inputs_that_do_not_fit_are_named_without_library_tracebacks(tmp_path, monkeypatch, capfd):
    pytest.importorskip("torch")
    (tmp_path / "fit_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fit_models", raising=False)
    ran = in_process("fit_models:wrong_inputs", "-o", tmp_path / "out.onnx")
    printed = capfd.readouterr()
    sys.modules.pop("fit_models", None)
    assert ran.code == 2, ran.output
    (line,) = ran.stderr.strip().splitlines()
    assert "does not run on the example inputs" in line and "[[1, 5, 6, 6]]" in line
    assert "torch.cond" not in line
    assert "Traceback" not in printed.err + ran.output


# -- paths that are not UTF-8 -----------------------------------------------------------------------------
@pytest.mark.parametrize("external", [False, True])
def test_a_model_in_a_folder_whose_name_is_not_utf8_folds(external, tmp_path):
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/models\xff"))
    folder.mkdir()
    if external:  # (onnx itself cannot write external data into such a folder)
        made = external_model(tmp_path)
        source = folder / made.name
        made.rename(source)
        (tmp_path / "model.onnx.data").rename(folder / "model.onnx.data")
    else:
        source = folder / "model.onnx"
        onnx.save_model(conv_bn_model(in_channels=16, out_channels=16, seed=3), source)  # large weights: lazy
    # (with external data the output's own name must be UTF-8: see the next test)
    output = folder / ("out.onnx" if external else os.fsdecode(b"out\xfe.onnx"))
    ran = in_process(source, "-o", output, "-q")
    assert ran.code == 0, ran.output
    assert "BatchNormalization" not in op_types(bnfold_io.load_model(output).model)
    ran = in_process("verify", source, output, "-q")
    assert ran.code == 0, ran.output


def test_an_external_data_name_that_is_not_utf8_is_refused_in_one_line(tmp_path):
    output = Path(os.fsdecode(bytes(tmp_path) + b"/out\xff.onnx"))
    ran = in_process(external_model(tmp_path), "-o", output, "--external-data")
    assert ran.code == 2 and "not UTF-8" in ran.stderr, ran.output
    assert not output.exists()


# -- a fold that made the model invalid --------------------------------------------------------------------
def _breaking_fold(monkeypatch, how: str):
    import bnfold.pipeline

    real_fold = bnfold.pipeline.fold_onnx

    def fold(model, **options):
        result = real_fold(model, **options)
        conv = next(node for node in result.model.graph.node if node.op_type == "Conv")
        if how == "checker":  # a name nothing defines: the checker refuses it
            conv.input[1] = "nowhere"
        else:  # a valid graph ONNX Runtime cannot load: the weight's rank no longer fits the Conv
            weight = next(t for t in result.model.graph.initializer if t.name == conv.input[1])
            del weight.dims[-1]
            weight.dims[-1] *= 3
        return result

    monkeypatch.setattr(bnfold.pipeline, "fold_onnx", fold)


@pytest.mark.parametrize("how, flags", [("checker", ["--no-verify"]), ("checker", []), ("runtime", [])])
def test_a_model_the_fold_made_invalid_is_an_internal_error_and_not_written(
    how, flags, tmp_path, monkeypatch
):
    _breaking_fold(monkeypatch, how)
    output = tmp_path / "out.onnx"
    ran = in_process(inline_model(tmp_path), "-o", output, *flags)
    assert ran.code == 3, ran.output
    (line,) = ran.stderr.strip().splitlines()
    assert line.startswith("bnfold: internal error:") and "not written" in line
    assert not output.exists()
