#!/usr/bin/env bash
# Every GPU measurement of this session's BENCHMARKS.md tables, by stage, on the lent H200.
# The GGUF travels in two halves (benchmarks/device_env.sh): stages that need no real weights go in
# the first call (carry .devcarry/a), the rest in the second (carry .devcarry/b, within 30 s).
#   bash benchmarks/h200_session.sh tests        # the whole test suite on the GPU
#   bash benchmarks/h200_session.sh attention    # decode attention: refactored vs pre-refactor kernels, and vs SDPA
#   bash benchmarks/h200_session.sh moe          # fused MoE: tune launch configs, then fused vs eager loop
#   bash benchmarks/h200_session.sh e2e-arch     # SmolLM2 e2e: this tree vs the tree before issue 8 (.devcarry/orig)
#   bash benchmarks/h200_session.sh moe-tests    # issue 11: MoE models on the Triton kernels vs the reference, no host
#                                                #   sync, CUDA-graph decode replays; fused-kernel GPU tests (~2 min, estimate)
#   bash benchmarks/h200_session.sh moe-e2e      # issue 11: Mixtral-8x7B shape (random bf16 weights, 94 GB), 64 x 1,024
#                                                #   prompt tokens + 256 new, fxforge then HF generate (~6 min, estimate:
#                                                #   ~1.5 min ours incl. graph capture and compiles, ~4 min HF incl. its compile)
# moe-tests and moe-e2e need no GGUF (call 1); together they fit one 10-minute call.
# Results land in $OUT as *_h200.json.
set -o pipefail
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
E2E_SMOLLM2=(--prompts 512 --max-new-tokens 256 --kv bfloat16,bfp16 --max-num-seqs 512 --decode-steps 16
             --max-batched-tokens 32768 --repeats 3)
# one timed generation a side (each ~10-20 s at this size); our model is freed before HF's loads (both 94 GB)
E2E_MIXTRAL=(--random-init --prompts 64 --prompt-len 1024 --max-new-tokens 256 --kv bfloat16 --max-num-seqs 64
             --decode-steps 16 --max-batched-tokens 32768 --repeats 1 --hf-batch 64 --no-check)
for stage in "$@"; do
  echo "== $stage"
  case "$stage" in
    tests)  # slow-marked tests download SmolLM2, which this machine cannot
      timeout 240 python3 -m pytest -q -p no:cacheprovider -n 8 -m "not slow" tests 2>&1 | tee "$OUT/tests_h200.log" | tail -15 ;;
    attention)
      python3 benchmarks/attention_before_after.py --before-source .devcarry/a/paged_attention_d40172b.py \
        --json-out "$OUT/attention_before_after_h200.json"
      fxforge bench attention --formats bfp12_32,bfp16_32,mxfp4_32,bfloat16 --json-out "$OUT/attention_decode_h200.json" ;;
    moe)
      timeout 150 python3 benchmarks/moe_tune.py --out kernels/configs/ 2>&1 | tail -5
      cp kernels/configs/moe_*.json "$OUT/" 2>/dev/null
      timeout 90 fxforge bench moe --json-out "$OUT/moe_bench_h200.json" 2>&1 | tail -20 ;;
    moe-tests)
      timeout 240 python3 -m pytest -q -p no:cacheprovider -n 8 -m gpu tests/ir/test_moe.py tests/runtime/test_engine_moe.py \
        tests/kernels/test_moe.py 2>&1 | tee "$OUT/moe_tests_h200.log" | tail -15 ;;
    moe-e2e)
      timeout 500 fxforge bench e2e mixtral-8x7b "${E2E_MIXTRAL[@]}" --json-out "$OUT/e2e_mixtral_h200.json" 2>&1 | tail -12 ;;
    e2e-arch)
      # the same workload through the code before issue 8 (installed beside, not editable) and through this tree
      python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/old .devcarry/orig >/dev/null 2>&1 \
        || echo "h200_session: install of the pre-issue-8 tree failed" >&2
      PYTHONPATH=/tmp/old:/tmp/site python3 -m fxforge.cli bench e2e smollm2-135m "${E2E_SMOLLM2[@]}" --hf-batch "" \
        --no-check --json-out "$OUT/e2e_smollm2_before_arch_h200.json" 2>&1 | tail -8
      fxforge bench e2e smollm2-135m "${E2E_SMOLLM2[@]}" --hf-batch 512 \
        --json-out "$OUT/e2e_smollm2_h200.json" 2>&1 | tail -12 ;;
    *) echo "usage: $0 tests|attention|moe|e2e-arch|moe-tests|moe-e2e ..." >&2; exit 2 ;;
  esac
done
