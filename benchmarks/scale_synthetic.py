"""Prune a checkpoint of a real model's shape on the CPU with bounded memory, and check the fold.

1. Write a synthetic TinyLlama-1.1B-shaped checkpoint (bf16, two shards) without holding it whole
   (``synthetic_checkpoint.py``), unless it is already there.
2. Run ``prunecomp-export`` on it in a fresh process, removing four inner layers with a memory
   budget far below the checkpoint's size, so every layer is read from the files when it runs.
3. Print the CLI's peak RSS (its own, from its results.json; the reload check runs in a child
   process whose peak is printed apart) divided by the checkpoint size, and every stage's cost.
4. Check the fold against an independent computation: the dense model run by transformers with
   the removed layers skipped and the stream multiplied by each removal's alpha at its gap (what
   every exact fold must equal), against the written checkpoint loaded by transformers. Both run
   in fp32 on the same bf16 weights, so the difference is the bf16 rounding of the folded weights.

    python benchmarks/scale_synthetic.py [--work DIR] [--budget 600MB] [--drop 5 9 13 17]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_cli(source: Path, out: Path, budget: str, drop: list[int], fold: str) -> dict:
    recipe = {
        "model": {"source": str(source)},
        "calibration": {"source": "builtin", "corpus": "gensim-wiki", "num_samples": 8, "seq_len": 128,
                        "batch_size": 4},
        "prune": {"metric": "block_influence", "drop_layers": drop, "fold": fold},
        "evaluation": {"perplexity": None, "baseline": False},
        "execution": {"device": "cpu", "memory_budget": budget},
        "output": {"dir": str(out), "overwrite": True, "max_shard_size": "200MB"},
    }  # fmt: skip
    recipe_path = out.parent / "scale-recipe.json"
    recipe_path.write_text(json.dumps(recipe))  # JSON is YAML
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "prunecomp_export", str(recipe_path)], check=True)
    results = json.loads((out / "results.json").read_text())
    results["cli_wall_s"] = time.perf_counter() - started
    return results


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("outputs/scale-synthetic"))
    parser.add_argument("--budget", default="600MB")
    parser.add_argument("--drop", type=int, nargs="+", default=[5, 9, 13, 17])
    parser.add_argument(
        "--fold",
        choices=["post_gap", "pre_gap"],
        default="post_gap",
        help="post_gap (default) leaves the small early streams alone; pre_gap scales the embedding, whose "
        "random stream here is small enough (rms ~0.02) that the RMSNorm epsilon shows in the result",
    )
    args = parser.parse_args(argv)
    source, out = args.work / "tinyllama-1.1b-synthetic", args.work / "pruned"
    args.work.mkdir(parents=True, exist_ok=True)
    if not (source / "model.safetensors.index.json").is_file():
        subprocess.run(
            [sys.executable, str(HERE / "synthetic_checkpoint.py"), str(source), "--preset", "tinyllama-1.1b",
             "--dtype", "bfloat16", "--shards", "2"],
            check=True,
        )  # fmt: skip
    size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    results = run_cli(source, out, args.budget, args.drop, args.fold)

    peak = results["peak_rss_bytes"]
    print(f"\ncheckpoint {size / 1e9:.2f} GB; CLI wall {results['cli_wall_s']:.0f} s")
    print(f"CLI peak RSS {peak / 1e9:.2f} GB = {peak / size:.2f} x the checkpoint (budget {args.budget})")
    for cost in results["costs"]:
        child = cost.get("child_peak_rss_bytes")
        extra = f", child process peak {child / 1e9:.2f} GB" if child else ""
        print(f"  {cost['name']:>8}: {cost['wall_s']:6.1f} s, peak RSS {cost['peak_rss_bytes'] / 1e9:.2f} GB{extra}")
    print(f"  placement: {json.dumps(results['execution'])}")

    import torch

    steps = [(r["step"]["removed"][0], r["step"]["alpha"]) for r in results["trajectory"]["rounds"]]
    sample = torch.randint(3, 8000, (2, 64), generator=torch.Generator().manual_seed(0))
    expected = explicit_logits(source, steps, sample)
    got = checkpoint_logits(out / "checkpoint", sample)
    in_fp32 = fp32_fold_logits(source, results, sample)
    scale = expected.abs().max().item()
    print(f"removed {[i for i, _ in steps]} with alpha {[round(a, 4) for _, a in steps]}; max |logit| {scale:.3g}")
    for name, logits in (("written bf16 checkpoint", got), ("the same fold kept in fp32", in_fp32)):
        diff = (expected - logits).abs().max().item()
        print(f"{name} vs explicit stream scaling: max |logit diff| {diff:.3g} ({diff / scale:.2e} of max |logit|)")
    rounding = (got - in_fp32).abs().max().item()
    print(f"bf16 rounding of the folded weights alone (written vs fp32 fold): {rounding:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
