"""``prunecomp-export RECIPE.yaml``: a thin command line over ``pipeline.run``.

Exit codes: 0 done (and every sign-off threshold passed), 1 a sign-off threshold or a parity
check failed, 2 bad input (recipe, model, missing runtime)."""

from __future__ import annotations

import sys

import click

from prunecomp_export.errors import PrunecompError
from prunecomp_export.registry import UnknownName


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("recipe", type=click.Path(dir_okay=False))
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

    from prunecomp_export import pipeline, summary
    from prunecomp_export.progress import RichReporter
    from prunecomp_export.recipe import load_recipe
    from prunecomp_export.targets import TARGETS

    console = Console()
    try:
        names = list(dict.fromkeys(targets))
        for name in names:
            TARGETS.get(name)
        extra = [f"output.dir={output}"] if output else []
        loaded = load_recipe(recipe, [*overrides, *extra])
        if dry_run:
            summary.print_dry_run(pipeline.dry_run(loaded, names), console)
            return
        result = pipeline.run(loaded, names, RichReporter(), bench=bench)
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


def _fail(message: str, code: int) -> None:
    click.echo(f"prunecomp-export: error: {message}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
