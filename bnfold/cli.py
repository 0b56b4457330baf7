"""The ``bnfold`` command: a thin click layer over the Python API.

``bnfold MODEL -o OUT`` folds (the ``fold`` subcommand is implied), ``bnfold verify A B`` compares
two models, ``bnfold inspect MODEL`` reports what would fold. Exit codes: 0 success, 1 verification
mismatch, 2 bad input or usage, 3 internal error (a bug: set BNFOLD_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
import threading

import click

from bnfold.cli_types import ByteSize
from bnfold.core.table import ONNX, RULE_TABLE
from bnfold.core.table import rule_names as table_rule_names
from bnfold.errors import BnfoldError, InternalError
from bnfold.onnx import load_model
from bnfold.onnx.io import WeightStore, write_atomically
from bnfold.onnx.outputs import STDOUT
from bnfold.pipeline import check_report_path, fold_file, naming
from bnfold.progress import Progress, TerminalProgress, step
from bnfold.report import Report
from bnfold.sources import is_torch_source
from bnfold.verify import PROVIDERS, VerificationResult, parse_input_shapes, verify
from bnfold.version import __version__

__all__ = ["cli", "main"]

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

# How the command line spells the API parameters that errors name (see BnfoldError.worded).
FLAGS = {
    "verify": "--no-verify",
    "force": "--force",
    "simplify": "--simplify",
    "inputs": "--inputs",
    "input_shapes": "--input-shape",
    "report_path": "--report",
    "skip_rules": "--skip-rule",
    "external_data": "--external-data",
    "provider": "--provider",
    "benchmark_runs": "--benchmark",
}


class _FoldByDefault(click.Group):
    """A group whose first argument, when it is not a subcommand, is a model to fold."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["fold", *args]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BnfoldError as error:
            click.echo(f"bnfold: error: {error.worded(FLAGS)}", err=True)
            ctx.exit(EXIT_USAGE)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt as interrupt:
            # Temporary files are gone by now (the writers remove them on any exception): what is
            # on disk is the previous output or a complete new one, never part of one.
            signum = interrupt.signum if isinstance(interrupt, Terminated) else signal.SIGINT
            _interrupted_exit(ctx, signum)
        except InternalError as error:
            if os.environ.get("BNFOLD_DEBUG"):
                raise
            click.echo(f"bnfold: internal error: {error} (a bug in bnfold; please report it)", err=True)
            ctx.exit(EXIT_INTERNAL)
        except Exception as error:
            if _INTERRUPTED:
                # An interrupt that a library turned into another exception (Ctrl-C while torch or
                # onnxruntime was being imported): still the user's Ctrl-C, not a bug.
                _interrupted_exit(ctx, _INTERRUPTED[-1])
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                where = f"{error.filename}: " if error.filename else ""
                click.echo(f"bnfold: error: {where}{error.strerror}; free space and rerun", err=True)
                ctx.exit(EXIT_USAGE)
            if os.environ.get("BNFOLD_DEBUG"):
                raise
            click.echo(
                f"bnfold: internal error: {type(error).__name__}: {error} "
                "(a bug in bnfold; rerun with BNFOLD_DEBUG=1 for the traceback and report it)",
                err=True,
            )
            ctx.exit(EXIT_INTERNAL)


def _interrupted_exit(ctx: click.Context, signum: int) -> None:
    click.echo(f"bnfold: interrupted ({signal.Signals(signum).name}); no partial file left", err=True)
    ctx.exit(128 + signum)


def _tolerance(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not value >= 0:  # also refuses NaN
        raise click.BadParameter(f"{value} is not a number >= 0")
    return value


def _verification_options(function):
    options = [
        click.option(
            "--provider",
            type=click.Choice(PROVIDERS),
            default="auto",
            show_default=True,
            help="ONNX Runtime execution provider; auto = CUDA when usable, else CPU.",
        ),
        click.option(
            "--atol",
            type=float,
            default=None,
            callback=_tolerance,
            help="Absolute tolerance (default by dtype, scaled to each output's magnitude).",
        ),
        click.option(
            "--rtol",
            type=float,
            default=None,
            callback=_tolerance,
            help="Relative tolerance (default by dtype).",
        ),
        click.option(
            "--input-shape",
            "input_shapes",
            multiple=True,
            metavar="NAME=D1,D2,...",
            help="Shape for an input with dynamic dimensions (repeatable); default 1.",
        ),
        click.option(
            "--inputs",
            "inputs_path",
            type=click.Path(dir_okay=False),
            default=None,
            help="Real input data: an .npz file with one array per model input.",
        ),
        click.option(
            "--seed",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Seed for random inputs (input i uses seed + i).",
        ),
        click.option(
            "--report",
            "report_path",
            type=click.Path(dir_okay=False),
            default=None,
            help="Also write the report as JSON to this file ('-': standard output).",
        ),
        click.option(
            "--strict",
            is_flag=True,
            help="Judge by the tolerance alone (no float64 reference for outputs over it).",
        ),
        click.option(
            "--exact-reference",
            is_flag=True,
            help="Always evaluate the original in float64 and show both models' distance from it.",
        ),
        click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors."),
        *_output_options(),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _output_options() -> list:
    """``--json`` (the result on stdout, the text on stderr) and ``-v`` (debug logs)."""
    return [
        click.option(
            "--json",
            "as_json",
            is_flag=True,
            help="Print the result as JSON on stdout (text goes to stderr).",
        ),
        click.option("-v", "--verbose", is_flag=True, help="Log each step and decision (debug logs)."),
    ]


def _start(quiet: bool, verbose: bool) -> Progress | None:
    """Logging for ``-v``, and progress lines on stderr when it is a terminal (never with ``-q``)."""
    if verbose:
        logging.getLogger("bnfold").setLevel(logging.DEBUG)
    if quiet or not sys.stderr.isatty():
        return None
    # BNFOLD_PROGRESS_DELAY: seconds a step runs before it gets a line (default 1).
    return TerminalProgress(sys.stderr, delay=float(os.environ.get("BNFOLD_PROGRESS_DELAY", "1")))


def _rule_options(function):
    """``--skip-rule`` (checked against the model's kind: :func:`_checked_skips`) and
    ``--rewrite-standalone-bn``."""
    function = click.option(
        "--rewrite-standalone-bn",
        "rewrite_standalone",
        is_flag=True,
        help="Rewrite each BN that nothing absorbs as Mul + Add (for runtimes that want no BN).",
    )(function)
    return click.option(
        "--skip-rule",
        "skip_rules",
        multiple=True,
        metavar="RULE",
        help="Do not apply this rule (repeatable); `bnfold rules` lists them.",
    )(function)


def _trust_option(function):
    """``--trust-pt2``: a ``.pt2`` archive is only loaded when the user says it is trusted."""
    return click.option(
        "--trust-pt2",
        "trust_pt2",
        is_flag=True,
        help="Load a .pt2 MODEL. torch.export.load unpickles parts of the archive, so a .pt2 file "
        "can run arbitrary code: pass this only for files you trust.",
    )(function)


@click.group(cls=_FoldByDefault, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnfold")
def cli() -> None:
    """Fold BatchNorm into neighbouring layers of an ONNX model and verify the result.

    \b
    bnfold MODEL.onnx -o FOLDED.onnx    fold, verify, write, print the report
    bnfold verify ORIGINAL FOLDED       compare two models in ONNX Runtime
    bnfold inspect MODEL.onnx           report what would fold; write nothing
    bnfold rules                        list the fold rules (names for --skip-rule)
    """


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True))
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    default=None,
    help="Where to write the folded model ('-': standard output, not a terminal).",
)
@click.option("--no-verify", is_flag=True, help="Skip the ONNX Runtime equivalence check.")
@click.option("--force", is_flag=True, help="Write the output even when verification fails (exit 1).")
@click.option("--dry-run", is_flag=True, help="Fold and verify in memory; write no model.")
@click.option("--simplify", is_flag=True, help="Run onnxsim after folding (pip install 'bnfold[simplify]').")
@_rule_options
@click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Store weights in OUTPUT.data (default: as the input did, or when over 2 GB).",
)
@click.option(
    "--benchmark",
    "benchmark_runs",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Time the model before and after in ONNX Runtime (default optimizations, median of N runs).",
)
@click.option(
    "--memory-budget",
    "memory_budget",
    type=ByteSize(),
    default=None,
    metavar="SIZE",
    help="Keep up to SIZE of new weights in memory (e.g. 64M, 2G; default 512M); the rest go to a "
    "temporary file, deleted when bnfold exits.",
)
@_verification_options
@_trust_option
def fold(
    model,
    output,
    no_verify,
    force,
    dry_run,
    simplify,
    skip_rules,
    rewrite_standalone,
    external_data,
    provider,
    atol,
    rtol,
    input_shapes,
    inputs_path,
    seed,
    report_path,
    strict,
    exact_reference,
    quiet,
    as_json,
    verbose,
    benchmark_runs,
    memory_budget,
    trust_pt2,
) -> None:
    """Fold BatchNormalization nodes of MODEL into Conv/ConvTranspose/Gemm/MatMul.

    MODEL is an ONNX file, or a PyTorch model (model.pt2 from torch.export.save, or
    package.module:factory) which is folded in torch, exported to ONNX, folded again and verified
    against the original module. A .pt2 file can run code when loaded: it needs --trust-pt2.
    package.module:factory imports and runs that Python code (the current directory first, as
    python -m does).
    """
    if output is None and not dry_run:
        raise click.UsageError("missing -o/--output (or pass --dry-run to write nothing)")
    if as_json and STDOUT in (output, report_path):
        raise click.UsageError("--json prints on standard output, which -o - / --report - already use")
    exact = _exact_mode(strict, exact_reference)
    result = fold_file(
        model,
        None if dry_run else output,
        verify=not no_verify,
        force=force,
        simplify=simplify,
        skip_rules=_checked_skips(model, skip_rules),
        rewrite_standalone=rewrite_standalone,
        external_data=external_data,
        provider=provider,
        atol=atol,
        rtol=rtol,
        input_shapes=parse_input_shapes(input_shapes),
        inputs=inputs_path,
        seed=seed,
        report_path=report_path,
        exact=exact,
        benchmark_runs=benchmark_runs or 0,
        digest_output=as_json or None,
        progress=_start(quiet, verbose),
        trust_code=trust_pt2,
        store=None if memory_budget is None else WeightStore(memory_budget=memory_budget),
    )
    if as_json:
        click.echo(result.report.to_json())
    if not quiet:  # to standard error when standard output carries JSON or the model
        click.echo(result.to_text(), err=as_json or STDOUT in (output, report_path))
    if not result.passed:
        written = "written anyway (--force)" if result.written else "not written"
        click.echo(f"bnfold: verification FAILED: {_worst(result.verification)}; output {written}", err=True)
        sys.exit(EXIT_MISMATCH)


@cli.command(name="verify")
@click.argument("original", type=click.Path(dir_okay=True))
@click.argument("folded", type=click.Path(dir_okay=True))
@_verification_options
def verify_command(
    original,
    folded,
    provider,
    atol,
    rtol,
    input_shapes,
    inputs_path,
    seed,
    report_path,
    strict,
    exact_reference,
    quiet,
    as_json,
    verbose,
) -> None:
    """Compare two existing models in ONNX Runtime; exit 1 when any output differs."""
    progress = _start(quiet, verbose)
    shapes = parse_input_shapes(input_shapes)
    exact = _exact_mode(strict, exact_reference)
    if as_json and report_path == STDOUT:
        raise click.UsageError("--json prints on standard output, which --report - already uses")
    if report_path:
        check_report_path(report_path, original, folded, inputs_path)
    # Checked up front (lazily: weights stay on disk); each then runs from its file, one at a time.
    with step(progress, f"loading {original} and {folded}"):
        loaded = [load_model(original, lazy=True), load_model(folded, lazy=True)]
    if report_path:  # nor over the models' external data
        check_report_path(report_path, *(path for model in loaded for path in model.external_files))
    with naming(original, when="the original model"), naming(folded, when="the folded model"):
        result = verify(
            original,
            folded,
            exact=exact,
            provider=provider,
            input_shapes=shapes,
            inputs=inputs_path,
            seed=seed,
            atol=atol,
            rtol=rtol,
            progress=progress,  # each session and run is a step
        )
    report = Report(
        source=str(original),
        extras={"bnfold_version": __version__, "folded": str(folded), "verification": result.to_dict()},
    )
    if as_json:
        click.echo(report.to_json())
    if not quiet:
        click.echo(result.to_text(), err=as_json or report_path == STDOUT)
    if report_path:
        write_atomically(report_path, report.to_json().encode())
    if not result.passed:
        click.echo(f"bnfold: verification FAILED: {_worst(result)}", err=True)
        sys.exit(EXIT_MISMATCH)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=True))
@_rule_options
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME=D1,D2,...",
    help="Example input shape of a PyTorch model (repeatable).",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the report as JSON to this file ('-': standard output).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("-v", "--verbose", is_flag=True, help="Log each step and decision (debug logs).")
@_trust_option
def inspect(
    model, skip_rules, rewrite_standalone, input_shapes, report_path, as_json, verbose, trust_pt2
) -> None:
    """Report what would happen to every normalization node of MODEL; write no model.

    A PyTorch MODEL (.pt2 with --trust-pt2, or package.module:factory) is folded and exported in
    memory, unverified.
    """
    if input_shapes and not is_torch_source(model):
        raise click.UsageError("--input-shape is for PyTorch models; inspect reads no ONNX inputs")
    result = fold_file(
        model,
        None,
        verify=False,
        skip_rules=_checked_skips(model, skip_rules),
        rewrite_standalone=rewrite_standalone,
        input_shapes=parse_input_shapes(input_shapes),
        report_path=report_path,
        progress=_start(False, verbose),
        trust_code=trust_pt2,
    )
    text = result.report.to_json() if as_json else result.to_text(operators=False)
    click.echo(text, err=report_path == STDOUT)


def _exact_mode(strict: bool, exact_reference: bool) -> str:
    if strict and exact_reference:
        raise click.UsageError("--strict and --exact-reference contradict each other; pass one")
    return "strict" if strict else "always" if exact_reference else "auto"


def _checked_skips(model: str, skip_rules) -> list[str]:
    """``--skip-rule`` names for this kind of model: an ONNX file takes the ONNX rules (a PyTorch-only
    name is refused as such), a PyTorch model the rules of either backend (it is folded in torch, then
    as ONNX after export)."""
    skips = list(skip_rules)
    onnx_names, all_names = table_rule_names(ONNX), table_rule_names()
    known = all_names if is_torch_source(model) else onnx_names
    for name in skips:
        if name in known:
            continue
        if name in all_names:
            message = f"rule(s) {name} apply to PyTorch models only (ONNX rules: {', '.join(onnx_names)})"
        else:
            kind = "PyTorch" if is_torch_source(model) else "ONNX"
            message = f"{name!r} is not one of the {kind} rules ({', '.join(known)}; see `bnfold rules`)"
        raise click.BadParameter(message, param_hint="'--skip-rule'")
    return skips


@cli.command(name="rules")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def rules_command(as_json: bool) -> None:
    """List the fold rules: name, pattern, backends, notes (names for --skip-rule)."""
    if as_json:
        rows = [
            {
                "name": info.name,
                "pattern": info.pattern.replace("`", ""),
                "backends": sorted(info.backends),
                "notes": info.notes,
            }
            for info in RULE_TABLE
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    table = [("rule", "pattern", "backends", "notes")]
    for info in RULE_TABLE:
        backends = "onnx, torch" if len(info.backends) > 1 else next(iter(info.backends))
        table.append((info.name, info.pattern.replace("`", ""), backends, info.notes))
    widths = [max(len(row[index]) for row in table) for index in range(3)]
    for index, row in enumerate(table):
        cells = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
        click.echo("  ".join([*cells, row[3]]).rstrip())
        if index == 0:
            click.echo("  ".join("-" * width for width in [*widths, 5]))


def _worst(result: VerificationResult) -> str:
    failing = [output for output in result.outputs if not output.passed]
    if not failing:  # end to end every output matched: a subgraph checked locally did not
        checks = [check for check in result.local if not check.passed]
        return "a subgraph the inputs do not reach end to end differs when checked locally: " + "; ".join(
            check.describe() for check in checks
        )
    if all(output.note.startswith("compared nothing") for output in failing):
        return "every output is empty, so nothing was compared (a 0-sized dimension); nothing is verified"
    names = ", ".join(output.name for output in failing)
    worst = max(failing, key=lambda output: output.max_abs_error)
    if worst.note and worst.max_abs_error == float("inf"):  # not a numeric difference: say what
        return f"{len(failing)} output(s) differ ({names}): {worst.note}"
    text = (
        f"{len(failing)} output(s) differ ({names}); worst max abs error {worst.max_abs_error:.3g} "
        f"> atol {worst.atol:.3g} + rtol {worst.rtol:.3g}"
    )
    if worst.exact is not None and worst.exact.usable:  # over tolerance, and the float64 judgment agreed
        text += f", and {worst.exact.describe()}"
    elif result.reference and result.reference.get("skipped"):
        text += f" (float64 reference skipped: {result.reference['skipped']})"
    return text


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that temporary files are removed on the way out.

    (Python's default action for SIGTERM ends the process at once, leaving temporary files behind.)
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame) -> None:
    _INTERRUPTED.append(signum)
    raise Terminated(signum)


# The interrupts this process received (see _FoldByDefault.invoke).
_INTERRUPTED: list[int] = []


def _interrupt(signum: int, frame) -> None:
    _INTERRUPTED.append(signum)
    raise KeyboardInterrupt


def _print_any_file_name() -> None:
    """Let the text streams print a file name that is not valid in the locale's encoding.

    A name read from the command line carries its undecodable bytes as surrogates; under a strict
    locale (en_US.UTF-8, unlike C.UTF-8) printing "wrote <name>" would raise after the model was
    written. Surrogate escapes give the terminal the name's own bytes back.
    """
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and getattr(stream, "errors", None) == "strict":
            reconfigure(errors="surrogateescape")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="bnfold: %(levelname)s: %(message)s")
    _print_any_file_name()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _terminate)
        if hasattr(signal, "SIGHUP"):  # a closed terminal: clean up like Ctrl-C
            signal.signal(signal.SIGHUP, _terminate)
    cli.main(args=argv, prog_name="bnfold")


if __name__ == "__main__":  # pragma: no cover
    main()
