#!/usr/bin/env bash
# Lent-GPU call 1: stash the first GGUF half, run the GPU tests and the decode-attention benchmark.
mkdir -p /root/stash && cp .devcarry/a/smol.part00 /root/stash/
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/runtime tests/passes 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
python3 -m fxforge.cli bench attention --json-out "$OUT/attention.json" 2>&1 | tail -30 | tee "$OUT/attention.txt"
