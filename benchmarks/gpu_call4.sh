#!/usr/bin/env bash
# Lent-GPU call 4: Llama-3-8B shape (random weights), batch 64, 2k context.
source benchmarks/device_env.sh
timeout 570 python3 -m fxforge.cli bench e2e llama-3-8b --random-init --prompts 64 --prompt-len 1792 \
  --max-new-tokens 256 --max-num-seqs 64 --kv bfloat16,bfp16 --hf-batch 64 --json-out "$OUT/e2e_llama8b.json" 2>&1 | tail -30
