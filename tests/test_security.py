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
from bnfold.errors import InputSpecError, OutputError
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


@pytest.mark.parametrize("dry_run", [False, True])
def test_benchmark_runs_models_in_a_folder_whose_name_is_not_utf8(dry_run, tmp_path):
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/models\xff"))
    folder.mkdir()
    source = inline_model(folder)
    output = folder / os.fsdecode(b"out\xfe.onnx")
    written = ["--dry-run"] if dry_run else ["-o", output]
    ran = in_process(source, *written, "-q", "--benchmark", "2", "--report", tmp_path / "report.json")
    assert ran.code == 0, ran.output
    latency = json.loads((tmp_path / "report.json").read_text())["latency"]
    assert latency["before_ms"] > 0 and latency["after_ms"] > 0
    assert output.exists() is not dry_run


def test_the_command_prints_a_file_name_that_is_not_utf8_under_a_strict_locale(tmp_path):
    """'wrote <name>' with the name's own bytes, not a UnicodeEncodeError after the model was written."""
    source = inline_model(tmp_path)
    output = Path(os.fsdecode(bytes(tmp_path) + b"/out\xfe.onnx"))
    environment = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}  # as under en_US.UTF-8
    ran = subprocess.run(
        [sys.executable, "-c", "from bnfold.console import main; main()", str(source), "-o", bytes(output)],
        capture_output=True,
        env=environment,
    )
    assert ran.returncode == 0, ran.stderr.decode(errors="replace")
    assert b"wrote " + bytes(output) in ran.stdout
    assert "BatchNormalization" not in op_types(bnfold_io.load_model(output).model)


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
        elif how == "renamed":  # a valid model ONNX Runtime runs, but its output has another name
            (output,) = result.model.graph.output
            for node in result.model.graph.node:
                node.output[:] = [name + "_renamed" if name == output.name else name for name in node.output]
            output.name += "_renamed"
        else:  # a valid graph ONNX Runtime cannot load: the weight's rank no longer fits the Conv
            weight = next(t for t in result.model.graph.initializer if t.name == conv.input[1])
            del weight.dims[-1]
            weight.dims[-1] *= 3
        return result

    monkeypatch.setattr(bnfold.pipeline, "fold_onnx", fold)


@pytest.mark.parametrize(
    "how, flags",
    [("checker", ["--no-verify"]), ("checker", []), ("runtime", []), ("renamed", [])],
)
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


# -- interrupts while the command is still starting ---------------------------------------------------------
_STARTING = (
    "import os, sys; os.write(1, b'ready\\n'); "
    "from bnfold.console import main; sys.argv[0] = 'bnfold'; main()"
)  # what the installed `bnfold` script runs, saying when Python itself has started


def test_the_command_runs_bnfold_console():
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="bnfold")
    assert script.value == "bnfold.console:main"


def test_signals_while_the_command_starts_exit_in_one_line(tmp_path):
    """Ctrl-C (or SIGTERM, SIGHUP) at any moment of start-up: one line, never a traceback, exit
    128 + the signal (or 0 when the fold finished first), no partial file."""
    source = inline_model(tmp_path)
    cases = [(signal.SIGINT, delay) for delay in (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 1.2)]
    cases += [(signal.SIGTERM, 0.15), (signal.SIGTERM, 0.4), (signal.SIGHUP, 0.25)]
    processes = []
    for number, (signum, delay) in enumerate(cases):
        process = subprocess.Popen(
            [sys.executable, "-c", _STARTING, str(source), "-o", str(tmp_path / f"out{number}.onnx")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
        processes.append((process, signum, threading.Timer(delay, process.send_signal, (signum,))))
    for _, _, timer in processes:  # (all started: each delay counts from its process's start)
        timer.start()
    for number, (process, signum, timer) in enumerate(processes):
        _, stderr = process.communicate(timeout=120)
        timer.join()
        text = stderr.decode(errors="replace")
        assert "Traceback" not in text, text
        # A signal that lands after the fold wrote its output, while Python shuts down (its handlers
        # already restored to the default), ends the process by that signal, silently: fine.
        finished = (tmp_path / f"out{number}.onnx").exists()
        expected = (0, 128 + signum, -signum) if finished else (0, 128 + signum)
        assert process.returncode in expected, (signum, process.returncode, text)
        if process.returncode == 128 + signum:
            (line,) = text.strip().splitlines()
            assert line.startswith(f"bnfold: interrupted ({signal.Signals(signum).name})")
    assert temporary_files(tmp_path) == []
    for output in tmp_path.glob("out*.onnx"):  # a fold that finished first wrote a whole model
        assert "BatchNormalization" not in op_types(bnfold_io.load_model(output).model)


def test_import_bnfold_is_light_and_its_names_resolve_on_use():
    code = (
        "import sys, bnfold; heavy = {'onnx', 'numpy', 'onnxruntime'} & set(sys.modules); "
        "import bnfold.cli; "  # imports the submodule bnfold.verify: bnfold.verify stays the function
        "print(sorted(heavy), bnfold.verify.__module__, bnfold.fold_file.__name__, len(bnfold.RULES) > 0)"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert ran.stdout.split() == ["[]", "bnfold.verify", "fold_file", "True"]
    import bnfold

    assert set(bnfold.__all__) <= set(dir(bnfold))
    for name in bnfold.__all__:
        assert getattr(bnfold, name) is not None
    with pytest.raises(AttributeError):
        bnfold.no_such_name  # noqa: B018


# -- user errors that used to be "internal": broken --inputs files, huge shapes, NUL bytes, interrupts ----
def _npz_bytes(**arrays) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _forged_header(directory: Path) -> Path:
    """An .npz whose one entry's header claims a 10^12-element array the entry does not hold."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)}
    )
    path = directory / "forged.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + b"\0" * 64)
    return path


def _compression_bomb(directory: Path) -> Path:
    """An entry that claims (and holds) 2^40 zero bytes in a few MB: never inflated."""
    import zipfile

    path = directory / "bomb.npz"
    header = __import__("io").BytesIO()
    count = 2**38  # float32: 2^40 bytes
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (count,)})
    info = zipfile.ZipInfo("x.npy")
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w") as archive:
        with archive.open(info, "w", force_zip64=True) as member:
            member.write(header.getvalue())
            block = bytes(1 << 24)
            for _ in range(64):  # 1 GiB written, compressed to ~1 MB; then the size is forged
                member.write(block)
    # Forge the declared uncompressed size in both headers to the full 2^40 bytes + header.
    data = bytearray(path.read_bytes())
    claimed = (count * 4 + len(header.getvalue())).to_bytes(8, "little")
    real = (64 * (1 << 24) + len(header.getvalue())).to_bytes(8, "little")
    assert data.count(real) >= 1
    path.write_bytes(bytes(data).replace(real, claimed))
    return path


BROKEN_INPUTS = {
    "empty": lambda directory: _write(directory / "empty.npz", b""),
    "truncated": lambda directory: _write(
        directory / "truncated.npz", _npz_bytes(x=np.ones((2, 4, 7, 7), np.float32))[:300]
    ),
    "truncated-npy": lambda directory: _single_npy(directory),
    "not-a-zip": lambda directory: _write(directory / "text.npz", b"x = [1, 2, 3]\n"),
    "forged-header": _forged_header,
    "object-array": lambda directory: _write(
        directory / "objects.npz", _npz_bytes(x=np.array([{"a": 1}], dtype=object))
    ),
    "empty-batch": lambda directory: _write(
        directory / "batch0.npz", _npz_bytes(x=np.zeros((0, 4, 7, 7), np.float32))
    ),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _single_npy(directory: Path) -> Path:
    """An .npy (accepted for a one-input model) cut short: its header claims more than it holds."""
    path = directory / "single.npy"
    with open(path, "wb") as handle:
        np.save(handle, np.ones((2, 4, 7, 7), np.float32))
    path.write_bytes(path.read_bytes()[:-100])
    return path


@pytest.mark.parametrize("command", ["fold", "verify"])
@pytest.mark.parametrize("case", sorted(BROKEN_INPUTS))
def test_broken_inputs_files_are_one_line_user_errors(case, command, tmp_path):
    source = inline_model(tmp_path)
    inputs = BROKEN_INPUTS[case](tmp_path)
    args = [source, "-o", tmp_path / "out.onnx"] if command == "fold" else ["verify", source, source]
    ran = in_process(*args, "--inputs", inputs)
    assert ran.code == 2, ran.output
    (line,) = ran.stderr.strip().splitlines()
    assert line.startswith("bnfold: error: ") and "Traceback" not in ran.output
    assert inputs.name in line
    assert not (tmp_path / "out.onnx").exists()


def test_a_compression_bomb_is_refused_before_it_is_inflated(tmp_path):
    from bnfold.input_limits import read_npz

    bomb = _compression_bomb(tmp_path)
    with pytest.raises(InputSpecError, match="memory available|holds"):
        read_npz(bomb)


def _with_input_shape(model: onnx.ModelProto, dims: list[int]) -> onnx.ModelProto:
    shape = model.graph.input[0].type.tensor_type.shape
    for dim, size in zip(shape.dim, dims, strict=True):
        dim.ClearField("dim_param")
        dim.dim_value = size
    return model


def test_a_static_input_shape_beyond_memory_is_a_user_error(tmp_path):
    source = tmp_path / "huge.onnx"
    onnx.save_model(_with_input_shape(conv_bn_model(), [100000, 4, 1000, 1000]), source)
    ran = in_process(source, "-o", tmp_path / "out.onnx")
    assert ran.code == 2, ran.output
    (line,) = ran.stderr.strip().splitlines()
    assert "memory available" in line and "--no-verify" in line
    assert not (tmp_path / "out.onnx").exists()


def test_a_dynamic_input_shape_beyond_memory_suggests_smaller_sizes(tmp_path):
    source = inline_model(tmp_path)
    ran = in_process(source, "-o", tmp_path / "out.onnx", "--input-shape", "x=100000000,4,7,7")
    assert ran.code == 2 and "--input-shape with smaller" in ran.stderr, ran.output


# -- verification that compared nothing ---------------------------------------------------------------
def test_a_batch_of_zero_in_the_inputs_file_compares_nothing_and_is_refused(tmp_path):
    original = inline_model(tmp_path, "a.onnx")
    other = tmp_path / "b.onnx"
    onnx.save_model(conv_bn_model(seed=5), other)  # different weights: any real comparison fails
    inputs = BROKEN_INPUTS["empty-batch"](tmp_path)
    ran = in_process("verify", original, other, "--inputs", inputs)
    assert ran.code == 2, ran.output
    assert "nothing would be compared" in ran.stderr


def test_a_model_with_a_static_empty_dimension_does_not_pass_verification(tmp_path):
    original = tmp_path / "a.onnx"
    other = tmp_path / "b.onnx"
    onnx.save_model(_with_input_shape(conv_bn_model(), [0, 4, 7, 7]), original)
    onnx.save_model(_with_input_shape(conv_bn_model(seed=5), [0, 4, 7, 7]), other)
    ran = in_process("verify", original, other)
    assert ran.code == 1, ran.output
    assert "nothing was compared" in ran.stderr
    ran = in_process(original, "-o", tmp_path / "out.onnx")
    assert ran.code == 1 and not (tmp_path / "out.onnx").exists(), ran.output


# -- external data: NUL bytes, model-local functions ---------------------------------------------------
@pytest.mark.parametrize("command", ["fold", "verify", "inspect"])
def test_a_nul_byte_in_an_external_data_location_is_a_load_error(command, tmp_path):
    source = external_model(tmp_path)
    model = onnx.load(source, load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "model.onnx.data\0../../etc/passwd"
    onnx.save_model(model, source)
    args = {"fold": [source, "-o", tmp_path / "out.onnx"], "verify": ["verify", source, source]}
    ran = in_process(*args.get(command, ["inspect", source]))
    assert ran.code == 2, ran.output
    (line,) = ran.stderr.strip().splitlines()
    assert "NUL" in line and str(source) in line


def function_model() -> onnx.ModelProto:
    """Conv -> BN -> local.AddBias, a model-local function whose body adds a Constant (a tensor
    that external-data saving moves to the data file)."""
    from onnx import helper

    model = conv_bn_model(in_channels=4, out_channels=6, seed=4)
    bias = np.random.default_rng(1).standard_normal((1, 6, 1, 1)).astype(np.float32) * 300
    body = [
        helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(bias, "c")),
        helper.make_node("Add", ["X", "c"], ["Y"]),
    ]
    function = helper.make_function("local", "AddBias", ["X"], ["Y"], body, [helper.make_opsetid("", 17)])
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid("local", 1))
    bn = next(node for node in model.graph.node if node.op_type == "BatchNormalization")
    bn.output[0] = "bn_out"
    model.graph.node.append(helper.make_node("AddBias", ["bn_out"], ["y"], domain="local"))
    return model


def test_external_data_inside_model_local_functions_is_resolved(tmp_path, monkeypatch):
    source_dir, output_dir, elsewhere = tmp_path / "in", tmp_path / "out", tmp_path / "cwd"
    for folder in (source_dir, output_dir, elsewhere):
        folder.mkdir()
    model = function_model()
    source = source_dir / "model.onnx"
    onnx.save_model(model, source, save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    # onnx moves graph tensors only: move the function's Constant value into the data file too
    stored = onnx.load(source, load_external_data=False)
    constant = stored.functions[0].node[0].attribute[0].t
    data_file = source_dir / "model.onnx.data"
    offset = data_file.stat().st_size
    with open(data_file, "ab") as handle:
        handle.write(constant.raw_data)
    onnx.external_data_helper.set_external_data(
        constant, "model.onnx.data", offset=offset, length=len(constant.raw_data)
    )
    constant.ClearField("raw_data")
    constant.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(stored, source)
    monkeypatch.chdir(elsewhere)

    for external in ("--external-data", "--no-external-data"):
        output = output_dir / f"folded{external}.onnx"
        ran = in_process(source, "-o", output, external)
        assert ran.code == 0, ran.output
        written = onnx.load(output, load_external_data=False)
        constant = written.functions[0].node[0].attribute[0].t
        assert not onnx.external_data_helper.uses_external_data(constant)  # inline: nothing to miss
        import onnxruntime

        feeds = {"x": np.random.default_rng(0).standard_normal((2, 4, 7, 7)).astype(np.float32)}
        (expected,) = onnxruntime.InferenceSession(str(source)).run(None, feeds)
        (actual,) = onnxruntime.InferenceSession(str(output)).run(None, feeds)
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-3)


INTERRUPTED_IMPORT = """
import importlib.abc, os, signal, sys, time
class Interrupted(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "onnxruntime":
            try:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while onnxruntime is being imported
                time.sleep(5)
            except KeyboardInterrupt:
                # what an extension module's initialisation can turn the interrupt into
                raise ImportError("initialization of onnxruntime interrupted") from None
        return None
sys.meta_path.insert(0, Interrupted())
import bnfold.cli
bnfold.cli.main(sys.argv[1:])
"""


def test_ctrl_c_while_onnxruntime_is_imported_is_an_interrupt_not_a_bug(tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            INTERRUPTED_IMPORT,
            str(inline_model(tmp_path)),
            "-o",
            str(tmp_path / "out.onnx"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 130, completed.stderr
    assert "interrupted (SIGINT)" in completed.stderr and "internal error" not in completed.stderr
    assert not (tmp_path / "out.onnx").exists() and temporary_files(tmp_path) == []
