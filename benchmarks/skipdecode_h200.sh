#!/usr/bin/env bash
# Issue 10 (SkipDecode) on the lent H200, by stage; each stage fits one 10-minute call. Results land in $OUT.
# Real weights arrive in two calls (benchmarks/device_env.sh): `tests` needs none (call 1, carry
# .devcarry/a); `study` in call 2 (carry .devcarry/b, within 30 s, so the same warm machine assembles
# the GGUF); `serving`, `serving2`, `serving3` and `recover` in later calls on that still-warm machine.
#   bash benchmarks/skipdecode_h200.sh tests     # GPU tests: depth graphs and mask policy on the Triton kernels, pass, study smoke (~3 min)
#   bash benchmarks/skipdecode_h200.sh study     # fxforge skip-study: 1.5x/2x/3x x (skip-decode, static exit), 45 s training each (~8 min, estimate)
#   bash benchmarks/skipdecode_h200.sh serving   # fxforge bench skip-decode at batch 64 (full / bucket / mask, 1.5x 2x 3x) (~4 min, estimate)
#   bash benchmarks/skipdecode_h200.sh serving2  # the same at batch 256 (~6 min, estimate)
#   bash benchmarks/skipdecode_h200.sh serving3  # step decay, 4 levels, 2x and 3x, batch 64 and 256 (~6 min, estimate)
#   bash benchmarks/skipdecode_h200.sh recover   # fxforge recover of a 2x skip-decode artifact, 3 minutes of training (~5 min)
set -o pipefail
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
for stage in "$@"; do
  echo "== $stage"
  case "$stage" in
    tests)
      timeout 400 python3 -m pytest -q -p no:cacheprovider -n 8 tests/runtime/test_skip_runner.py \
        tests/passes/test_skip_decode.py tests/fxforge/test_skip_study.py tests/fxforge/test_recover.py \
        2>&1 | tee "$OUT/skipdecode_tests_h200.log" | tail -15 ;;
    study)  # --max-minutes: a slower machine still leaves the runs it finished (the rest listed as skipped)
      fxforge skip-study --device cuda --speedups 1.5,2,3 --train-seconds 45 --max-minutes 8.5 \
        --json-out "$OUT/skip_study_h200.json" --markdown-out "$OUT/skip_study_h200.md" \
        --plot "$OUT/skip_study_h200.png" 2>&1 | tail -30 ;;
    serving)
      timeout 580 fxforge bench skip-decode --speedups 1.5,2,3 --batches 64 --max-new-tokens 128 \
        --json-out "$OUT/skip_bench_b64_h200.json" 2>&1 | tail -30 ;;
    serving2)
      timeout 580 fxforge bench skip-decode --speedups 1.5,2,3 --batches 256 --max-new-tokens 128 --repeats 2 \
        --json-out "$OUT/skip_bench_b256_h200.json" 2>&1 | tail -30 ;;
    serving3)  # step decay with 4 levels: at most 4 depth groups per step and 4 graphs per batch bucket
      timeout 580 fxforge bench skip-decode --speedups 2,3 --decay step --levels 4 --batches 64,256 \
        --max-new-tokens 128 --repeats 2 --json-out "$OUT/skip_bench_step4_h200.json" 2>&1 | tail -30 ;;
    recover)
      fxforge compile smollm2-135m --passes skip-decode --option target_speedup=2 --option span=128 --no-eval \
        -o /tmp/skip-2x 2>&1 | tail -3
      timeout 560 fxforge recover /tmp/skip-2x -o /tmp/skip-2x-recovered --minutes 3 --device cuda \
        --checkpoint-minutes 1 2>&1 | tail -25
      cp /tmp/skip-2x-recovered/recovery.json "$OUT/skipdecode_recover_h200.json" ;;
    *) echo "usage: $0 tests|study|serving|serving2|serving3|recover ..." >&2; exit 2 ;;
  esac
done
