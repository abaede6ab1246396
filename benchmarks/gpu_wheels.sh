#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh needs on a GPU image that has torch, transformers, peft and
# accelerate but not bitsandbytes, trl or datasets (the device machine of this workplace; its Python
# is 3.12, x86-64). Exactly these five, no dependencies (the image has the rest: numpy, pandas,
# pyarrow, xxhash, fsspec, huggingface-hub, ...): bitsandbytes, trl, datasets, and datasets' dill and
# multiprocess. About 45 MB into .whl/ (ignored by git); carry .whl/ to the GPU machine.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -l .whl
