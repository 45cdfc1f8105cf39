"""``prunecomp-export RECIPE.yaml``: a thin command line over ``pipeline.run``.

Exit codes: 0 done (and every sign-off threshold passed), 1 a sign-off threshold or a parity
check failed, 2 bad input (recipe, model, missing runtime), 130 interrupted (Ctrl-C or SIGTERM).

Bad input ends with one line on stderr, ``prunecomp-export: error: <file or key path>: <problem>``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from prunecomp_export.errors import PrunecompError
from prunecomp_export.output.outputdir import WRITE_ERRNOS, handle_sigterm, write_error_message
from prunecomp_export.registry import UnknownName


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.version_option(package_name="prunecomp-export")
def main(
    recipe: str,
    targets: tuple[str, ...],
    output: str | None,
    overrides: tuple[str, ...],
    dry_run: bool,
    serve: bool,
    bench: bool,
) -> None:
    """Prune whole decoder layers with Prune&Comp and export the smaller model."""
    from rich.console import Console

    from prunecomp_export import pipeline
    from prunecomp_export.progress import Reporter, RichReporter
    from prunecomp_export.recipe import load_recipe
    from prunecomp_export.report import summary
    from prunecomp_export.targets import TARGETS

    console = Console()
    loaded = None
    try:
        with handle_sigterm():
            names = list(dict.fromkeys(targets))
            for name in names:
                TARGETS.get(name)
            # --output is a value, not YAML: `--output 2024` names the directory "2024"
            values = [("output.dir", output)] if output is not None else []
            loaded = load_recipe(recipe, [*overrides, *values])
            if dry_run:
                summary.print_dry_run(pipeline.dry_run(loaded, names, bench=bench), console)
                return
            # a terminal gets progress bars; a pipeline's log gets one plain, timestamped line per event
            reporter = RichReporter() if sys.stderr.isatty() else Reporter()
            result = pipeline.run(loaded, names, reporter, bench=bench)
            summary.print_run(result, console)
            if serve:
                from prunecomp_export.targets import vllm

                options = vllm.Options.model_validate(loaded.targets.get("vllm", {}))
                code = vllm.serve(result.output / "checkpoint", options)
                if code not in (0, 130, -2):
                    _fail(f"the vLLM server exited with code {code}", 1)
            if not result.signoff_passed:
                sys.exit(1)
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
        _fail(write_error_message(exc, Path(loaded.output.dir) if loaded else None), 2)


def _fail(message: str, code: int) -> None:
    """One line on stderr, whatever the message holds, then exit."""
    click.echo(f"prunecomp-export: error: {' '.join(message.split())}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
