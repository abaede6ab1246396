#!/usr/bin/env bash
# QLoRA SFT on one NVIDIA GPU: peftadapt's Trainer vs add_alignment (MMD) on TRL's SFTTrainer vs plain
# peft + bitsandbytes + TRL, 8B-shaped Llama, seq 2048, gradient checkpointing on and off; a 70B-shaped
# step. Writes benchmarks/results/gpu_check/gpu_check.{json,md} (and copies them to $OUT when set).
# Parts run under their own timeouts; the whole stays inside --budget (default 460 s, ~8 min).
#
#   benchmarks/gpu_wheels.sh                # once, on a machine with PyPI: the wheels the GPU image lacks -> .whl/
#   benchmarks/gpu_check.sh                 # on the GPU machine, from the repo root, with .whl/ carried along
#   benchmarks/gpu_check.sh --tiny          # the same code on the CPU at a tiny size
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import bitsandbytes, trl, datasets" >/dev/null 2>&1 && ls .whl/*.whl >/dev/null 2>&1; then
    # what is missing: bitsandbytes, trl, datasets and datasets' dill / multiprocess, without their dependencies
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
        .whl/*.whl || { echo "gpu_check.sh: installing .whl/*.whl failed" >&2; exit 2; }
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$PY" benchmarks/gpu_check.py "$@"
rc=$?
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
    cp benchmarks/results/gpu_check/gpu_check*.json benchmarks/results/gpu_check/gpu_check*.md "$OUT"/ 2>/dev/null
fi
exit $rc
