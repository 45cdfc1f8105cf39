"""``prunecomp-export RECIPE.yaml``: a thin command line over ``pipeline.run``; and the stage commands
``verify``, ``export``, ``serve`` and ``bench``, which act on an existing output (``commands``).

Exit codes (``EXIT_CODES``): 0 done (and every sign-off threshold passed), 1 a sign-off threshold,
a parity check or a verification failed, 2 bad input (recipe, model, output, option, missing
runtime), 130 interrupted (Ctrl-C or SIGTERM).

Bad input ends with one line on stderr, ``prunecomp-export: error: <file>, <key path>: <problem>``;
a bad option (``--device cuda:7``) too, as a usage error. What a line quotes from the input (a file
name with a newline in it) is escaped."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from prunecomp_export.child import interrupting_signals
from prunecomp_export.errors import PrunecompError, RecipeError, shown
from prunecomp_export.output.outputdir import WRITE_ERRNOS, write_error_message
from prunecomp_export.registry import UnknownName

#: the exit codes, as ``--help`` and the README list them
EXIT_CODES = {
    0: "done, and every sign-off threshold passed",
    1: "a sign-off threshold, a target's parity check or `verify` failed",
    2: "bad input: recipe, model, output directory, option, missing runtime, a memory budget too small for a "
    "stage (one line on stderr)",
    3: "a stage failed for another reason: a crash or timeout in a child process (the line names its log)",
    130: "interrupted by Ctrl-C or SIGTERM; nothing half-written is left",
}
#: the environment variables that change what the tool does, as ``--help`` and the README list them
ENVIRONMENT = {
    "PRUNECOMP_CACHE": "cache directory (dequantised GGUF, dense results, offline QA tasks); "
    "default ~/.cache/prunecomp_export",
    "PRUNECOMP_VLLM_PYTHON": "the python that has vllm (targets.vllm.python overrides it); default: this one",
    "PRUNECOMP_REQUIRE_VLLM": "1: the integration tests fail, instead of skipping, when vLLM is missing (CI)",
    "HF_HUB_OFFLINE": "1: never contact the Hugging Face hub (local sources and offline tasks only)",
    "HF_HOME": "where the Hugging Face hub cache lives (hub ids, lm-eval datasets)",
    "CUDA_VISIBLE_DEVICES": "the GPUs that `auto`, `cuda` and `cuda:N` choose from",
    "VLLM_CPU_OMP_THREADS_BIND": "vLLM on the CPU: the cores its threads bind to; the bench binds the first "
    "bench.threads cores unless this is set",
    "VLLM_HOST_IP": "the address vLLM's engine processes talk over; 127.0.0.1 for the bench and a loopback "
    "server unless this is set",
}

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 120}


def _epilog() -> str:
    codes = "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_CODES.items())
    names = "\n".join(f"  {name:<23} {meaning}" for name, meaning in ENVIRONMENT.items())
    return f"\b\nExit codes:\n{codes}\n\n\b\nEnvironment:\n{names}"


class _RecipeOrCommand(click.Group):
    """``prunecomp-export RECIPE.yaml ...`` runs the pipeline, as it always has; a first argument that
    names a command (``verify``, ``export``, ``serve``, ``bench``, ``run``) runs that command instead.
    A usage error (an unknown option, ``--device cuda:7``) is one line and exit code 2, like any bad input."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help", "--version"):
            args = ["run", *args]
        return super().parse_args(ctx, args)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("standalone_mode", None)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            _fail("interrupted; nothing was written", 130)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_RecipeOrCommand, context_settings=CONTEXT, epilog=_epilog())
@click.version_option(package_name="prunecomp-export")
def main() -> None:
    """Prune whole decoder layers with Prune&Comp and export the smaller model.

    \b
    prunecomp-export RECIPE.yaml [OPTIONS]   prune, evaluate, save, export (same as `run`)
    prunecomp-export COMMAND OUT [OPTIONS]   act on an existing output OUT
    """


class HostType(click.ParamType):
    """A server's bind address: an IP address or a host name (``validation.check_host``, as the
    recipe's ``targets.vllm.host``)."""

    name = "host"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from prunecomp_export.validation import check_host

        try:
            return check_host(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class DeviceType(click.ParamType):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, checked to exist here, before anything loads (the
    recipe's ``execution.device`` rules: ``ExecutionSpec`` and ``resolve_device``)."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from pydantic import ValidationError

        from prunecomp_export.engine.execution import resolve_device
        from prunecomp_export.recipe import ExecutionSpec
        from prunecomp_export.validation import first_error

        try:
            resolve_device(ExecutionSpec(device=str(value)))
        except ValidationError as exc:
            self.fail(first_error(exc, ExecutionSpec)[1], param, ctx)
        except RecipeError as exc:
            self.fail(exc.message, param, ctx)
        return str(value)


class _Where:
    """The output a command writes, once known: a write error names it."""

    out: Path | None = None


@contextlib.contextmanager
def _one_line_errors(where: _Where) -> Iterator[None]:
    """What the user can act on ends as one line on stderr and an exit code, never a traceback."""
    try:
        with interrupting_signals():
            yield
    except UnknownName as exc:
        _fail(f"--target: {exc}", 2)
    except PrunecompError as exc:
        _fail(str(exc), exc.exit_code)
    except FileExistsError as exc:
        _fail(str(exc), 2)
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written", 130)
    except OSError as exc:
        # a full disk, a read-only file system, a permission: one line; other OS errors keep their traceback
        if exc.errno not in WRITE_ERRNOS:
            raise
        _fail(write_error_message(exc, where.out), 2)


class MachineSpec(click.ParamType):
    """``--machine cuda:24GB,host:32GB``: the machine a dry run plans for (``memory.Machine.parse``)."""

    name = "cuda:SIZE,host:SIZE"

    def convert(self, value, param, ctx):
        from prunecomp_export.memory import Machine

        if not isinstance(value, str):
            return value
        try:
            return Machine.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@main.command("run", context_settings=CONTEXT, epilog=_epilog())
# Not checked by click: load_recipe reports a missing, unreadable or directory recipe in one line.
@click.argument("recipe", type=click.Path(readable=False))
@click.option(
    "--target",
    "-t",
    "targets",
    multiple=True,
    default=("hf",),
    show_default=True,
    help="Deployment target (repeatable): hf, onnx, vllm, tensorrt.",
)
@click.option("--output", "-o", help="Output directory (overrides output.dir).")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a recipe value.")
@click.option("--dry-run", is_flag=True, help="Validate the recipe and the model config without loading weights.")
@click.option(
    "--serve", is_flag=True, help="After the run, serve the pruned model with vLLM's OpenAI server (Ctrl-C stops)."
)
@click.option("--bench", is_flag=True, help="Time dense and pruned models on each runtime (bench.json, report).")
@click.option(
    "--machine",
    type=MachineSpec(),
    help="With --dry-run: plan every stage's memory for this machine instead of this one, e.g. "
    "cuda:24GB,host:32GB (a GPU with 24 GB free, 32 GB of host memory) or host:16GB.",
)
def run_command(
    recipe: str,
    targets: tuple[str, ...],
    output: str | None,
    overrides: tuple[str, ...],
    dry_run: bool,
    serve: bool,
    bench: bool,
    machine,
) -> None:
    """Prune whole decoder layers with Prune&Comp and export the smaller model (the default command)."""
    if machine is not None and not dry_run:
        raise click.UsageError("--machine plans for another machine: it needs --dry-run")
    from rich.console import Console

    from prunecomp_export.output.outputdir import OutputLock, recipe_output
    from prunecomp_export.progress import Reporter, RichReporter
    from prunecomp_export.recipe import load_recipe
    from prunecomp_export.targets import TARGETS

    console = Console()
    where = _Where()
    with _one_line_errors(where):
        names = list(dict.fromkeys(targets))
        for name in names:
            TARGETS.get(name)
        # --output is a value, not YAML: `--output 2024` names the directory "2024"
        values = [("output.dir", output, "--output")] if output is not None else []
        loaded = load_recipe(recipe, [*overrides, *values])
        where.out = Path(loaded.output.dir)
        try:
            # a run takes the output's lock before the pipeline (torch) is even imported: a second run
            # on the same output fails at once; a dry run writes nothing and takes none
            with contextlib.nullcontext() if dry_run else OutputLock(recipe_output(loaded)) as lock:
                from prunecomp_export import pipeline
                from prunecomp_export.report import summary

                if dry_run:
                    summary.print_dry_run(pipeline.dry_run(loaded, names, bench=bench, machine=machine), console)
                    return
                # a terminal gets progress bars; a pipeline's log gets one plain, timestamped line per event
                reporter = RichReporter() if sys.stderr.isatty() else Reporter()
                result = pipeline.run(loaded, names, reporter, bench=bench, lock=lock)
        except RecipeError as exc:
            raise loaded.locate(exc) from None
        summary.print_run(result, console)
        if serve:
            from prunecomp_export.targets import vllm

            options = vllm.Options.model_validate(loaded.targets.get("vllm", {}))
            _server_exit(vllm.serve(result.output / "checkpoint", options))
        if not result.signoff_passed:
            sys.exit(1)


OUT = click.argument("out", metavar="OUT", type=click.Path(file_okay=True, readable=False))


@main.command(context_settings=CONTEXT)
@OUT
@click.option(
    "--device", type=DeviceType(), help="Device of the reload check: auto, cpu, cuda, cuda:N (default: the run's)."
)
def verify(out: str, device: str | None) -> None:
    """Check OUT against its manifest: every file's sha256, then the run's reload check repeated.

    Exit 0 when all pass; 1 with one line per problem (missing, changed, unlisted or not a regular file,
    a checkpoint or sample that cannot be read, the reload check); 2 when OUT is not a readable output."""
    from prunecomp_export.commands import verify_output

    with _one_line_errors(_Where()):
        result = verify_output(out, device)
    for problem in result.problems:
        click.echo(f"prunecomp-export: verify: {shown(out)}: {shown(problem)}", err=True)
    if not result.passed:
        sys.exit(1)
    if result.reload is not None:
        reload = f"reload check passed (max |logit diff| {result.reload['max_abs_logit_diff']:.3g})"
    else:
        reload = f"reload check skipped: {result.reload_skipped}"
    click.echo(f"{out}: every file matches the manifest; {reload}")


@main.command(context_settings=CONTEXT)
@OUT
@click.option("--target", "-t", "targets", multiple=True, required=True, help="onnx, vllm, tensorrt (repeatable).")
def export(out: str, targets: tuple[str, ...]) -> None:
    """Build deployment targets for the existing output OUT (options from its recorded recipe)."""
    from prunecomp_export.commands import export_targets
    from prunecomp_export.progress import Reporter, RichReporter
    from prunecomp_export.targets import TARGETS

    where = _Where()
    with _one_line_errors(where):
        names = list(dict.fromkeys(targets))
        for name in names:
            TARGETS.get(name)
        where.out = Path(out)
        reporter = RichReporter() if sys.stderr.isatty() else Reporter()
        records = export_targets(out, names, reporter.log)
    from prunecomp_export.report.render import target_line  # imports torch: after the output's lock
    from prunecomp_export.report.results import deployed_targets

    built = ", ".join(f"targets/{name}" for name in records) or "nothing to build (hf is the checkpoint)"
    click.echo(f"{out}: {built}")
    for parity in deployed_targets(records):
        click.echo(f"{target_line(parity)}: {'PASS' if parity.passed else 'FAIL'}")


@main.command(context_settings=CONTEXT)
@OUT
@click.option(
    "--host", type=HostType(), help="Bind address (default: targets.vllm.host of the recorded recipe, 127.0.0.1)."
)
@click.option("--port", type=click.IntRange(0, 65535), help="Port (default: targets.vllm.port; 0: a free one).")
def serve(out: str, host: str | None, port: int | None) -> None:
    """Serve OUT's checkpoint with vLLM's OpenAI-compatible server (Ctrl-C stops it)."""
    from prunecomp_export.commands import serve_output

    with _one_line_errors(_Where()):
        code = serve_output(out, host, port)
    _server_exit(code)


@main.command(context_settings=CONTEXT)
@OUT
def bench(out: str) -> None:
    """Time OUT's checkpoint against its source model (the recorded recipe's bench section).

    Writes bench.json and the figures into results.json and the reports; exit 1 when a sign-off
    threshold fails."""
    from prunecomp_export.commands import bench_output
    from prunecomp_export.progress import Reporter, RichReporter

    where = _Where()
    with _one_line_errors(where):
        where.out = Path(out)
        reporter = RichReporter() if sys.stderr.isatty() else Reporter()
        results = bench_output(out, reporter)
    removed = results.model.layers_removed
    for row in results.bench["rows"]:
        if row["layers_removed"] == removed:
            click.echo(f"{row['runtime']} {row['scenario']}: {row['median_ms']:.2f} ms, speedup {row['speedup']:.2f}x")
    click.echo(f"wrote {Path(out) / 'bench.json'}")
    if not results.signoff.passed:
        sys.exit(1)


def _server_exit(code: int) -> None:
    """The vLLM server's end as the command's: a stop the user asked for (Ctrl-C, SIGTERM) is a normal
    stop, 130; any other non-zero exit of the server is a failure."""
    from prunecomp_export.targets.vllm import INTERRUPTED

    if code == INTERRUPTED:
        sys.exit(INTERRUPTED)
    if code != 0:
        _fail(f"the vLLM server exited with code {code}", 1)


def _fail(message: str, code: int) -> None:
    """One line on stderr, whatever the message holds (control characters escaped), then exit."""
    click.echo(f"prunecomp-export: error: {shown(message.strip())}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
