"""The demo recipe through the CLI, as ``make demo`` runs it, its whole process tree sampled from outside
every 0.1 s: each process's peak RSS (the CLI, every QA child, the reload check's, the GGUF
dequantisation's) and the tree's, against ``--max-process`` / ``--max-tree``, beside the run's own
per-stage figures and its memory plan (``scale_synthetic.py``'s report). ``--fresh-cache DIR`` runs as
a new machine does: the GGUF dequantised and the dense model evaluated again, in an empty cache.

    python benchmarks/demo_memory.py --fresh-cache /tmp/prunecomp-fresh-cache --max-process 1.6GB --max-tree 2.4GB
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from scale_synthetic import report_memory, run_cli  # noqa: E402

DEMO = HERE.parent / "recipes" / "smollm2-135m-demo.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo-memory"))
    parser.add_argument("--fresh-cache", type=Path, help="an empty directory for $PRUNECOMP_CACHE")
    parser.add_argument("--max-process", help="fail when any process of the run goes above this, e.g. 1.6GB")
    parser.add_argument("--max-tree", help="fail when the whole process tree goes above this, e.g. 2.4GB")
    args = parser.parse_args(argv)
    if args.fresh_cache is not None:
        if args.fresh_cache.exists() and any(args.fresh_cache.iterdir()):
            parser.error(f"--fresh-cache {args.fresh_cache}: not empty")
        os.environ["PRUNECOMP_CACHE"] = str(args.fresh_cache.resolve())  # the CLI's process inherits it
    recipe = yaml.safe_load(DEMO.read_text())
    recipe["output"] = {**recipe.get("output", {}), "dir": str(args.out.resolve()), "overwrite": True}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results, sampler, wall_s = run_cli(recipe, args.out.resolve())
    args.budget = recipe["execution"]["memory_budget"]
    size = next(c for c in results["costs"] if c["name"] == "load")["notes"]["weights_bytes"]
    return 0 if report_memory(results, sampler, wall_s, size, args) else 1


if __name__ == "__main__":
    sys.exit(main())
