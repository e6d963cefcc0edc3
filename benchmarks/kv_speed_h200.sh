#!/usr/bin/env bash
# Issue 14 (packed KV faster than bf16; decode near roofline) on the lent H200, by stage; each stage
# fits one 10-minute call (times are estimates until a run records them). Results land in $OUT.
# SmolLM2 stages need the real weights (benchmarks/device_env.sh: call 1 carries .devcarry/a, call 2
# .devcarry/b within 30 s); the others run on random weights. `tune` writes the decode configs to
# .devcarry/configs and to $OUT (commit that file to kernels/configs/ afterwards); stages of the same call read
# it (FXFORGE_DECODE_CONFIG_DIR). Ignored repo folders did not survive between calls in the seventh session;
# the ctx-* stages keep theirs in /root/cfg, which does (as device_env.sh's /root/stash).
# e2e stages compare "tiles" (FXFORGE_DECODE_KERNEL=tiles: the decode kernel before issue 14) with
# "tuned" (no override: the tuned config's kernel per shape, "tiles", "blocks" or "diag").
# The session's 30 device-minutes do not hold every stage. The eighth session ran ctx-ablate, ctx-wide, probe-bf16,
# ctx-i8k, wide-e2e, kprof-smol-ctx, ctx-tests, write-bench, write-bench2 and write-e2e (BENCHMARKS.md). Open: the
# packed kernels' V stage (decode through shared memory into the P.V dot) costs what bf16's loads of twice the bytes
# do at SmolLM2's contexts; bf16 "tiles" faults with 4 warps and one stage on Triton 3.6 (probe-bf16).
#   bash benchmarks/kv_speed_h200.sh tests       # GPU tests: both decode kernels vs the reference, decoders, bench (~5 min)
#   bash benchmarks/kv_speed_h200.sh attention   # fxforge bench attention, tiles / blocks / diag vs SDPA, 1k/4k/16k (~5 min)
#   bash benchmarks/kv_speed_h200.sh tune        # sweep of "tiles" variants + ablations at 4k, 8B shape, 5 formats; tuned configs (~4 min, measured)
#   bash benchmarks/kv_speed_h200.sh tune-smol   # the same at the SmolLM2 shape (256 x 9/3 heads, d64), 3 formats (~4 min)
#   bash benchmarks/kv_speed_h200.sh e2e-smol    # SmolLM2 bf16 / bfp16 / bfp12-K-bfp16-V, 512 GSM8K x 256, tiles and tuned, HF (~7 min)
#   bash benchmarks/kv_speed_h200.sh e2e-8b      # Llama-3-8B shape, 64 x 1,792 + 256, the three KV formats, tuned, HF b64 (~7 min)
#   bash benchmarks/kv_speed_h200.sh e2e-8b-tiles  # the same with the tiles kernel, no HF (~4 min)
#   bash benchmarks/kv_speed_h200.sh long        # --workload long-context (8k prompts), 32 GiB of KV per format, tuned (~5 min)
#   bash benchmarks/kv_speed_h200.sh long-tiles  # the same with the tiles kernel (~5 min)
#   bash benchmarks/kv_speed_h200.sh fixed-kv    # SmolLM2, 1,024-token prompts + 256, 4 GiB of KV per format, tiles and tuned (~6 min)
#   bash benchmarks/kv_speed_h200.sh fused-smol  # SmolLM2 (random weights, 160-token prompts): each KV format with and
#                                                # without lower's step fusions (--fused-step), no HF
#   bash benchmarks/kv_speed_h200.sh e2e-smol-fused  # SmolLM2 real weights, 512 GSM8K x 256: each KV format with and without the fusions
#   bash benchmarks/kv_speed_h200.sh fused-8b    # the same on the 8B shape (64 x 1,792 + 256), bf16 and BFP12-K/BFP16-V
#   bash benchmarks/kv_speed_h200.sh i8k         # the int8-key decode kernel vs tiles (BFP12/BFP16 keys), its sweep and tuned configs
#   bash benchmarks/kv_speed_h200.sh i8t         # "i8t" (V stored channels by tokens) vs i8k, its sweep, ablations, SmolLM2 shape
#   bash benchmarks/kv_speed_h200.sh warps       # 1-2 warps per program for tiles / i8k / i8t, 8B and SmolLM2 shapes
#   bash benchmarks/kv_speed_h200.sh split       # programs_per_sm 4/16/32 for one-warp tiles / i8k / i8t, 8B shape (split-smol: SmolLM2's)
#   bash benchmarks/kv_speed_h200.sh split2      # programs_per_sm 2 against 4 for one-warp i8k / i8t, 8B shape (~1 min, measured)
#   bash benchmarks/kv_speed_h200.sh smol-short  # SmolLM2's shape at 512 tokens of context, the tuned launches (~1 min)
#   bash benchmarks/kv_speed_h200.sh vt-bf16     # e2e bf16 / V rows / V channels by tokens, 8B shape and SmolLM2 random (~4.5 min, measured)
#   bash benchmarks/kv_speed_h200.sh e2e-smol-real-cfg  # e2e-smol-real with the decode configs in .devcarry/cfg (carried)
#   bash benchmarks/kv_speed_h200.sh overlap     # SmolLM2 real weights, --overlap-windows off,on (both device_env calls)
#   bash benchmarks/kv_speed_h200.sh overlap-8b  # the 8B shape, bf16 and BFP12-K/BFP16-V, --overlap-windows off,on
#   bash benchmarks/kv_speed_h200.sh overlap-tests  # GPU tests of chained decode windows
#   bash benchmarks/kv_speed_h200.sh split-short # SmolLM2's shape at 512 tokens: min_split_tokens / programs per SM, tuned at 512
#   bash benchmarks/kv_speed_h200.sh short-e2e   # SmolLM2 random weights e2e: committed configs vs split-short's, same call
#   bash benchmarks/kv_speed_h200.sh kprof-smol-wide  # kprof-smol at the GSM8K run's mean context and graph table width
#   bash benchmarks/kv_speed_h200.sh kprof-host  # cProfile of the eager prefill step, bf16 and BFP16 (host time)
#   bash benchmarks/kv_speed_h200.sh kprof-smol  # kernel times of a decode pass and a prefill step, SmolLM2 shape, 3 formats
#   bash benchmarks/kv_speed_h200.sh vt-tests    # GPU tests of V stored channels by tokens (writes, i8t, the engine)
#   bash benchmarks/kv_speed_h200.sh vt          # e2e 8B and long context, V rows vs channels by tokens (i8t), same run (vt-8b, vt-long: one each)
#   bash benchmarks/kv_speed_h200.sh i8k-tests   # GPU tests of the packed decode kernels (i8k among them) and their CUDA-graph replay
#   bash benchmarks/kv_speed_h200.sh ablate      # tiles and i8k at 4k with one stage left out each (what the loads, decode, K and V cost)
#   bash benchmarks/kv_speed_h200.sh e2e-smol-real  # SmolLM2 real weights, 512 GSM8K x 256, the three KV formats, the tuned configs, fusions on
#   bash benchmarks/kv_speed_h200.sh long16x3    # long16 with the median of 3 timed runs
#   bash benchmarks/kv_speed_h200.sh long16x3-tiles  # its packed row with the tiles kernel forced
#   bash benchmarks/kv_speed_h200.sh e2e-8b-packed  # e2e-8b's bf16 and BFP12-K/BFP16-V rows, no HF, median of 2
#   bash benchmarks/kv_speed_h200.sh fusion-tests  # GPU tests of the step-fusion kernels (add_rmsnorm, rope_kv_write, swiglu, fused GEMMs)
#   bash benchmarks/kv_speed_h200.sh prefill-tests  # GPU prefill tests, packed pages decoded in the loop and once
#   bash benchmarks/kv_speed_h200.sh prefill-pages  # prefill attention: in-loop decode vs pages decoded once vs bf16
#   bash benchmarks/kv_speed_h200.sh short-sweep # SmolLM2's shape at 224 / 448 tokens, 464-token tables, tiles / i8k launches; tunes /root/cfg
#   bash benchmarks/kv_speed_h200.sh ctx-bfp16   # BFP16 one-slice launches at 224 / 464 (after short-sweep); tunes /root/cfg
#   bash benchmarks/kv_speed_h200.sh ctx-kernels # every kernel that runs the packed formats at 224 / 464 (~1 min, measured)
#   bash benchmarks/kv_speed_h200.sh ctx-ablate  # the committed launches at 224 and 448 / 464 with stages left out, empty launch
#   bash benchmarks/kv_speed_h200.sh ctx-wide    # tiles of 128 / 256 keys at 224 and 448 / 464, tuned at 224 into /root/cfgw
#   bash benchmarks/kv_speed_h200.sh probe-bf16  # ctx-wide's bf16 tiles variants one process each: which fault
#   bash benchmarks/kv_speed_h200.sh ctx-i8k     # i8k 128 / 256-key launches, 1-4 warps, 224 and 448; tuned at 224 into /root/cfgw
#   bash benchmarks/kv_speed_h200.sh kprof-smol-ctx  # kprof-smol-wide at 220 and 440 tokens, committed configs
#   bash benchmarks/kv_speed_h200.sh write-bench # the fused RoPE + KV write per format and grid cut, SmolLM2 and 8B shapes
#   bash benchmarks/kv_speed_h200.sh write-bench2  # the new default write cut at both shapes, against the old one
#   bash benchmarks/kv_speed_h200.sh write-e2e   # SmolLM2 real weights: old write cut vs new, both orders (~5.5 min)
#   bash benchmarks/kv_speed_h200.sh write-tests # GPU tests of the fused RoPE + KV write and the plain write (~1 min)
#   bash benchmarks/kv_speed_h200.sh wide-e2e    # SmolLM2 real weights, committed configs vs /root/cfgw's, both orders (~5 min)
#   bash benchmarks/kv_speed_h200.sh ctx-tests   # GPU tests of the decode-config picks and the CUDA-graph decode (~1 min)
#   bash benchmarks/kv_speed_h200.sh ctx-e2e     # SmolLM2 real weights, committed configs vs /root/cfg's (both device_env calls; ~2.5 min)
#   bash benchmarks/kv_speed_h200.sh long16      # long-context at 16 GiB of KV, bf16 vs BFP12-K/BFP16-V (~4 min, measured)
set -o pipefail
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -f .devcarry/configs/paged_decode_NVIDIA_H200.json ]; then export FXFORGE_DECODE_CONFIG_DIR=.devcarry/configs; fi
KV="bfloat16,bfp16,bfp12/bfp16"

e2e() {  # e2e tiles|tuned NAME ARGS...: fxforge bench e2e, JSON to $OUT/NAME_KERNEL_h200.json
  local kernel=$1 name=$2 force=""
  shift 2
  if [ "$kernel" = tiles ]; then force=tiles; fi
  FXFORGE_DECODE_KERNEL=$force timeout 560 fxforge bench e2e "$@" --json-out "$OUT/${name}_${kernel}_h200.json" \
    2>&1 | tail -25
}

for stage in "$@"; do
  echo "== $stage"
  case "$stage" in
    tests)
      timeout 560 python3 -m pytest -q -p no:cacheprovider -n 8 tests/kernels/test_paged_attention.py \
        tests/kernels/test_page_decode.py tests/fxforge/test_bench.py 2>&1 | tee "$OUT/kv_tests_h200.log" | tail -15 ;;
    attention)
      timeout 560 fxforge bench attention --formats bfp12_32,bfp16_32,mxfp4_32,bfloat16,bfp12_32/bfp16_32 \
        --kernels tiles,blocks,diag --contexts 1024,4096,16384 --json-out "$OUT/kv_attention_h200.json" 2>&1 | tail -40 ;;
    tune)
      mkdir -p .devcarry/configs
      timeout 560 python3 -m fxforge.kernels.attention_bench "$OUT/kv_sweep_8b_h200.json" --sweep --ablate --kernels tiles \
        --contexts 4096 --formats bfp12_32 bfp16_32 mxfp4_32 bfloat16 bfp12_32/bfp16_32 --tune .devcarry/configs \
        > "$OUT/kv_sweep_8b_h200.log" 2>&1; tail -30 "$OUT/kv_sweep_8b_h200.log"
      cp .devcarry/configs/paged_decode_*.json "$OUT/" ;;
    tune-smol)
      mkdir -p .devcarry/configs
      timeout 560 python3 -m fxforge.kernels.attention_bench "$OUT/kv_sweep_smol_h200.json" --sweep --contexts 4096 \
        --shape 256 9 3 64 --formats bfp16_32 bfloat16 bfp12_32/bfp16_32 --tune .devcarry/configs 2>&1 | tail -12
      cp .devcarry/configs/paged_decode_*.json "$OUT/" ;;
    e2e-smol)
      e2e tiles e2e_smol smollm2-135m --kv "$KV" --hf-batch "" --no-check
      e2e tuned e2e_smol smollm2-135m --kv "$KV" ;;
    e2e-8b)
      e2e tuned e2e_8b llama-3-8b --random-init --prompts 64 --prompt-len 1792 --kv "$KV" --hf-batch 64 ;;
    e2e-8b-tiles)
      e2e tiles e2e_8b llama-3-8b --random-init --prompts 64 --prompt-len 1792 --kv "$KV" --hf-batch "" ;;
    long)
      e2e tuned long --workload long-context --kv "$KV" --kv-memory-gb 32 --repeats 2 ;;
    long-tiles)
      e2e tiles long --workload long-context --kv "$KV" --kv-memory-gb 32 --repeats 2 ;;
    fused-smol)
      e2e tuned fused_smol smollm2-135m --random-init --prompt-len 160 --kv "$KV" --hf-batch "" --fused-step --repeats 3 ;;
    e2e-smol-fused)  # real SmolLM2 weights and GSM8K prompts (both device_env calls), with and without the fusions
      e2e tuned e2e_smol_fused smollm2-135m --kv "$KV" --hf-batch "" --fused-step --repeats 3 ;;
    fused-8b)
      e2e tuned fused_8b llama-3-8b --random-init --prompts 64 --prompt-len 1792 --kv bfloat16,bfp12/bfp16 \
        --hf-batch "" --fused-step --repeats 2 ;;
    i8k)  # the int8-key kernel against tiles (tables at 4k/16k, then its sweep; tuned configs merged)
      mkdir -p .devcarry/configs
      timeout 200 fxforge bench attention --formats bfp12_32,bfp16_32,bfp12_32/bfp16_32 --kernels tiles,i8k \
        --contexts 4096,16384 --json-out "$OUT/kv_attention_i8k_h200.json" 2>&1 | tail -12
      timeout 330 python3 -m fxforge.kernels.attention_bench "$OUT/kv_sweep_i8k_h200.json" --sweep --kernels tiles i8k \
        --contexts 4096 --formats bfp12_32 bfp16_32 bfp12_32/bfp16_32 --tune .devcarry/configs > "$OUT/kv_sweep_i8k_h200.log" 2>&1
      tail -12 "$OUT/kv_sweep_i8k_h200.log"; cp .devcarry/configs/paged_decode_*.json "$OUT/" ;;
    i8t)  # "i8t" (V stored channels by tokens, V's codes in int8 dots) against i8k, its sweep and ablations, SmolLM2's shape
      timeout 200 fxforge bench attention --formats bfp12_32,bfp16_32,bfp12_32/bfp16_32 --kernels i8k,i8t \
        --contexts 4096,16384 --json-out "$OUT/kv_attention_i8t_h200.json" 2>&1 | tail -12
      timeout 250 python3 -m fxforge.kernels.attention_bench "$OUT/kv_sweep_i8t_h200.json" --sweep --ablate --kernels i8t \
        --contexts 4096 --formats bfp12_32 bfp16_32 bfp12_32/bfp16_32 > "$OUT/kv_sweep_i8t_h200.log" 2>&1
      grep -v Warning "$OUT/kv_sweep_i8t_h200.log" | grep "ctx" | tail -30
      timeout 120 python3 -m fxforge.kernels.attention_bench "$OUT/kv_smol_i8t_h200.json" --kernels tiles i8k i8t \
        --contexts 4096 --shape 256 9 3 64 --formats bfp16_32 bfp12_32/bfp16_32 bfloat16 2>&1 | grep "ctx" | tail -8 ;;
    warps)  # fewer warps per program (1-2: the token-axis reductions stay in a warp), 8B and SmolLM2 shapes
      W='[{"num_warps": 2}, {"num_warps": 2, "block_n": 32}, {"num_warps": 1, "block_n": 32}, {"num_warps": 2, "num_stages": 3}, {"num_warps": 1}]'
      timeout 280 python3 -m fxforge.kernels.attention_bench "$OUT/kv_warps_8b_h200.json" --sweep --variants "$W" \
        --kernels tiles i8k i8t --contexts 4096 --formats bfp12_32 bfp16_32 bfp12_32/bfp16_32 bfloat16 \
        > "$OUT/kv_warps_8b_h200.log" 2>&1; grep -v Warning "$OUT/kv_warps_8b_h200.log" | grep "ctx" | tail -50
      timeout 170 python3 -m fxforge.kernels.attention_bench "$OUT/kv_warps_smol_h200.json" --sweep --variants "$W" \
        --kernels tiles i8k --contexts 4096 --shape 256 9 3 64 --formats bfp16_32 bfp12_32/bfp16_32 bfloat16 \
        > "$OUT/kv_warps_smol_h200.log" 2>&1; grep -v Warning "$OUT/kv_warps_smol_h200.log" | grep "ctx" | tail -30 ;;
    split)  # the split-K target (programs_per_sm) of one-warp programs: i8k / i8t / tiles, 8B shape
      S='[{"num_warps": 1, "programs_per_sm": 4}, {"num_warps": 1, "programs_per_sm": 16}, {"num_warps": 1, "programs_per_sm": 32}, {"num_warps": 1, "block_n": 32, "programs_per_sm": 16}, {"num_warps": 1, "block_n": 32, "programs_per_sm": 32}]'
      timeout 300 python3 -m fxforge.kernels.attention_bench "$OUT/kv_split_8b_h200.json" --sweep --variants "$S" \
        --kernels tiles i8k i8t --contexts 4096 --formats bfp12_32 bfp16_32 bfp12_32/bfp16_32 bfloat16 \
        > "$OUT/kv_split_8b_h200.log" 2>&1; grep -v Warning "$OUT/kv_split_8b_h200.log" | grep "ctx" | tail -60 ;;
    split-smol)  # the same at SmolLM2's shape (256 x 9/3 heads, d64)
      S='[{"num_warps": 1, "programs_per_sm": 4}, {"num_warps": 1, "programs_per_sm": 16}, {"num_warps": 1, "programs_per_sm": 32}, {"num_warps": 1, "block_n": 32, "programs_per_sm": 16}, {"num_warps": 1, "block_n": 32, "programs_per_sm": 32}]'
      timeout 200 python3 -m fxforge.kernels.attention_bench "$OUT/kv_split_smol_h200.json" --sweep --variants "$S" \
        --kernels tiles i8k i8t --contexts 4096 --shape 256 9 3 64 --formats bfp16_32 bfp12_32/bfp16_32 bfloat16 \
        > "$OUT/kv_split_smol_h200.log" 2>&1; grep -v Warning "$OUT/kv_split_smol_h200.log" | grep "ctx" | tail -40 ;;
    split2)  # programs_per_sm 2 (one split at B=64 x 8 KV heads) against 4 for one-warp i8k / i8t, 8B shape
      S='[{"num_warps": 1, "programs_per_sm": 2}, {"num_warps": 1, "programs_per_sm": 4}]'
      timeout 200 python3 -m fxforge.kernels.attention_bench "$OUT/kv_split2_8b_h200.json" --sweep --variants "$S" \
        --kernels i8k i8t --contexts 4096 --formats bfp12_32 bfp16_32 bfp12_32/bfp16_32 \
        > "$OUT/kv_split2_8b_h200.log" 2>&1; grep -v Warning "$OUT/kv_split2_8b_h200.log" | grep "ctx" | tail -20 ;;
    smol-short)  # SmolLM2's shape at 512 tokens of context (its GSM8K run's regime): the tuned launches, tiles and i8k
      # (the fifth session's run also passed --sweep --variants, which time variants at 4096 only: no rows)
      timeout 200 python3 -m fxforge.kernels.attention_bench "$OUT/kv_smol_short_h200.json" \
        --kernels tiles i8k --contexts 512 --shape 256 9 3 64 --formats bfp16_32 bfp12_32/bfp16_32 bfloat16 \
        > "$OUT/kv_smol_short_h200.log" 2>&1; grep -v Warning "$OUT/kv_smol_short_h200.log" | grep "ctx" | tail -40 ;;
    vt-tests)  # GPU tests: the KV writes (now through the cache's strides, both layouts), i8t and one-warp decode,
               # the engine with v_layout=channels
      timeout 300 python3 -m pytest -q -p no:cacheprovider -n 8 tests/kernels/test_kv_write.py \
        tests/kernels/test_rope_kv_write.py 2>&1 | tee "$OUT/vt_tests_h200.log" | tail -4
      timeout 300 python3 -m pytest -q -p no:cacheprovider -n 8 tests/kernels/test_paged_attention.py \
        tests/runtime/test_engine.py -k "channels or i8t or blocks_decode or odd_size or prefill" 2>&1 \
        | tee -a "$OUT/vt_tests_h200.log" | tail -6 ;;
    vt|vt-8b|vt-long)  # end to end, V row by row against channels by tokens (i8t), same run: the 8B shape and long context
      if [ "$stage" != vt-long ]; then
        e2e tuned vt_8b llama-3-8b --random-init --prompts 64 --prompt-len 1792 --kv bfp12/bfp16,bfp12 --hf-batch "" \
          --repeats 2 --v-layout rows,channels
      fi
      if [ "$stage" != vt-8b ]; then
        e2e tuned vt_long --workload long-context --kv bfp12/bfp16 --kv-memory-gb 16 --repeats 2 --v-layout rows,channels
      fi ;;
    vt-bf16)  # bf16 against V rows and V channels by tokens in one run: the 8B shape, then SmolLM2's (random weights)
      e2e tuned vt_bf16_8b llama-3-8b --random-init --prompts 64 --prompt-len 1792 --kv bfloat16,bfp12/bfp16,bfp12 \
        --hf-batch "" --repeats 2 --v-layout rows,channels
      e2e tuned vt_bf16_smol smollm2-135m --random-init --prompt-len 160 --kv "$KV" --hf-batch "" --repeats 3 \
        --v-layout rows,channels ;;
    overlap)  # SmolLM2 real weights (both device_env calls), each window read before the next is launched vs after
      e2e tuned overlap_smol smollm2-135m --kv "$KV" --hf-batch "" --repeats 3 --overlap-windows off,on ;;
    overlap-8b)  # the same on the 8B shape (random weights), bf16 and BFP12-K/BFP16-V
      e2e tuned overlap_8b llama-3-8b --random-init --prompts 64 --prompt-len 1792 --kv bfloat16,bfp12/bfp16 \
        --hf-batch "" --repeats 2 --overlap-windows off,on ;;
    short-sweep)  # SmolLM2's shape as the GSM8K run's decode graphs launch it (page tables 464 tokens wide,
                  # max_model_len 449): warps, tiles, slices, stages for tiles / i8k, 3 formats, at 224 tokens of
                  # context (about the run's mean; tuned into /root/cfg, a copy of the committed file, keyed
                  # context=464; /root survives between calls to a warm machine, ignored repo folders do not)
                  # and at 448 (rows only)
      mkdir -p /root/cfg && cp kernels/configs/paged_decode_NVIDIA_H200.json /root/cfg/
      S='[{}, {"num_warps": 1}, {"num_warps": 2}, {"num_warps": 1, "programs_per_sm": 16, "min_split_tokens": 64}, {"num_warps": 1, "programs_per_sm": 16, "min_split_tokens": 128}, {"num_warps": 2, "programs_per_sm": 16, "min_split_tokens": 128}, {"num_warps": 4, "programs_per_sm": 16, "min_split_tokens": 128}, {"num_warps": 1, "block_n": 32}, {"num_warps": 1, "block_n": 32, "programs_per_sm": 16, "min_split_tokens": 64}, {"num_warps": 2, "block_n": 32}, {"num_warps": 4, "num_stages": 3}, {"num_warps": 1, "num_stages": 3}]'
      for ctx in 224 448; do
        tune=""; if [ $ctx = 224 ]; then tune="--tune /root/cfg"; fi
        timeout 250 python3 -m fxforge.kernels.attention_bench "$OUT/kv_short_sweep_${ctx}_h200.json" --sweep --variants "$S" \
          --sweep-context $ctx --contexts $ctx --table-tokens 464 --kernels tiles i8k --shape 256 9 3 64 \
          --formats bfp16_32 bfp12_32/bfp16_32 bfloat16 $tune > "$OUT/kv_short_sweep_${ctx}_h200.log" 2>&1
        grep -v Warning "$OUT/kv_short_sweep_${ctx}_h200.log" | grep "ctx\|tuned" | tail -80
      done
      cp /root/cfg/paged_decode_NVIDIA_H200.json "$OUT/paged_decode_NVIDIA_H200_ctx464.json" ;;
    ctx-bfp16)  # short-sweep's BFP16 rows inherited the context=512 entry's split launch: one slice (8 programs per
                # SM, 256-token slices) and the BFP12-K entry's launches too, at 224 tokens / 464-token tables; tuned
                # into /root/cfg (seeded from .devcarry/a/cfg when short-sweep ran in an earlier session)
      mkdir -p /root/cfg; [ -f /root/cfg/paged_decode_NVIDIA_H200.json ] || cp .devcarry/a/cfg/*.json /root/cfg/
      S='[{"num_warps": 1, "block_n": 32, "num_stages": 3, "programs_per_sm": 8, "min_split_tokens": 256}, {"num_warps": 1, "block_n": 32, "programs_per_sm": 8, "min_split_tokens": 256}, {"num_warps": 1, "programs_per_sm": 8, "min_split_tokens": 256}, {"num_warps": 1, "num_stages": 3, "programs_per_sm": 8, "min_split_tokens": 256}, {"num_warps": 2, "block_n": 32, "programs_per_sm": 8, "min_split_tokens": 256}, {"num_warps": 1, "block_n": 32, "programs_per_sm": 16, "min_split_tokens": 64}]'
      timeout 200 python3 -m fxforge.kernels.attention_bench "$OUT/kv_ctx_bfp16_h200.json" --sweep --variants "$S" \
        --sweep-context 224 --contexts 224 --table-tokens 464 --kernels tiles i8k --shape 256 9 3 64 \
        --formats bfp16_32 --tune /root/cfg > "$OUT/kv_ctx_bfp16_h200.log" 2>&1
      grep -v Warning "$OUT/kv_ctx_bfp16_h200.log" | grep "ctx\|tuned" | tail -20
      cp /root/cfg/paged_decode_NVIDIA_H200.json "$OUT/paged_decode_NVIDIA_H200_ctx464.json" ;;
    ctx-kernels)  # every decode kernel that runs the packed formats (blocks, diag, i8t over V channels by tokens too)
                  # at 224 tokens / 464-token tables, a few launches each: rows only
      S='[{"num_warps": 1, "programs_per_sm": 8, "min_split_tokens": 256}, {"num_warps": 2, "programs_per_sm": 8, "min_split_tokens": 256}, {"num_warps": 1, "block_n": 32, "programs_per_sm": 8, "min_split_tokens": 256}, {"num_warps": 1, "programs_per_sm": 16, "min_split_tokens": 64}]'
      timeout 250 python3 -m fxforge.kernels.attention_bench "$OUT/kv_ctx_kernels_h200.json" --sweep --variants "$S" \
        --sweep-context 224 --contexts 224 --table-tokens 464 --kernels tiles blocks diag i8k i8t --shape 256 9 3 64 \
        --formats bfp16_32 bfp12_32/bfp16_32 > "$OUT/kv_ctx_kernels_h200.log" 2>&1
      grep -v Warning "$OUT/kv_ctx_kernels_h200.log" | grep "ctx" | sed 's/x .*vs SDPA ([^)]*)//' | tail -50 ;;
    ctx-ablate)  # what sets the common ~26.5 us at 224 tokens / 464-token tables, and what bounds the packed kernels at
                 # 448: the committed launches of tiles and i8k with stages left out (tiles: loads only, loads +
                 # decode; i8k: no V stage, no K stage; both: no loop) and an empty launch of the same grid
      timeout 250 python3 -m fxforge.kernels.attention_bench "$OUT/kv_ctx_ablate_h200.json" --ablate --kernels tiles i8k \
        --contexts 224 448 --table-tokens 464 --shape 256 9 3 64 --formats bfp16_32 bfp12_32/bfp16_32 bfloat16 \
        > "$OUT/kv_ctx_ablate_h200.log" 2>&1
      grep -v Warning "$OUT/kv_ctx_ablate_h200.log" | grep "ctx" | sed 's/x .*vs SDPA ([^)]*)//' | tail -40 ;;
    ctx-wide)  # tiles of 128 / 256 keys at SmolLM2's contexts (fewer, longer loop iterations: more bytes in flight a
               # program), tiles and i8k, 3 formats, 464-token tables; tuned at 224 into /root/cfgw (a copy of the
               # committed file), rows only at 448
      mkdir -p /root/cfgw && cp kernels/configs/paged_decode_NVIDIA_H200.json /root/cfgw/
      S='[{"block_n": 128, "num_warps": 2, "num_stages": 2}, {"block_n": 128, "num_warps": 4, "num_stages": 1}, {"block_n": 128, "num_warps": 4, "num_stages": 2}, {"block_n": 128, "num_warps": 8, "num_stages": 2}, {"block_n": 128, "num_warps": 4, "num_stages": 1, "prefetch": true}, {"block_n": 256, "num_warps": 4, "num_stages": 1}, {"block_n": 256, "num_warps": 8, "num_stages": 1}, {"block_n": 256, "num_warps": 8, "num_stages": 2}, {"block_n": 256, "num_warps": 8, "num_stages": 1, "prefetch": true}]'
      for ctx in 224 448; do
        tune=""; if [ $ctx = 224 ]; then tune="--tune /root/cfgw"; fi
        timeout 250 python3 -m fxforge.kernels.attention_bench "$OUT/kv_ctx_wide_${ctx}_h200.json" --sweep --variants "$S" \
          --sweep-context $ctx --contexts $ctx --table-tokens 464 --kernels tiles i8k --shape 256 9 3 64 \
          --formats bfp16_32 bfp12_32/bfp16_32 bfloat16 $tune > "$OUT/kv_ctx_wide_${ctx}_h200.log" 2>&1
        grep -v Warning "$OUT/kv_ctx_wide_${ctx}_h200.log" | grep "ctx\|tuned\|skipped" | sed 's/x .*vs SDPA ([^)]*)//' | tail -70
      done
      cp /root/cfgw/paged_decode_NVIDIA_H200.json "$OUT/paged_decode_NVIDIA_H200_wide.json" ;;
    probe-bf16)  # ctx-wide's bf16 "tiles" sweep ended in an illegal memory access at its third launch (128 keys, 4 warps,
                 # one stage): each of its bf16 variants in a process of its own, which ones fault
      timeout 400 python3 benchmarks/decode_variant_probe.py "$OUT/kv_probe_bf16_h200.json" --format bfloat16 \
        --context 224 --table-tokens 464 --kernel tiles \
        --variants '[{"block_n": 128, "num_warps": 2, "num_stages": 2}, {"block_n": 128, "num_warps": 4, "num_stages": 1}, {"block_n": 128, "num_warps": 4, "num_stages": 2}, {"block_n": 128, "num_warps": 4, "num_stages": 1, "prefetch": true}, {"block_n": 256, "num_warps": 4, "num_stages": 1}, {"block_n": 64, "num_warps": 4, "num_stages": 1}, {"block_n": 64, "num_warps": 2, "num_stages": 1}]' \
        2>&1 | grep -v Warning | tail -12 ;;
    ctx-i8k)  # around ctx-wide's find (BFP12-K/BFP16-V i8k, 128 keys, 2 warps, 2 stages: 24.4 us against bf16's 26.7 at
              # 224 tokens): i8k's 128 / 256-key launches with 1-4 warps, BFP16 and BFP12-K/BFP16-V, 224 and 448 tokens,
              # 464-token tables; tuned at 224 into /root/cfgw (a copy of the committed file), rows only at 448
      mkdir -p /root/cfgw && cp kernels/configs/paged_decode_NVIDIA_H200.json /root/cfgw/
      S='[{"block_n": 128, "num_warps": 1, "num_stages": 2}, {"block_n": 128, "num_warps": 1, "num_stages": 3}, {"block_n": 128, "num_warps": 2, "num_stages": 2}, {"block_n": 128, "num_warps": 2, "num_stages": 3}, {"block_n": 128, "num_warps": 2, "num_stages": 1}, {"block_n": 256, "num_warps": 2, "num_stages": 1}, {"block_n": 256, "num_warps": 2, "num_stages": 2}, {"block_n": 256, "num_warps": 4, "num_stages": 2}, {"block_n": 64, "num_warps": 2, "num_stages": 2}]'
      for ctx in 224 448; do
        tune=""; if [ $ctx = 224 ]; then tune="--tune /root/cfgw"; fi
        timeout 250 python3 -m fxforge.kernels.attention_bench "$OUT/kv_ctx_i8k_${ctx}_h200.json" --sweep --variants "$S" \
          --sweep-context $ctx --contexts $ctx --table-tokens 464 --kernels tiles i8k --shape 256 9 3 64 \
          --formats bfp16_32 bfp12_32/bfp16_32 $tune > "$OUT/kv_ctx_i8k_${ctx}_h200.log" 2>&1
        grep -v Warning "$OUT/kv_ctx_i8k_${ctx}_h200.log" | grep "ctx\|tuned\|skipped\|Error" | grep -v " tiles {" \
          | sed 's/x .*vs SDPA ([^)]*)//' | tail -30
      done
      cp /root/cfgw/paged_decode_NVIDIA_H200.json "$OUT/paged_decode_NVIDIA_H200_i8k.json" ;;
    wide-e2e)  # SmolLM2 real weights (both device_env calls), 512 GSM8K x 256: committed decode configs against
               # /root/cfgw's (ctx-wide's or ctx-i8k's), same call, both orders
      FXFORGE_DECODE_CONFIG_DIR=kernels/configs e2e tuned wide_committed_smol smollm2-135m --kv "$KV" --hf-batch "" \
        --repeats 3 --no-check
      FXFORGE_DECODE_CONFIG_DIR=/root/cfgw e2e tuned wide_tuned_smol smollm2-135m --kv "$KV" --hf-batch "" \
        --repeats 3 --no-check
      FXFORGE_DECODE_CONFIG_DIR=/root/cfgw e2e tuned wide_tuned2_smol smollm2-135m --kv "$KV" --hf-batch "" \
        --repeats 3 --no-check
      FXFORGE_DECODE_CONFIG_DIR=kernels/configs e2e tuned wide_committed2_smol smollm2-135m --kv "$KV" --hf-batch "" \
        --repeats 3 --no-check ;;
    ctx-tests)  # GPU tests of the decode config picks (by page-table capacity) and the CUDA-graph decode
      timeout 300 python3 -m pytest -q -p no:cacheprovider -n 8 tests/kernels/test_paged_attention.py \
        -k "config or tuned or tuner or capacity or channels or cuda_graph" 2>&1 | tee "$OUT/ctx_tests_h200.log" | tail -4 ;;
    ctx-e2e)  # SmolLM2 real weights (both device_env calls), 512 GSM8K x 256, overlapped windows: the committed decode
              # configs against those in /root/cfg (short-sweep's and ctx-bfp16's context=464 entries), same call
      FXFORGE_DECODE_CONFIG_DIR=kernels/configs e2e tuned ctx_committed_smol smollm2-135m --kv "$KV" --hf-batch "" \
        --repeats 3 --no-check
      FXFORGE_DECODE_CONFIG_DIR=/root/cfg e2e tuned ctx_tuned_smol smollm2-135m --kv "$KV" --hf-batch "" \
        --repeats 3 ;;
    split-short)  # SmolLM2's shape at 512 tokens (its GSM8K regime): shorter context slices (min_split_tokens) and
                  # more programs; tuned at 512 into .devcarry/configs (a copy of the committed file) and $OUT
      mkdir -p .devcarry/configs && cp kernels/configs/paged_decode_NVIDIA_H200.json .devcarry/configs/
      S='[{"min_split_tokens": 128}, {"min_split_tokens": 64}, {"num_warps": 1, "programs_per_sm": 16, "min_split_tokens": 64}, {"num_warps": 1, "programs_per_sm": 32, "min_split_tokens": 64}, {"num_warps": 1, "programs_per_sm": 32, "min_split_tokens": 128}, {"num_warps": 2, "programs_per_sm": 16, "min_split_tokens": 64}, {"num_warps": 4, "programs_per_sm": 16, "min_split_tokens": 64}, {"num_warps": 1, "block_n": 32, "programs_per_sm": 32, "min_split_tokens": 32}]'
      timeout 240 python3 -m fxforge.kernels.attention_bench "$OUT/kv_split_short_smol_h200.json" --sweep --variants "$S" \
        --sweep-context 512 --contexts 512 --kernels tiles i8k --shape 256 9 3 64 \
        --formats bfp16_32 bfp12_32/bfp16_32 bfloat16 --tune .devcarry/configs > "$OUT/kv_split_short_smol_h200.log" 2>&1
      grep -v Warning "$OUT/kv_split_short_smol_h200.log" | grep "ctx\|tuned" | tail -40
      cp .devcarry/configs/paged_decode_NVIDIA_H200.json "$OUT/paged_decode_NVIDIA_H200_short.json" ;;
    short-e2e)  # SmolLM2 random weights, 160-token prompts: the committed decode configs against split-short's, same call
      FXFORGE_DECODE_CONFIG_DIR=kernels/configs e2e tuned short_committed_smol smollm2-135m --random-init \
        --prompt-len 160 --kv "$KV" --hf-batch "" --repeats 3
      FXFORGE_DECODE_CONFIG_DIR=.devcarry/configs e2e tuned short_tuned_smol smollm2-135m --random-init \
        --prompt-len 160 --kv "$KV" --hf-batch "" --repeats 3 ;;
    kprof-smol)  # kernel times of one eager decode pass (256 x 300 tokens) and one prefill step, SmolLM2 shape
      timeout 200 python3 benchmarks/kernel_profile.py smollm2-135m --random-init --batch 256 --context 300 \
        --prefill-tokens 8192 --kv bfloat16,bfp16,bfp12/bfp16 --dispatch library --json-out "$OUT/kernel_profile_smol_h200.json" \
        2>&1 | grep -v Warning | tail -120 ;;
    kprof-smol-wide)  # the GSM8K run's decode launch: its mean context (~220) and page tables 464 tokens wide, as its
      # decode graphs have them (max_model_len 449): the split count follows the width
      timeout 200 python3 benchmarks/kernel_profile.py smollm2-135m --random-init --batch 256 --context 220 \
        --table-tokens 464 --prefill-tokens 8192 --kv bfloat16,bfp16,bfp12/bfp16 \
        --json-out "$OUT/kernel_profile_smol_wide_h200.json" 2>&1 | grep -v Warning | grep "####\|== decode" -A4 ;;
    kprof-smol-ctx)  # kprof-smol-wide at 220 and 440 tokens of context with the committed configs (the eighth session's
                     # BFP12-K/BFP16-V entry): where the e2e decode windows' remaining packed cost goes, kernel by kernel
      for ctx in 220 440; do
        timeout 200 python3 benchmarks/kernel_profile.py smollm2-135m --random-init --batch 256 --context $ctx \
          --table-tokens 464 --prefill-tokens 8192 --kv bfloat16,bfp16,bfp12/bfp16 \
          --json-out "$OUT/kernel_profile_smol_ctx${ctx}_h200.json" 2>&1 | grep -v Warning | grep "####\|== decode" -A4
      done ;;
    write-bench)  # the fused RoPE + KV write of one layer's decode batch (SmolLM2: 256 tokens x 3 heads x d64; 8B: 64 x 8 x
                  # d128) per KV format and grid cut: packed writes cost ~1.2 us a layer more than bf16's (kprof-smol-ctx)
      L='[{}, {"split_kv": true}, {"num_warps": 1}, {"num_warps": 2}, {"split_kv": true, "num_warps": 1}, {"split_kv": true, "num_warps": 2}, {"values_per_program": 64, "num_warps": 1}, {"values_per_program": 64, "split_kv": true, "num_warps": 1}, {"values_per_program": 64, "split_kv": true, "num_warps": 2}]'
      for shape in "256 3 64" "64 8 128"; do
        timeout 200 python3 benchmarks/kv_write_bench.py "$OUT/kv_write_${shape// /_}_h200.json" --shape $shape \
          --formats bfloat16 bfp16 bfp12/bfp16 --launches "$L" 2>&1 | grep -v Warning | tail -30
      done ;;
    write-bench2)  # the default cut chosen from write-bench ({values_per_program 256, split_kv, 2 warps}: SmolLM2's best
                   # launch) at the 8B shape, where it cuts 2 heads a program (not timed by write-bench), and the old cut
      OLD='{"values_per_program": 1024, "split_kv": false, "num_warps": 4}'
      timeout 200 python3 benchmarks/kv_write_bench.py "$OUT/kv_write2_64_8_128_h200.json" --shape 64 8 128 \
        --formats bfloat16 bfp16 bfp12/bfp16 --launches "[{}, $OLD, {\"values_per_program\": 128}]" 2>&1 | grep -v Warning | tail -12
      timeout 200 python3 benchmarks/kv_write_bench.py "$OUT/kv_write2_256_3_64_h200.json" --shape 256 3 64 \
        --formats bfloat16 bfp16 bfp12/bfp16 --launches "[{}, $OLD]" 2>&1 | grep -v Warning | tail -8 ;;
    write-e2e)  # SmolLM2 real weights (both device_env calls), 512 GSM8K x 256: the KV write's old cut (FXFORGE_WRITE_LAUNCH)
                # against the new default, same call, both orders; committed decode configs
      OLD='{"values_per_program": 1024, "split_kv": false, "num_warps": 4}'
      FXFORGE_WRITE_LAUNCH="$OLD" e2e tuned write_old_smol smollm2-135m --kv "$KV" --hf-batch "" --repeats 3 --no-check
      e2e tuned write_new_smol smollm2-135m --kv "$KV" --hf-batch "" --repeats 3
      e2e tuned write_new2_smol smollm2-135m --kv "$KV" --hf-batch "" --repeats 3 --no-check
      FXFORGE_WRITE_LAUNCH="$OLD" e2e tuned write_old2_smol smollm2-135m --kv "$KV" --hf-batch "" --repeats 3 --no-check ;;
    write-tests)  # GPU tests of the fused RoPE + KV write (the new grid cut) and the plain write, against the references
      timeout 300 python3 -m pytest -q -p no:cacheprovider -n 8 tests/kernels/test_rope_kv_write.py tests/kernels/test_kv_write.py \
        -k "TestCUDA" 2>&1 | tee "$OUT/write_tests_h200.log" | tail -4 ;;
    kprof-host)  # where the eager packed prefill step's extra host time goes: cProfile of bf16 and BFP16 prefill steps
      for kv in bfloat16 bfp16; do
        timeout 150 python3 benchmarks/kernel_profile.py smollm2-135m --random-init --batch 256 --context 300 \
          --prefill-tokens 8192 --kv $kv --cprofile 2>&1 | grep -v Warning > "$OUT/kprof_host_${kv}_h200.log"
        grep "== \|tottime\|function calls" -A14 "$OUT/kprof_host_${kv}_h200.log" | head -60
      done ;;
    overlap-tests)  # GPU tests of chained windows (CUDA graphs, a packed cache)
      timeout 300 python3 -m pytest -q -p no:cacheprovider -n 8 tests/runtime/test_engine.py -k "overlap" 2>&1 \
        | tee "$OUT/overlap_tests_h200.log" | tail -4 ;;
    i8k-tests)
      timeout 300 python3 -m pytest -q -p no:cacheprovider -n 8 tests/kernels/test_paged_attention.py \
        -k "blocks_decode or cuda_graph" 2>&1 | tee "$OUT/kv_i8k_tests_h200.log" | tail -8 ;;
    ablate)
      timeout 300 python3 -m fxforge.kernels.attention_bench "$OUT/kv_ablate_h200.json" --ablate --kernels tiles i8k \
        --contexts 4096 --formats bfp12_32 bfp16_32 bfp12_32/bfp16_32 bfloat16 > "$OUT/kv_ablate_h200.log" 2>&1
      grep -v Warning "$OUT/kv_ablate_h200.log" | grep "ctx" | tail -14 ;;
    e2e-smol-real)
      e2e tuned e2e_smol_real smollm2-135m --kv "$KV" --hf-batch "" --repeats 3 ;;
    e2e-smol-real-cfg)  # the same with the decode configs of .devcarry/cfg (carried): a second set of picks, same machine
      FXFORGE_DECODE_CONFIG_DIR=.devcarry/cfg e2e tuned e2e_smol_real_cfg smollm2-135m --kv "$KV" --hf-batch "" --repeats 3 ;;
    long16x3)
      e2e tuned long16x3 --workload long-context --kv bfloat16,bfp12/bfp16 --kv-memory-gb 16 --repeats 3 ;;
    long16x3-tiles)  # the packed row of long16x3 with the tiles decode kernel (i8k's peer)
      e2e tiles long16x3 --workload long-context --kv bfp12/bfp16 --kv-memory-gb 16 --repeats 3 ;;
    e2e-8b-packed)  # e2e-8b without HF and BFP16, median of 2: bf16 against BFP12-K/BFP16-V with the tuned kernel (i8k)
      e2e tuned e2e_8b_packed llama-3-8b --random-init --prompts 64 --prompt-len 1792 --kv bfloat16,bfp12/bfp16 \
        --hf-batch "" --repeats 2 ;;
    fusion-tests)
      timeout 300 python3 -m pytest -q -p no:cacheprovider -n 8 tests/kernels/test_norm.py tests/kernels/test_rope_kv_write.py \
        tests/kernels/test_rope.py tests/kernels/test_kv_write.py tests/kernels/test_swiglu.py \
        tests/passes/test_fuse_projections.py tests/passes/test_fuse_elementwise.py \
        2>&1 | tee "$OUT/fusion_tests_h200.log" | tail -15 ;;
    prefill-tests)  # GPU prefill tests: packed tiles decoded in the loop and the step's pages decoded once
      timeout 300 python3 -m pytest -q -p no:cacheprovider -n 8 tests/kernels/test_paged_attention.py -k "prefill" \
        2>&1 | tee "$OUT/prefill_tests_h200.log" | tail -6 ;;
    prefill-pages)  # one prefill step's attention (8B shape, 4 x 8192 and 18 x 1792 tokens): in-loop decode vs decoded once vs bf16
      timeout 300 python3 benchmarks/prefill_pages.py "$OUT/prefill_pages_h200.json" 2>&1 | tail -12 ;;
    prefill-sweep)  # the same with the prefill kernel's launch variants timed on the bf16 cache
      timeout 400 python3 benchmarks/prefill_pages.py "$OUT/prefill_sweep_h200.json" --sweep 2>&1 | tail -30 ;;
    long16)
      e2e tuned long16 --workload long-context --kv bfloat16,bfp12/bfp16 --kv-memory-gb 16 --repeats 1 ;;
    fixed-kv)
      for kernel in tiles tuned; do
        e2e "$kernel" fixed_kv smollm2-135m --prompt-len 1024 --kv-memory-gb 4 --kv "$KV" --hf-batch "" --no-check \
          --repeats 2
      done ;;
    *) echo "usage: $0 tests|attention|tune|tune-smol|e2e-smol|e2e-8b|e2e-8b-tiles|long|long-tiles|long16|fused-smol|e2e-smol-fused|fused-8b|fusion-tests|i8k|i8t|warps|vt-tests|vt|i8k-tests|ablate|e2e-smol-real|long16x3|long16x3-tiles|e2e-8b-packed|prefill-tests|prefill-pages|prefill-sweep|fixed-kv ..." >&2
       exit 2 ;;
  esac
done
