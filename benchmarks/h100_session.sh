#!/usr/bin/env bash
# Every GPU measurement behind BENCHMARKS.md's issue-4 tables, by stage, on the lent H100.
# First stage the GGUF (see device_env.sh: call 1 carries .devcarry/a, call 2 .devcarry/b), then:
#   bash benchmarks/h100_session.sh smollm2   # e2e SmolLM2 + GPU correctness checks (bf16 weights)
#   bash benchmarks/h100_session.sh fp32      # correctness checks with float32 weights
#   bash benchmarks/h100_session.sh noise     # perplexity noise floor of the reference path (fp32)
#   bash benchmarks/h100_session.sh llama     # e2e Llama-3-8B shape (random weights)
#   bash benchmarks/h100_session.sh tests     # the GPU test suite
set -o pipefail
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
case "$1" in
  smollm2)
    fxforge bench e2e smollm2-135m --prompts 512 --max-new-tokens 256 --kv bfloat16,bfp16 --max-num-seqs 512 \
      --decode-steps 1,16 --max-batched-tokens 32768 --hf-batch 256,512 --json-out "$OUT/e2e_smollm2_h100.json" ;;
  fp32)
    python3 - <<'PY' | tee "$OUT/checks_fp32_h100.json"
import json, fxforge
from fxforge.bench import chat_prompts, greedy_agreement
from fxforge.cli import _ppl_check
base = fxforge.load("smollm2-135m", device="cuda", dtype="float32")
print(json.dumps({"triton_vs_reference_ppl": _ppl_check(base),
                  "greedy_vs_reference_forward": greedy_agreement(base, chat_prompts(base, 16))}, indent=1))
PY
    ;;
  noise)
    python3 benchmarks/ppl_noise_floor.py --device cuda --json-out "$OUT/ppl_noise_floor_h100.json" ;;
  llama)
    fxforge bench e2e llama-3-8b --random-init --prompts 64 --prompt-len 1792 --max-new-tokens 256 --max-num-seqs 64 \
      --kv bfloat16,bfp16 --decode-steps 16 --hf-batch 64 --no-check --json-out "$OUT/e2e_llama3_8b_shape_h100.json" ;;
  tests)
    python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tail -5 ;;
  *) echo "usage: $0 smollm2|fp32|noise|llama|tests" >&2; exit 2 ;;
esac
