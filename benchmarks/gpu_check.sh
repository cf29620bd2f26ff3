#!/usr/bin/env bash
# The GPU check of issue 25 (at most 8 minutes on one CUDA GPU): every pipeline stage's CUDA path on 64
# synthetic images with ResNet-50-size detectors and CLIP ViT-B-32 (random weights), one bf16 epoch of each
# student and of RefCLIP, and each teacher stage's images/s against its bare forward. Writes
# benchmarks/out/gpu_check.json and prints the README table (benchmarks/gpu_check_table.py).
#
# Assumes `make install` was run (it uses .venv/bin/python, the Makefile's venv; VENV=... to use another).
# GROUNDING_GPU_CHECK_DEVICE=cpu: a tiny CPU dry run of the same steps (tests/test_gpu_check.py).
#
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${VENV:-.venv}/bin/python"
OUT=benchmarks/out/gpu_check.json
if [ ! -x "$PY" ]; then
  echo "gpu_check: $PY not found: run 'make install' first (or set VENV to a venv with grounding installed)" >&2
  exit 2
fi
if [ "${GROUNDING_GPU_CHECK_DEVICE:-cuda}" = cuda ]; then
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); run on a machine with one" \
         "(or GROUNDING_GPU_CHECK_DEVICE=cpu for the tiny CPU dry run)" >&2
    exit 2
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# 450 s of steps + start-up and the JSON: under 8 minutes; the hard limit stops a hung step
rc=0
rm -f "$OUT"
timeout 470 "$PY" benchmarks/gpu_check.py --budget-s "${GPU_CHECK_BUDGET_S:-450}" --out "$OUT" || rc=$?
if [ -f "$OUT" ]; then "$PY" benchmarks/gpu_check_table.py "$OUT"; fi
if [ "$rc" = 124 ]; then echo "gpu_check: stopped at the 470 s limit (see the steps printed above)" >&2; fi
exit "$rc"
