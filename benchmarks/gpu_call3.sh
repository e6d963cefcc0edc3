#!/usr/bin/env bash
# Lent-GPU call 3: end-to-end generation vs HF (SmolLM2, real weights) with GPU correctness checks.
source benchmarks/device_env.sh
timeout 570 python3 -m fxforge.cli bench e2e smollm2-135m --prompts 512 --max-new-tokens 256 \
  --kv bfloat16,bfp16 --hf-batch 64,256 --json-out "$OUT/e2e_smollm2.json" 2>&1 | tail -40
