#!/usr/bin/env bash
# The device checks, as one script: the CUDA test file and the transition benchmark on the GPU.
# Run on a machine with a GPU from the repository root; writes logs and TRANSITION_GPU.md to $OUT.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, onnxruntime, transformers; print('torch', torch.__version__, 'ort', onnxruntime.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
timeout 200 python3 benchmarks/transition.py --device cuda --models bert,resnet18 --budget 40 --out "$OUT/TRANSITION_GPU.md" 2>&1 | tee "$OUT/transition_gpu.log"
