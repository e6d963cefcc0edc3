#!/usr/bin/env bash
# Issue 9 (layer tying) on the lent H200, by stage; each stage fits one 10-minute call. Results land in $OUT.
# Real weights arrive in two calls (benchmarks/device_env.sh): `tests` needs none (call 1, carry
# .devcarry/a); `study` in call 2 (carry .devcarry/b, within 30 s, so the same warm machine assembles
# the GGUF); `study2`, `serving` and `recover` in later calls on that still-warm machine. The study
# is one command run twice: `study` does the K=15 half, `study2` resumes from it (.devcarry/ is
# ignored, so the half survives between calls on one machine; on a fresh one, carry it back there).
#   bash benchmarks/tying_h200.sh tests     # GPU tests: LoRA kernel, tied runtime on the Triton kernels, pass, recovery (~3 min)
#   bash benchmarks/tying_h200.sh study     # fxforge tying-study, K=15: 11 runs x 24 s recovery (~7 min, estimate)
#   bash benchmarks/tying_h200.sh study2    # the same, K=15,10, resumed: the other 11 runs, the whole table + PNG (~7 min)
#   bash benchmarks/tying_h200.sh serving   # fxforge bench tying: K=10, r=32, batch 64 and 256 (~4 min, estimate)
#   bash benchmarks/tying_h200.sh recover   # fxforge recover on real weights, K=10 r=32, 3 minutes of training (~5 min)
set -o pipefail
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
for stage in "$@"; do
  echo "== $stage"
  case "$stage" in
    tests)
      timeout 400 python3 -m pytest -q -p no:cacheprovider -n 8 tests/kernels/test_lora.py tests/runtime/test_loop_runner.py \
        tests/passes/test_layer_tying.py tests/ir/test_training.py tests/fxforge/test_recover.py \
        tests/fxforge/test_tying_study.py 2>&1 | tee "$OUT/tying_tests_h200.log" | tail -15 ;;
    study)  # --max-minutes: a slower machine still leaves the runs it finished, and study2 resumes them
      mkdir -p .devcarry/study
      fxforge tying-study --device cuda --unique-layers 15 --max-minutes 8.5 --json-out .devcarry/study/k15.json \
        --plot "$OUT/tying_study_k15_h200.png" 2>&1 | tail -25
      cp .devcarry/study/k15.json* "$OUT/" ;;
    study2)
      fxforge tying-study --device cuda --unique-layers 15,10 --resume .devcarry/study/k15.json --max-minutes 8.5 \
        --json-out "$OUT/tying_study_h200.json" --plot "$OUT/tying_study_h200.png" \
        --markdown-out "$OUT/tying_study_h200.md" 2>&1 | tail -45 ;;
    serving)
      timeout 580 fxforge bench tying --unique-layers 10 --rank 32 --batches 64,256 --max-new-tokens 128 \
        --json-out "$OUT/tying_bench_h200.json" 2>&1 | tail -30 ;;
    recover)
      fxforge compile smollm2-135m --passes layer-tying --option unique_layers=10 --option rank=32 \
        --option init=average --no-eval -o /tmp/tied-k10-r32 2>&1 | tail -3
      timeout 560 fxforge recover /tmp/tied-k10-r32 -o /tmp/tied-k10-r32-recovered --minutes 3 --device cuda \
        --checkpoint-minutes 1 2>&1 | tail -25
      cp /tmp/tied-k10-r32-recovered/recovery.json "$OUT/tying_recover_h200.json" ;;
    *) echo "usage: $0 tests|study|study2|serving|recover ..." >&2; exit 2 ;;
  esac
done
