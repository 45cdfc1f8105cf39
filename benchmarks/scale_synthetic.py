"""Run a checkpoint of a real model's shape through every stage on the CPU within a memory budget,
measure the memory of the whole process tree from outside it, and check the fold.

1. Write a synthetic checkpoint (``synthetic_checkpoint.py``: TinyLlama-1.1B's shape in bf16, or
   Qwen2.5-0.5B's with its 151,936-token vocabulary in fp32) without holding it whole, unless it is
   already there.
2. Run ``prunecomp-export`` on it in a fresh process with ``execution.memory_budget``; with
   ``--evaluate`` also held-out perplexity, one offline QA task (8 questions) and the reload check.
3. Sample the CLI's whole process tree every 0.1 s from this process (outside the tree): each
   process's peak RSS and the tree's; print them against ``--max-process`` / ``--max-tree`` and the
   memory plan's figures; exit 1 when a bound is exceeded.
4. Check the fold against an independent computation: the dense model run by transformers with the
   removed layers skipped and the stream multiplied by each removal's alpha at its gap (what every
   exact fold must equal), against the written checkpoint loaded by transformers.

    python benchmarks/scale_synthetic.py --budget 1GB --evaluate --max-process 1.6GB --max-tree 2.4GB
    python benchmarks/scale_synthetic.py --preset qwen2-0.5b --calibration demo --budget 1.5GB --no-fold-check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from prunecomp_export.child import TreeSampler  # noqa: E402
from prunecomp_export.recipe import parse_size  # noqa: E402

PRESETS = {"tinyllama-1.1b": ("bfloat16", 2), "qwen2-0.5b": ("float32", 2)}
#: small: 8 x 128 tokens (fast); demo: the demo recipe's 16 x 512 tokens in batches of 4
CALIBRATION = {
    "small": {"source": "builtin", "corpus": "gensim-wiki", "num_samples": 8, "seq_len": 128, "batch_size": 4},
    "demo": {"source": "builtin", "corpus": "gensim-wiki", "num_samples": 16, "seq_len": 512, "batch_size": 4},
}


def recipe_for(source: Path, out: Path, args: argparse.Namespace) -> dict:
    evaluation: dict = {"perplexity": None, "baseline": False}
    if args.evaluate:
        evaluation = {
            "perplexity": {"corpora": ["gensim-wiki-heldout"], "seq_len": 128, "max_windows": 8, "batch_size": 4},
            # the offline tasks' prompts are one sentence: 128 tokens hold every one of them
            "qa": {"tasks": ["gensim_sentiment"], "limit": 8, "max_length": 128},
            "baseline": False,
            "cache_dense": False,
        }
    prune = {"metric": "block_influence", "fold": args.fold}
    prune.update({"drop_layers": args.drop} if args.drop else {"num_drop": args.num_drop})
    return {
        "model": {"source": str(source)},
        "calibration": CALIBRATION[args.calibration],
        "prune": prune,
        "evaluation": evaluation,
        "execution": {"device": "cpu", "memory_budget": args.budget},
        # the synthetic checkpoint is bf16: vLLM serves it in bf16; genai builds int8 (a quarter of fp32)
        "targets": {"vllm": {"dtype": "bfloat16"}, "onnx": {"dtype": "int8"}},
        "output": {"dir": str(out), "overwrite": True, "max_shard_size": "200MB", "verify": args.evaluate},
    }


def run_cli(recipe: dict, out: Path, targets: list[str] = ()) -> tuple[dict, TreeSampler, float]:
    """The CLI in a fresh process, its whole tree sampled from here every 0.1 s. With targets, exit 1
    (a target that failed its parity check: a failed sign-off, the output complete) is a measured run."""
    recipe_path = out.parent / "scale-recipe.json"
    recipe_path.write_text(json.dumps(recipe))  # JSON is YAML
    started = time.perf_counter()
    flags = [arg for name in targets for arg in ("--target", name)]
    proc = subprocess.Popen([sys.executable, "-m", "prunecomp_export", str(recipe_path), *flags])
    with TreeSampler(proc.pid, interval_s=0.1) as sampler:
        code = proc.wait()
    if code not in ((0, 1) if targets else (0,)):
        sys.exit(f"prunecomp-export exited with {code}")
    return json.loads((out / "results.json").read_text()), sampler, time.perf_counter() - started


def report_memory(results: dict, sampler: TreeSampler, wall_s: float, size: int, args) -> bool:
    print(f"\ncheckpoint {size / 1e9:.2f} GB; CLI wall {wall_s:.0f} s; budget {args.budget}")
    print("sampled from outside the process tree every 0.1 s:")
    for pid, (name, peak) in sorted(sampler.process_peaks.items(), key=lambda item: -item[1][1]):
        if peak > 100e6:
            print(f"  {peak / 1e9:5.2f} GB  pid {pid}: {name[:110]}")
    largest = max(peak for _name, peak in sampler.process_peaks.values())
    print(f"largest process {largest / 1e9:.2f} GB; whole tree at most {sampler.peak_rss_bytes / 1e9:.2f} GB")
    print("per stage (the run's own figures; planned host figures exclude each process's own imports):")
    planned = {stage["stage"]: stage for stage in results["memory_plan"]["stages"]}
    for cost in results["costs"]:
        children = ", ".join(f"{c['name']} {c['peak_rss_bytes'] / 1e9:.2f} GB" for c in cost["children"])
        print(
            f"  {cost['name']:>8}: {cost['wall_s']:6.1f} s, CLI {cost['peak_rss_bytes'] / 1e9:.2f} GB, "
            f"tree {cost['tree_peak_rss_bytes'] / 1e9:.2f} GB" + (f"; {children}" if children else "")
        )
    for name, stage in planned.items():
        print(f"  planned {name}: host {stage['host_bytes'] / 1e9:.2f} GB ({stage['how']})")
    ok = targets_within_plan(results, planned)
    if args.max_process and largest > parse_size(args.max_process):
        print(f"OVER: a process reached {largest / 1e9:.2f} GB > {args.max_process}")
        ok = False
    if args.max_tree and sampler.peak_rss_bytes > parse_size(args.max_tree):
        print(f"OVER: the tree reached {sampler.peak_rss_bytes / 1e9:.2f} GB > {args.max_tree}")
        ok = False
    return ok


def targets_within_plan(results: dict, planned: dict[str, dict]) -> bool:
    """Each target's process tree (its own child and everything it started, sampled together) against
    the plan's host figure for it plus the imports of the processes it runs at once."""
    ok = True
    for cost in results["costs"]:
        for child in cost["children"]:
            stage = planned.get("targets: " + child["name"].removesuffix(" target"))
            if stage is None:
                continue
            allowed = stage["host_bytes"] + stage["process_overhead_bytes"]
            within = child["peak_rss_bytes"] <= allowed
            ok &= within
            print(
                f"  {child['name']}: tree {child['peak_rss_bytes'] / 1e9:.2f} GB, planned {allowed / 1e9:.2f} GB "
                f"({stage['host_bytes'] / 1e9:.2f} + {stage['process_overhead_bytes'] / 1e9:.2f} of its processes): "
                + ("within the plan" if within else "OVER the plan")
            )
    return ok


def explicit_logits(source: Path, removed_alphas: list[tuple[int, float]], sample):
    """Dense model, removed layers skipped, the stream times alpha at each gap (fp32 compute)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    layers = model.model.layers
    removed = {i for i, _ in removed_alphas}
    factor = [1.0] * (len(layers) + 1)  # factor[k]: multiply the stream entering original layer k
    for index, alpha in removed_alphas:
        gap = next((k for k in range(index + 1, len(layers)) if k not in removed), len(layers))
        factor[gap] *= alpha
    kept = torch.nn.ModuleList(layer for i, layer in enumerate(layers) if i not in removed)
    scales = [factor[i] for i in range(len(layers)) if i not in removed]
    hooks = [
        layer.register_forward_pre_hook(lambda _m, args, kw, s=s: ((args[0] * s, *args[1:]), kw), with_kwargs=True)
        for layer, s in zip(kept, scales, strict=True)
        if s != 1.0
    ]
    model.model.layers = kept
    model.config.num_hidden_layers = len(kept)
    for new, layer in enumerate(kept):
        layer.self_attn.layer_idx = new
    with torch.no_grad():
        logits = model(input_ids=sample, use_cache=False).logits.float()
    for hook in hooks:
        hook.remove()
    return logits


def fp32_fold_logits(source: Path, results: dict, sample):
    """The same fold in fp32 memory (engine.replay on the dense model upcast to fp32): no rounding of
    the folded weights, so its distance to the explicit scaling is the fold's own exactness."""
    import torch
    from transformers import AutoModelForCausalLM

    from prunecomp_export.adapters import adapter_for
    from prunecomp_export.engine.loop import Step, replay

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    trajectory = results["trajectory"]
    steps = [Step(r["step"]["removed"], r["step"]["alpha"]) for r in trajectory["rounds"]]
    replay(model, adapter_for(model.config), steps, trajectory["fold_form"], trajectory["untie"])
    with torch.no_grad():
        return model(input_ids=sample, use_cache=False).logits.float()


def checkpoint_logits(directory: Path, sample):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=sample, use_cache=False).logits.float()


def check_fold(source: Path, out: Path, results: dict) -> None:
    import torch

    steps = [(r["step"]["removed"][0], r["step"]["alpha"]) for r in results["trajectory"]["rounds"]]
    sample = torch.randint(3, 8000, (2, 64), generator=torch.Generator().manual_seed(0))
    expected = explicit_logits(source, steps, sample)
    got = checkpoint_logits(out / "checkpoint", sample)
    in_fp32 = fp32_fold_logits(source, results, sample)
    scale = expected.abs().max().item()
    print(f"removed {[i for i, _ in steps]} with alpha {[round(a, 4) for _, a in steps]}; max |logit| {scale:.3g}")
    for name, logits in (("written checkpoint", got), ("the same fold kept in fp32", in_fp32)):
        diff = (expected - logits).abs().max().item()
        print(f"{name} vs explicit stream scaling: max |logit diff| {diff:.3g} ({diff / scale:.2e} of max |logit|)")
    rounding = (got - in_fp32).abs().max().item()
    print(f"rounding of the folded weights alone (written vs fp32 fold): {rounding:.3g}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tinyllama-1.1b")
    parser.add_argument("--work", type=Path, default=Path("outputs/scale-synthetic"))
    parser.add_argument("--budget", default="600MB")
    parser.add_argument("--calibration", choices=sorted(CALIBRATION), default="small")
    parser.add_argument("--drop", type=int, nargs="*", default=[5, 9, 13, 17], help="original layers to remove")
    parser.add_argument("--num-drop", type=int, default=4, help="layers to remove when --drop is not given")
    parser.add_argument("--evaluate", action="store_true", help="held-out perplexity, one QA task, reload check")
    parser.add_argument("--max-process", help="fail when any process of the run goes above this, e.g. 1.6GB")
    parser.add_argument("--max-tree", help="fail when the whole process tree goes above this, e.g. 2.4GB")
    parser.add_argument("--no-fold-check", action="store_true", help="skip the fold check (it loads the model)")
    parser.add_argument("--target", action="append", default=[], help="build a target too (vllm, onnx; repeatable)")
    parser.add_argument(
        "--fold",
        choices=["post_gap", "pre_gap"],
        default="post_gap",
        help="post_gap (default) leaves the small early streams alone; pre_gap scales the embedding, whose "
        "random stream here is small enough (rms ~0.02) that the RMSNorm epsilon shows in the result",
    )
    args = parser.parse_args(argv)
    dtype, shards = PRESETS[args.preset]
    source, out = args.work / f"{args.preset}-synthetic", args.work / f"pruned-{args.preset}"
    args.work.mkdir(parents=True, exist_ok=True)
    if not (source / "model.safetensors.index.json").is_file():
        subprocess.run(
            [sys.executable, str(HERE / "synthetic_checkpoint.py"), str(source), "--preset", args.preset,
             "--dtype", dtype, "--shards", str(shards)],
            check=True,
        )  # fmt: skip
    size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    results, sampler, wall_s = run_cli(recipe_for(source, out, args), out, args.target)
    for target in results["targets"]:
        print(f"target {target['target']}: {'PASS' if target['passed'] else 'FAIL'} "
              f"{[(c['name'], round(c['measured'], 4)) for c in target['checks']] or target['error']}")  # fmt: skip
    ok = report_memory(results, sampler, wall_s, size, args)
    if not args.no_fold_check:
        check_fold(source, out, results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
