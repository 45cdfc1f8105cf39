#!/bin/sh
# The first run on a CUDA machine: the demo recipe (SmolLM2-135M, 6 of 30 layers removed) on `cuda`
# in bf16, with the onnx target (onnxruntime-genai fp16 on the CUDA provider), the vllm target (bf16)
# and the tensorrt target when TensorRT is installed, and --bench (PyTorch eager, ONNX Runtime and
# vLLM, dense against pruned). Meant to take under 10 minutes on one GPU. It prints each stage's
# figures (wall time, peak memory of the CLI and of its child processes) and each target's parity
# (dtype, tokens compared, largest and mean |log-prob diff|, where continuations diverged), read
# from the run's own results.json: every figure it prints was measured by that run.
#
#   benchmarks/first_gpu.sh             run it (needs a CUDA GPU; exit 2 without one)
#   benchmarks/first_gpu.sh --dry-run   on any machine: the command, the memory plan for a GPU
#                                       machine (--machine, default cuda:80GB,host:64GB) and what
#                                       the run will measure; writes nothing
#
# PYTHON (default .venv/bin/python, else python3), OUT (default outputs/first-gpu) and MACHINE
# (the dry run's planned machine) override the defaults.
set -eu
ROOT=$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd)
cd "$ROOT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${OUT:-outputs/first-gpu}
MACHINE=${MACHINE:-cuda:80GB,host:64GB}
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

TARGETS="--target onnx --target vllm"
if "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('tensorrt') is None)" 2>/dev/null; then
  TARGETS="$TARGETS --target tensorrt"
fi
# bf16 on the GPU, the model resident (no demo budget), genai fp16 on the CUDA provider, vLLM bf16
SETS="--set execution.device=cuda --set model.dtype=bfloat16 --set execution.memory_budget=null \
--set targets.onnx.dtype=fp16 --set targets.onnx.provider=cuda --set targets.vllm.dtype=bfloat16 \
--set targets.tensorrt.precision=bf16 --set output.overwrite=true --set output.dir=$OUT"
COMMAND="$PYTHON -m prunecomp_export recipes/smollm2-135m-demo.yaml $TARGETS --bench $SETS"

if [ "$DRY" = 1 ]; then
  echo "first_gpu: will run (on a CUDA machine):"
  echo "  $COMMAND"
  echo "first_gpu: the memory plan for $MACHINE (weights are not read):"
  # shellcheck disable=SC2086
  "$PYTHON" -m prunecomp_export recipes/smollm2-135m-demo.yaml $TARGETS --bench $SETS --dry-run --machine "$MACHINE"
  cat <<MEASURE
first_gpu: will measure, and print from $OUT/results.json:
  - each stage (load, prune, evaluate, save, targets, bench, report): wall time, peak RSS of the CLI
    and of its whole process tree, each child process's peak RSS and peak GPU memory
  - held-out perplexity and QA accuracy: dense, one-shot baseline, Prune&Comp (bf16 on cuda)
  - each target's parity against the fp32 layer-streamed reference: runtime, dtype, tokens compared,
    largest and mean |log-prob diff| with their tolerances, continuations close, divergences
    ($(echo "$TARGETS" | sed 's/--target //g'))
  - latency (bench.json): PyTorch eager, ONNX Runtime and vLLM on cuda, dense against pruned:
    median and quartiles per scenario, speedup, ideal speedup
MEASURE
  exit 0
fi

if ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "first_gpu: no CUDA GPU here (torch.cuda.is_available() is False): run $0 --dry-run" >&2
  exit 2
fi
"$PYTHON" -c "import torch; print('first_gpu: on', torch.cuda.get_device_name(0))"
STARTED=$(date +%s)
set +e
# shellcheck disable=SC2086
$COMMAND
CODE=$?
set -e
echo "first_gpu: prunecomp-export exited with $CODE after $(( $(date +%s) - STARTED )) s"
[ -f "$OUT/results.json" ] || exit "$CODE"
"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
results = json.loads((out / "results.json").read_text())
print(f"device: {results['machine'].get('cuda')}; sign-off {'PASS' if results['signoff']['passed'] else 'FAIL'}")
for cost in results["costs"]:
    children = ", ".join(
        f"{c['name']} {c['peak_rss_bytes'] / 1e9:.2f} GB" + (f" (GPU {c['peak_device_bytes'] / 1e9:.2f} GB)"
                                                             if c.get("peak_device_bytes") else "")
        for c in cost["children"]
    )
    print(f"stage {cost['name']}: {cost['wall_s']:.1f} s, CLI {cost['peak_rss_bytes'] / 1e9:.2f} GB"
          + (f"; {children}" if children else ""))
for target in results["targets"]:
    if target["error"]:
        print(f"target {target['target']}: FAIL: {target['error']}")
        continue
    figures = ", ".join(f"{c['name']} {c['measured']:.3g} (limit {c['limit']:g})" for c in target["checks"])
    print(f"target {target['target']} ({target['runtime']} {target['dtype']}, {target['tokens_compared']} tokens): "
          f"{'PASS' if target['passed'] else 'FAIL'}: {figures}")
    for d in target["divergences"]:
        print(f"  {d['prompt'][:40]!r} diverged at new token {d['position']}: gap {d['gap']:.3f} nats, "
              f"{'near-tie' if d['near_tie'] else 'not a near-tie'}, {'close' if d['close'] else 'NOT close'}")
for row in (results.get("bench") or {}).get("rows", []):
    print(f"bench {row['runtime']} {row['scenario']} {row['layers_removed']} removed: {row['median_ms']:.2f} ms, "
          f"speedup {row['speedup']:.2f}x")
PY
exit "$CODE"
