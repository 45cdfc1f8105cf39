#!/usr/bin/env bash
# Reproduce the latency figures for the demo model: SmolLM2-135M pruned with the demo recipe,
# timed dense and at every number of removed layers on PyTorch eager and ONNX Runtime, and on vLLM
# when an interpreter with vllm is found (PRUNECOMP_VLLM_PYTHON, or the venv's own python).
# Two rounds per point, in alternating order, pooled. Output: outputs/bench-smollm2/{bench.json,
# report.html}. Run it on an otherwise idle machine (the report warns when other processes were busy).
# Extra arguments go to prunecomp-export, e.g. --set 'bench.points=[]' for the dense and final models only.
set -euo pipefail
cd "$(dirname "$0")/.."
runtimes='["torch", "onnxruntime"]'
if "${PRUNECOMP_VLLM_PYTHON:-.venv/bin/python}" -c "import vllm" >/dev/null 2>&1; then
  runtimes='["torch", "onnxruntime", "vllm"]'
fi
exec .venv/bin/prunecomp-export recipes/smollm2-135m-demo.yaml --bench \
  --output outputs/bench-smollm2 --set output.overwrite=true \
  --set "bench.runtimes=${runtimes}" --set bench.points=all --set bench.rounds=2 \
  --set evaluation.trajectory=all "$@"
