#!/usr/bin/env bash
# Issue 12 (Op/B placement, Duplex) on the lent H200, by stage; each stage fits one 10-minute call (no GGUF
# needed: every stage uses random weights or none). Results land in $OUT; copy them to benchmarks/results/.
#   bash benchmarks/placement_h200.sh tests       # GPU + CPU tests of the pass, the offload runtime and the CLI (~2 min)
#   bash benchmarks/placement_h200.sh calibrate   # fxforge calibrate-device -> $OUT/h200_system.json (~1 min)
#   bash benchmarks/placement_h200.sh costmodel   # cost model vs measured nodes, calibrated (~6 min, estimate)
#   bash benchmarks/placement_h200.sh offload     # rule vs always-copy vs always-CPU, Mixtral-8x7B experts, 8 layers (~7 min, estimate)
#   bash benchmarks/placement_h200.sh offload-native   # the same with the CPU experts in bf16 (Fiddler's arithmetic)
# `calibrate` first: the later stages read $OUT/h200_system.json (the built-in h200 + host-cpu otherwise).
set -o pipefail
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
SYSTEM="$OUT/h200_system.json"
[ -f "$SYSTEM" ] || SYSTEM="h200,host-cpu"
for stage in "$@"; do
  echo "== $stage"
  case "$stage" in
    tests)
      timeout 400 python3 -m pytest -q -p no:cacheprovider -n 8 tests/runtime/test_expert_offload.py \
        tests/passes/test_opb_placement.py tests/fxforge/test_placement_cli.py tests/ir/test_cost.py \
        2>&1 | tee "$OUT/placement_tests_h200.log" | tail -15 ;;
    calibrate)
      timeout 300 fxforge calibrate-device -o "$OUT/h200_system.json" --prefix h200-local 2>&1 | tail -12 ;;
    costmodel)
      timeout 580 fxforge bench costmodel --models llama-3-8b,mixtral-8x7b --device "${SYSTEM%%,*}" \
        --batches 1,4,16,64,256,1024,2048 --repeats 5 --json-out "$OUT/costmodel_h200.json" \
        --markdown-out "$OUT/costmodel_h200.md" 2>&1 | tail -20 ;;
    offload)
      timeout 580 fxforge bench offload mixtral-8x7b --layers 8 --batches 1,8,64 --repeats 3 --devices "$SYSTEM" \
        --json-out "$OUT/offload_h200.json" 2>&1 | tail -25 ;;
    offload-native)
      timeout 580 fxforge bench offload mixtral-8x7b --layers 8 --batches 1,8,64 --repeats 3 --devices "$SYSTEM" \
        --math native --json-out "$OUT/offload_native_h200.json" 2>&1 | tail -25 ;;
    *) echo "usage: $0 tests|calibrate|costmodel|offload|offload-native ..." >&2; exit 2 ;;
  esac
done
