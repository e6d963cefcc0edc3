"""fxforge/bench.py on CPU: the MoE roofline counts only the experts routed to, the HF peer of a named
shape is the same architecture, the HF run falls back from the static to the dynamic cache and says
so, and `fxforge bench moe` refuses to start without CUDA. Honest accounting (issue 14): the counts
are the timed run's only, the roofline is the sum over passes of max(FLOPs / peak, bytes / bandwidth)
with its FLOPs and bytes in every row; the fixed-KV-memory and long-context modes of `bench e2e`
run on CPU (--smoke) with a tiny model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from fxforge.bench import (FlopModel, expert_weight_bytes, hf_from_spec, roofline, roofline_bytes, run_fxforge,
                           run_hf_best, seats_in_kv_memory, weight_bytes)
from fxforge.cli import app
from fxforge.kernels.triton_support import INTERPRETED
from fxforge.ir.importers.hf import spec_from_hf_config
from fxforge.ir.importers.named import NAMED_SHAPES
from fxforge.runtime.engine import Engine, EngineStats
from fxforge.runtime.sequence import SamplingParams
from tests.conftest import TINY_SPECS, tiny_model

transformers = pytest.importorskip("transformers")

SPEC_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "rope_theta",
               "rms_norm_eps", "qk_norm", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob")


def small(name: str):
    """A named shape cut down to run on a CPU, every other fact kept."""
    spec = NAMED_SHAPES[name]
    return dataclasses.replace(spec, num_layers=2, vocab_size=300, hidden_size=64, num_heads=4, num_kv_heads=2,
                               head_dim=16, intermediate_size=96, moe_intermediate_size=32 if spec.is_moe else 0,
                               num_experts=min(spec.num_experts, 16))


def test_moe_roofline_counts_only_the_experts_routed_to():
    model = tiny_model("mixtral-moe")
    spec = model.spec
    experts = expert_weight_bytes(model)
    assert experts == spec.num_layers * 3 * spec.num_experts * spec.hidden_size * spec.moe_intermediate_size * 4
    stats = EngineStats(forward_passes=10, kv_tokens_read=100)
    passes = torch.zeros(spec.num_layers, spec.num_experts, dtype=torch.int64)
    passes[:, :2] = 10  # two of the four experts of every layer got tokens in every pass
    dense = weight_bytes(model) - experts
    kv = 100 * model.kv_bytes_per_token()
    assert roofline_bytes(model, stats, passes) == 10 * dense + 10 * experts // 2 + kv
    assert roofline_bytes(model, stats, None) == 10 * weight_bytes(model) + kv  # dense accounting


@pytest.mark.parametrize("name, cls", [("mixtral-8x7b", "MixtralForCausalLM"), ("qwen3-30b-a3b", "Qwen3MoeForCausalLM"),
                                       ("llama-3-8b", "LlamaForCausalLM")])
def test_hf_peer_is_the_same_architecture(name, cls):
    spec = small(name)
    hf = hf_from_spec(spec, torch.bfloat16, "cpu")
    assert type(hf).__name__ == cls and next(hf.parameters()).dtype == torch.bfloat16
    back = spec_from_hf_config(hf.config, cls)
    assert {f: getattr(back, f) for f in SPEC_FIELDS} == {f: getattr(spec, f) for f in SPEC_FIELDS}


def test_hf_run_falls_back_to_the_dynamic_cache_and_records_why(monkeypatch):
    hf = hf_from_spec(TINY_SPECS["mixtral-moe"], torch.float32, "cpu")
    generate = hf.generate

    def no_static_cache(*args, **kwargs):
        if kwargs["cache_implementation"] == "static":
            raise RuntimeError("static cache cannot compile this model\nsecond line")
        return generate(*args, **kwargs)

    monkeypatch.setattr(hf, "generate", no_static_cache)
    prompts = [[5, 6, 7], [8, 9], [1, 2, 3], [4]]
    result = run_hf_best(hf, prompts, max_new_tokens=3, batch_size=2, pad_id=0, repeats=1)
    assert (result.name, result.cache, result.tokens) == ("hf-dynamic-b2", "dynamic", 4 * 3)
    assert result.static_cache_error == "RuntimeError: static cache cannot compile this model"
    assert result.experts_implementation == hf.config._experts_implementation


def test_bench_moe_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(app, ["bench", "moe", "--tokens", "1"])
    assert result.exit_code == 2 and "error: fxforge bench moe needs a CUDA device" in result.output


def linear_params(model) -> int:
    """Weights of every q/k/v/o and MLP projection (the model's body matmuls)."""
    return sum(p.numel() for name, p in model.module.named_parameters() if name.startswith("layers.") and p.dim() == 2)


def test_flop_model_counts_every_matmul_weight_and_attention_pair():
    model = tiny_model("llama-mqa-tied")  # tied: the LM head is the embedding, a matmul per logit row
    spec = model.spec
    flops = FlopModel.of(model)
    assert flops.row_flops == 2 * linear_params(model)
    assert flops.logit_row_flops == 2 * spec.vocab_size * spec.hidden_size
    assert flops.pair_flops == 4 * spec.num_heads * spec.head_dim * spec.num_layers
    assert flops.keys_seen(0, 7) == 28 and flops.keys_seen(7, 1) == 8 and flops.keys_seen(3, 2) == 4 + 5
    assert dataclasses.replace(flops, sliding_window=4).keys_seen(0, 7) == 1 + 2 + 3 + 4 + 4 + 4 + 4
    moe = tiny_model("mixtral-moe")
    experts = sum(p.numel() for n, p in moe.module.named_parameters() if n.rsplit(".", 1)[-1] in ("w_gate", "w_up", "w_down"))
    dense = sum(p.numel() for n, p in moe.module.named_parameters() if n.startswith("layers.") and p.dim() == 2)
    assert FlopModel.of(moe).row_flops == 2 * dense + 2 * experts * 2 // 4  # top-2 of 4 experts


def test_roofline_is_the_sum_over_passes_of_the_slower_ceiling():
    model = tiny_model("llama-gqa")
    flops = FlopModel(row_flops=10, logit_row_flops=100, pair_flops=1)
    weights, kv = weight_bytes(model), model.kv_bytes_per_token()
    prefill, decode = (64, 1, 2080, 64), (1, 1, 65, 65)  # a compute-heavy pass and a bytes-heavy one
    peak, bandwidth = 1000.0, float(weights)  # prefill: 2820 FLOPs = 2.82 s > 1 + 64 kv rows / weights
    costs = roofline(model, [prefill, decode], flops, peak, bandwidth)
    prefill_s = max((64 * 10 + 100 + 2080) / peak, (weights + 64 * kv) / bandwidth)
    decode_s = max((10 + 100 + 65) / peak, (weights + 65 * kv) / bandwidth)
    assert prefill_s == 2.82 and decode_s == (weights + 65 * kv) / weights  # one pass per side of the ridge
    assert costs["roofline_seconds"] == pytest.approx(prefill_s + decode_s)
    assert costs["flops"] == 64 * 10 + 100 + 2080 + 10 + 100 + 65
    assert (costs["weight_bytes"], costs["kv_bytes"]) == (2 * weights, (64 + 65) * kv)


def test_run_counts_the_timed_run_only_and_records_its_flops_and_bytes():
    model = tiny_model("llama-gqa")
    prompts = [[(7 * i + j) % 200 + 1 for j in range(7)] for i in range(3)]
    result = run_fxforge(model, prompts, 4, max_num_seqs=2, bandwidth=1e9, name="tiny", warmup=True,
                         num_decode_steps=2, repeats=2, peak_flops=1e9)
    once = Engine(model, max_num_seqs=2, max_model_len=7 + 4 + 16, num_decode_steps=2)
    once.generate(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert (result.forward_passes, result.steps) == (once.stats.forward_passes, once.stats.steps)
    assert result.profiled_seconds > 0 and result.gpu_busy_pct is None  # the re-run happened, counted nowhere
    assert result.kv_bytes == once.stats.kv_tokens_read * model.kv_bytes_per_token()
    assert result.weight_bytes == once.stats.forward_passes * weight_bytes(model)
    flops = FlopModel.of(model)
    rows, logit_rows = 3 * 7 + 3 * 3, 3 * 4  # prompts once, then the 3 fed-back tokens; a logit row per token
    pairs = 3 * (28 + 8 + 9 + 10)  # causal prefill of 7, then decodes at positions 7, 8, 9
    assert result.flops == rows * flops.row_flops + logit_rows * flops.logit_row_flops + pairs * flops.pair_flops
    assert result.roofline_pct == pytest.approx(100 * result.roofline_seconds / result.seconds)
    assert result.roofline_seconds >= max(result.flops / 1e9, (result.weight_bytes + result.kv_bytes) / 1e9)
    assert result.max_scheduled_seqs == 2 and result.preemptions == 0


def test_seats_in_kv_memory_follow_the_format_bytes():
    model = tiny_model("llama-gqa")
    import fxforge

    packed = fxforge.optimize(model, passes=[{"name": "bfp-kv", "k_format": "bfp12", "v_format": "bfp16"}])
    memory = 100 * 16 * model.kv_bytes_per_token()  # 100 pages of the float32 cache
    assert seats_in_kv_memory(model, memory, 40) == (100, 100 // 3)  # 40 tokens: 3 pages of 16
    pages, seats = seats_in_kv_memory(packed, memory, 40)
    assert pages == memory // (16 * packed.kv_bytes_per_token()) and seats == pages // 3
    assert packed.kv_bytes_per_token() < model.kv_bytes_per_token() / 4  # 4.25 + 8.25 bits vs 32 + 32


def write_tiny_checkpoint(folder):
    """A tiny HF checkpoint (random weights) whose head_dim of 32 BFP blocks divide."""
    from tests.fxforge.test_recover import write_checkpoint

    write_checkpoint(folder, num_layers=2)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_long_context_fixed_kv_memory_smoke(tmp_path):
    source = write_tiny_checkpoint(tmp_path / "hf")
    out = tmp_path / "e2e.json"
    pages = 12  # of the float32 cache (2 layers x 256 B a token, 16 tokens a page)
    kv_gib = pages * 16 * 512 / (1 << 30)
    result = CliRunner().invoke(app, ["bench", "e2e", str(source), "--workload", "long-context", "--smoke",
                                      "--prompt-len", "20", "--max-new-tokens", "3", "--kv", "bfloat16,bfp12/bfp16",
                                      "--kv-memory-gb", str(kv_gib), "--decode-steps", "2", "--repeats", "1",
                                      "--v-layout", "rows,channels", "--json-out", str(out)])
    if INTERPRETED:  # the CPU decodes with the Triton kernels in float32 here, and the one kernel that reads
        # V stored channels by tokens ("i8t") needs a bfloat16 model: the layout is refused, naming why
        assert result.exit_code != 0
        assert "v_layout='channels'" in str(result.exception) and "needs a bfloat16 model" in str(result.exception)
        return
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    runs = {r["kv_format"] + ("+vt" if r["v_layout"] == "channels" else ""): r for r in results["runs"]}
    # V stored channels by tokens: packed V only (bf16's V has no such row)
    assert sorted(runs) == ["bfloat16", "bfp12/bfp16", "bfp12/bfp16+vt"] and results["workload"] == "long-context"
    assert runs["bfp12/bfp16+vt"]["name"].startswith("fxforge-bfp12/bfp16+vt-")
    assert runs["bfp12/bfp16+vt"]["tokens"] == runs["bfp12/bfp16"]["tokens"]
    assert runs["bfloat16"]["seats_that_fit"] == pages // 3  # 20 + 3 + 16 tokens: 3 pages each
    packed = runs["bfp12/bfp16"]
    assert packed["seats_that_fit"] == (pages * 16 * 512 // packed["kv_bytes_per_token"]) // 16 // 3
    assert results["prompts"] == packed["seats_that_fit"]  # as many sequences as the densest format holds
    for r in runs.values():
        assert r["kv_pool_bytes"] <= pages * 16 * 512 and r["preemptions"] == 0
        assert r["max_scheduled_seqs"] == min(r["seats_that_fit"], results["prompts"])
        assert r["tokens"] == 3 * results["prompts"] and r["flops"] > 0 and r["weight_bytes"] > 0 and r["kv_bytes"] > 0
    summary = results["fixed_kv_memory"]["bfp12/bfp16"]
    assert summary["seats_vs_bfloat16"] == packed["seats_that_fit"] / runs["bfloat16"]["seats_that_fit"] > 2.5
    assert sorted(results["fixed_kv_memory"]) == ["bfloat16", "bfp12/bfp16", "bfp12/bfp16+vt"]


def test_overlapped_windows_run_as_peers_smoke(tmp_path):
    """--overlap-windows off,on: each format read window by window and with the next window launched
    first, as peers in one run (rows FORMAT+ow), the same tokens, and windows really chained."""
    source = write_tiny_checkpoint(tmp_path / "hf")
    out = tmp_path / "e2e.json"
    result = CliRunner().invoke(app, ["bench", "e2e", str(source), "--smoke", "--random-init", "--prompts", "4",
                                      "--prompt-len", "10", "--max-new-tokens", "9", "--kv", "bfp12/bfp16", "--decode-steps", "3",
                                      "--repeats", "1", "--hf-batch", "", "--overlap-windows", "off,on",
                                      "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    runs = {r["name"]: r for r in json.loads(out.read_text())["runs"]}
    assert sorted(runs) == ["fxforge-bfp12/bfp16+ow-s256-k3", "fxforge-bfp12/bfp16-s256-k3"], sorted(runs)
    off, on = runs["fxforge-bfp12/bfp16-s256-k3"], runs["fxforge-bfp12/bfp16+ow-s256-k3"]
    assert (off["overlap_windows"], on["overlap_windows"]) == (False, True)
    assert on["tokens"] == off["tokens"] == 4 * 9
    assert on["chained_windows"] > 0 == off["chained_windows"]
    # the chained windows' passes are counted as the others are: the same work, the same counts
    for count in ("forward_passes", "flops", "weight_bytes", "kv_bytes"):
        assert on[count] == off[count] > 0, count


@pytest.mark.parametrize("args, message", [
    (["--prompt-len", "0", "--kv-memory-gb", "1"], "--kv-memory-gb needs --prompt-len"),
    (["--kv-memory-gb", "-1", "--prompt-len", "8"], "--kv-memory-gb must be > 0"),
    (["--workload", "huge"], "--workload 'huge' is not valid"),
    (["--kv", "bfp13"], "--kv 'bfp13': unknown KV format"),
    (["--kv-memory-gb", "1e-9", "--prompt-len", "8", "--smoke"], "not one sequence of 264 tokens fits"),
    (["--v-layout", "rows,cols"], "--v-layout 'rows,cols': expected auto, rows, channels"),
    (["--overlap-windows", "yes"], "--overlap-windows 'yes': expected auto, off, on or off,on"),
], ids=["no-prompt-len", "negative-memory", "workload", "format", "nothing-fits", "v-layout", "overlap"])
def test_bench_e2e_bad_input_exits_2_and_writes_nothing(tmp_path, args, message):
    source = write_tiny_checkpoint(tmp_path / "hf")
    out = tmp_path / "e2e.json"
    result = CliRunner().invoke(app, ["bench", "e2e", str(source), "--random-init", "--json-out", str(out), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


def test_bench_e2e_needs_cuda_or_smoke(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(app, ["bench", "e2e", "--prompts", "1"])
    assert result.exit_code == 2 and "needs a CUDA device (use --smoke" in result.output


def test_bench_attention_checks_kernels_and_cuda():
    result = CliRunner().invoke(app, ["bench", "attention", "--kernels", "tiles,fast"])
    assert result.exit_code == 2 and "--kernels 'tiles,fast' is not valid" in result.output
    result = CliRunner().invoke(app, ["bench", "attention", "--contexts", "224,448", "--table-tokens", "300"])
    assert result.exit_code == 2 and "--table-tokens 300 is shorter than the longest of --contexts 224,448; " \
        "give at least 448" in " ".join(result.output.split())
    if not torch.cuda.is_available():
        result = CliRunner().invoke(app, ["bench", "attention", "--kernels", "blocks"])
        assert result.exit_code == 2 and "needs a CUDA device" in result.output


def test_fused_step_adds_a_fused_row_next_to_each_format(tmp_path):
    """--fused-step: each KV format runs twice in one bench, lowered plainly and with the step fusions
    (FORMAT+fused), so the fused row's peer is measured in the same run."""
    source = write_tiny_checkpoint(tmp_path / "hf")
    out = tmp_path / "e2e.json"
    result = CliRunner().invoke(app, ["bench", "e2e", str(source), "--smoke", "--random-init", "--fused-step",
                                      "--prompts", "2", "--prompt-len", "12", "--max-new-tokens", "3", "--kv", "bfloat16",
                                      "--decode-steps", "2", "--repeats", "1", "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    runs = {r["kv_format"]: r for r in json.loads(out.read_text())["runs"]}
    assert sorted(runs) == ["bfloat16", "bfloat16+fused"]
    assert runs["bfloat16"]["tokens"] == runs["bfloat16+fused"]["tokens"] == 6
    assert runs["bfloat16"]["flops"] == runs["bfloat16+fused"]["flops"]  # the same work, fewer launches
