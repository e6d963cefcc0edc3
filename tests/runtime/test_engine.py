import dataclasses
import random

import pytest
import torch

from fxforge.ir.model import Model
from fxforge.runtime.config import EngineConfig
from fxforge.runtime.engine import Engine
from fxforge.runtime.sequence import SamplingParams
from tests.conftest import TINY_SPECS, tiny_model


def _prompts(n, seed, max_len=40, vocab=257):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


def test_engine_greedy_matches_reference_generate():
    model = tiny_model("llama-gqa")
    prompts = _prompts(6, seed=1)
    expected = model.generate(prompts, max_new_tokens=12)
    outputs = Engine(model, num_pages=64, page_size=4, max_num_batched_tokens=32).generate(
        prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in outputs] == expected


def test_engine_moe_and_chunked_prefill_match_reference():
    model = tiny_model("mixtral-moe")
    prompts = _prompts(4, seed=2, max_len=60)
    expected = model.generate(prompts, max_new_tokens=8)
    engine = Engine(model, num_pages=128, page_size=8, max_num_batched_tokens=16)  # forces prefill chunks
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert [o.token_ids for o in outputs] == expected


def test_keywords_build_one_config_the_model_completes():
    """Settings given by keyword, the model's defaults for the rest; scheduler, pool and runner all
    read that one config."""
    spec = dataclasses.replace(TINY_SPECS["llama-gqa"], eos_token_ids=(7, 9))
    model = Model.from_state_dict(spec, None, dtype=torch.float32, seed=0)
    engine = Engine(model, page_size=8, max_num_seqs=4, max_model_len=None, num_pages=None, chat=False)
    expected = EngineConfig(max_num_seqs=4, page_size=8, max_model_len=512, num_pages=4 * 512 // 8,
                            use_cuda_graphs=False, eos_token_id=7, chat=False)
    assert engine.config == expected
    assert engine.scheduler.config is engine.scheduler.pool.config is engine.runner.config is engine.config
    assert engine.scheduler.pool.bytes_per_token == model.kv_bytes_per_token()
    assert engine.runner.kv_cache[0].shape[0] == expected.num_pages + 1  # one scratch page
    assert Engine(model, eos_token_id=None).config.eos_token_id is None  # an explicit None is no EOS


def test_engine_from_one_config():
    model = tiny_model("llama-gqa")
    config = EngineConfig(num_pages=32, page_size=4, max_model_len=64, max_num_batched_tokens=16, num_decode_steps=3)
    engine = Engine(model, config=config)
    assert engine.config is config and engine.scheduler.pool.num_pages == 32
    prompts = _prompts(5, seed=6)
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=9, ignore_eos=True))
    assert [o.token_ids for o in outputs] == model.generate(prompts, max_new_tokens=9)
    with pytest.raises(TypeError, match=r"either config or settings.*\['page_size'\]"):
        Engine(model, config=config, page_size=4)
    with pytest.raises(TypeError, match="page_sise"):
        Engine(model, page_sise=4)
    with pytest.raises(ValueError, match="EngineConfig.num_decode_steps must be an int >= 1, got 0"):
        Engine(model, num_decode_steps=0)


def test_runner_output_has_one_token_per_step_of_each_entry():
    """execute() samples on the device: one token per sampling entry, and in a window one per step of
    each entry, cut at the entry's own num_steps; the tokens are the model's greedy ones."""
    model = tiny_model("llama-gqa")
    engine = Engine(model, num_pages=64, page_size=4, num_decode_steps=5)
    sched, runner = engine.scheduler, engine.runner
    short = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=3, ignore_eos=True))
    long = engine.add_request([4, 5], SamplingParams(max_new_tokens=20, ignore_eos=True))
    once = engine.add_request(list(range(10, 40)), SamplingParams(max_new_tokens=1, ignore_eos=True))
    out = sched.schedule()
    result = runner.execute(out)
    assert len(result.sampled_token_ids) == 3 and all(len(t) == 1 for t in result.sampled_token_ids)
    sched.update(out, result)
    out = sched.schedule()
    assert out.num_steps == 5 and [s.num_steps for s in out.scheduled] == [2, 5]
    result = runner.execute(out)
    assert [len(t) for t in result.sampled_token_ids] == [2, 5]
    sched.update(out, result)
    assert short.output_token_ids == model.generate([[1, 2, 3]], max_new_tokens=3)[0]
    assert long.output_token_ids == model.generate([[4, 5]], max_new_tokens=6)[0]
    assert once.output_token_ids == model.generate([list(range(10, 40))], max_new_tokens=1)[0]


def test_runner_keeps_a_generator_per_seeded_sequence_until_released():
    engine = Engine(tiny_model("llama-gqa"), num_pages=64, page_size=4, num_decode_steps=1)
    seeded = engine.add_request([1, 2], SamplingParams(temperature=1.0, seed=7, max_new_tokens=2, ignore_eos=True))
    engine.add_request([3], SamplingParams(temperature=1.0, max_new_tokens=4, ignore_eos=True))
    engine.add_request([4], SamplingParams(seed=5, max_new_tokens=4, ignore_eos=True))  # greedy: draws nothing
    assert engine.runner.generators == {}  # made on first use
    engine.step()
    assert list(engine.runner.generators) == [seeded.seq_id]
    state = engine.runner.generators[seeded.seq_id].get_state()
    assert not torch.equal(state, torch.Generator().manual_seed(7).get_state())  # it drew the first token
    assert engine.step() == [seeded] and engine.runner.generators == {}


def test_two_thousand_requests_under_memory_pressure():
    """Every request completes, equal to an unpressured run, with preemptions, and all pages come back."""
    model = tiny_model("llama-mqa-tied")
    rng = random.Random(5)
    prompts = _prompts(2000, seed=4, max_len=48)
    params = [SamplingParams(max_new_tokens=rng.randint(1, 12), ignore_eos=True) for _ in prompts]
    relaxed = Engine(model, num_pages=8192, page_size=8, max_num_seqs=256, max_num_batched_tokens=2048)
    calm = [o.token_ids for o in relaxed.generate(prompts, params)]
    tight = Engine(model, num_pages=40, page_size=8, max_num_seqs=256, max_num_batched_tokens=2048)
    pressured = tight.generate(prompts, params)
    assert tight.stats.preemptions > 0, "the pool was not small enough to force preemption"
    assert [o.token_ids for o in pressured] == calm
    assert all(len(o.token_ids) == p.max_new_tokens for o, p in zip(pressured, params))
    assert tight.scheduler.pool.num_free_pages == 40


def test_bad_requests_rejected_without_disturbing_inflight():
    model = tiny_model("llama-gqa")
    engine = Engine(model, num_pages=64, page_size=4, max_model_len=64)
    good = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=5, ignore_eos=True))
    engine.step()
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError):
        engine.add_request(list(range(100)), SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request([1], SamplingParams(temperature=-1.0))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([1, 99999], SamplingParams())
    while engine.scheduler.has_unfinished():
        engine.step()
    assert good.output_token_ids == model.generate([[1, 2, 3]], max_new_tokens=5)[0]


def test_seeded_sampling_is_reproducible_across_batches():
    model = tiny_model("llama-gqa")
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=123, max_new_tokens=10, ignore_eos=True)
    alone = Engine(model, num_pages=64, page_size=4).generate([[5, 6, 7]], params)[0].token_ids
    others = [SamplingParams(temperature=1.0, max_new_tokens=10, ignore_eos=True)] * 3
    batched = Engine(model, num_pages=64, page_size=4).generate([[9], [5, 6, 7], [1, 2]], [others[0], params, others[1]])
    assert batched[1].token_ids == alone


def test_stream_yields_in_finishing_order():
    model = tiny_model("llama-gqa")
    engine = Engine(model, num_pages=64, page_size=4, num_decode_steps=1)  # a window would finish all three at once
    lengths = [7, 2, 4]
    outs = list(engine.stream([[1], [2], [3]], [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]))
    assert [o.request_id for o in outs] == [1, 2, 0]
    assert engine.stats.generated_tokens == sum(lengths)


def test_stats_split_wall_time_by_step_kind():
    """prefill_steps counts the steps that carried a prefill chunk (prompts of 30 tokens, 16-token
    budget: each takes two); the step wall times by kind are positive and fit in the run's seconds."""
    model = tiny_model("llama-gqa")
    engine = Engine(model, num_pages=64, page_size=4, max_num_seqs=1, max_num_batched_tokens=16)
    engine.generate([[5] * 30, [6] * 30], SamplingParams(max_new_tokens=5, ignore_eos=True))
    stats = engine.stats
    assert stats.prefill_steps == 4 and stats.steps > stats.prefill_steps
    assert stats.prefill_step_seconds > 0 and stats.decode_step_seconds > 0
    assert stats.prefill_step_seconds + stats.decode_step_seconds <= stats.seconds


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen3-qknorm"])
def test_decode_windows_match_single_steps(kind):
    """Windows feed tokens back on the device; outputs (greedy with stops, and seeded sampling) and
    the KV-token count are those of single steps, and windows really ran."""
    model = tiny_model(kind)
    rng = random.Random(8)
    prompts = _prompts(40, seed=9)
    params = [SamplingParams(max_new_tokens=rng.randint(1, 30), stop_token_ids=tuple(rng.sample(range(257), 10)))
              for _ in range(30)]
    params += [SamplingParams(temperature=0.9, top_k=50, seed=i, max_new_tokens=rng.randint(1, 30), ignore_eos=True)
               for i in range(10)]
    runs = {}
    for k in (1, 7):
        engine = Engine(model, num_pages=256, page_size=4, max_num_seqs=12, num_decode_steps=k)
        runs[k] = ([(o.token_ids, o.finish_reason) for o in engine.generate(prompts, params)], engine.stats)
    assert runs[7][0] == runs[1][0]
    assert any(reason == "stop" for _, reason in runs[1][0]), "no request met its stop token"
    single, window = runs[1][1], runs[7][1]
    assert window.forward_passes > window.steps and single.forward_passes == single.steps
    assert window.kv_tokens_read == single.kv_tokens_read and window.generated_tokens == single.generated_tokens


@pytest.mark.parametrize("kind", ["llama-gqa", "mixtral-moe"])
def test_overlapped_windows_give_the_tokens_of_windows_read_one_by_one(kind):
    """overlap_windows launches each decode window before the previous one's tokens are read
    (Scheduler.chain): the same outputs and finish reasons (EOS, stop tokens, lengths, seeded
    sampling, more requests than seats), windows really chained, also past sequences that stop by
    length (their rows dropped from the chained window), every page back in the pool."""
    model = tiny_model(kind)
    rng = random.Random(5)
    prompts = _prompts(16, seed=6)
    params = [SamplingParams(max_new_tokens=rng.randint(1, 12)) for _ in range(4)]  # short: seats free up early
    params += [SamplingParams(max_new_tokens=rng.randint(40, 80), stop_token_ids=tuple(rng.sample(range(257), 2)))
               for _ in range(8)]
    params += [SamplingParams(temperature=0.9, top_k=50, seed=i, max_new_tokens=rng.randint(40, 80)) for i in range(4)]
    settings = dict(num_pages=512, page_size=4, max_num_seqs=12, num_decode_steps=5, eos_token_id=11)
    runs, tables, dropped = {}, [], []
    for overlap in (False, True):
        engine = Engine(model, overlap_windows=overlap, **settings)
        launch, keep = engine.runner.launch_chained, engine.runner._keep_rows
        engine.runner.launch_chained = lambda out, prev: tables.append(prev.batch.page_table.shape) or launch(out, prev)
        engine.runner._keep_rows = (lambda prev, kept, table: dropped.append(prev.n - len(kept))
                                    or keep(prev, kept, table))
        runs[overlap] = ([(o.token_ids, o.finish_reason) for o in engine.generate(prompts, params)], engine.stats)
        assert engine.scheduler.pool.num_free_pages == 512 and engine._ahead is None
    assert runs[True][0] == runs[False][0]
    reasons = {reason for _, reason in runs[False][0]}
    assert {"stop", "length"} <= reasons, reasons
    # windows chained, over sequences that needed pages chain() added (the page table grew on the way)
    assert runs[True][1].chained_windows >= 5 and runs[False][1].chained_windows == 0
    assert len({shape[1] for shape in tables}) > 1, tables
    assert len(dropped) >= 3 and min(dropped) >= 1, dropped  # chained past sequences that stopped
    assert runs[True][1].generated_tokens == runs[False][1].generated_tokens


def test_overlap_windows_is_checked():
    with pytest.raises(ValueError, match="EngineConfig.overlap_windows must be a bool, got 'yes'"):
        EngineConfig(overlap_windows="yes")


def test_overlapped_windows_are_the_default_on_cuda_for_the_plain_runner(monkeypatch):
    """Engine's settings leave overlap_windows to the model: on for CUDA where the plain ModelRunner serves,
    off on a CPU (every launch runs to its end there), for a depth-wise loop and for a skip schedule; an
    explicit setting wins. (The device is faked: resolution reads it and the graph only.)"""
    import fxforge
    from fxforge.ir.model import Model
    from fxforge.passes import SkipDecode
    from fxforge.runtime.engine import config_for_model, default_overlap_windows

    model = tiny_model("llama-gqa")
    assert not default_overlap_windows(model) and not Engine(model, num_pages=16, page_size=4).config.overlap_windows
    assert Engine(model, num_pages=16, page_size=4, overlap_windows=True).config.overlap_windows
    skipped = fxforge.optimize(model, passes=[SkipDecode(min_layers=1, max_layers=1, warmup_layers=1, span=8)])
    monkeypatch.setattr(Model, "device", property(lambda self: torch.device("cuda")))
    assert default_overlap_windows(model) and not default_overlap_windows(model, loop_policy="depthwise")
    assert not default_overlap_windows(skipped) and default_overlap_windows(skipped, skip_policy="full")
    settings = dict(num_pages=16, use_cuda_graphs=False)
    assert config_for_model(model, **settings).overlap_windows
    assert not config_for_model(model, overlap_windows=False, **settings).overlap_windows
    assert not config_for_model(skipped, **settings).overlap_windows
    assert config_for_model(skipped, skip_policy="full", **settings).overlap_windows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("passes", [[], [{"name": "bfp-kv", "k_format": "bfp16", "v_format": "bfp16", "block": 16}]],
                         ids=["float32-kv", "bfp16-kv"])
def test_cuda_graph_windows_match_single_steps_and_reference(passes):
    """On the GPU: Triton kernels, CUDA graphs and decode windows give the single-step outputs; with a
    float32 cache also the model's reference greedy decoding."""
    pytest.importorskip("triton")
    import fxforge

    model = tiny_model("llama-gqa")
    lowered = fxforge.optimize(model, passes=passes + [{"name": "lower", "backend": "triton"}])
    prompts = _prompts(24, seed=3)
    reference = model.generate(prompts, max_new_tokens=20)  # before .cuda(), which moves the weights it shares
    lowered.module.cuda()
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    runs = {}
    for k in (1, 6):
        engine = Engine(lowered, num_pages=512, page_size=16, max_num_seqs=16, num_decode_steps=k)
        assert engine.runner.graphs, engine.runner.graph_error
        runs[k] = [o.token_ids for o in engine.generate(prompts, params)]
        assert engine.scheduler.pool.num_free_pages == 512
    assert runs[6] == runs[1]
    if not passes:
        assert runs[1] == reference


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_overlapped_windows_replay_cuda_graphs_with_the_same_tokens():
    """On the GPU (Triton kernels, CUDA graphs, a packed cache): chained windows continue on the
    device from the previous window's inputs, with the pages chain() added; same tokens and finish
    reasons as reading each window before the next (EOS is a token the CPU run of this model samples
    mid-sequence in 5 of the 16, so some sequences stop inside a chained window). With ragged lengths
    the rows of sequences that stop by length leave a chained window: the static inputs' rows move up."""
    pytest.importorskip("triton")
    import fxforge

    lowered = fxforge.optimize(tiny_model("llama-gqa"), passes=["bfp-kv", {"name": "lower", "backend": "triton"}])
    lowered.module.cuda()
    prompts = _prompts(16, seed=7)  # one seat each
    for params in (SamplingParams(max_new_tokens=40),  # one length: windows chain until EOS or the end
                   [SamplingParams(max_new_tokens=10 + 3 * i) for i in range(16)]):  # one stops every window or so
        runs, dropped = {}, []
        for overlap in (False, True):
            engine = Engine(lowered, num_pages=512, page_size=16, max_num_seqs=16, num_decode_steps=6,
                            eos_token_id=101, overlap_windows=overlap)
            assert engine.runner.graphs, engine.runner.graph_error
            keep = engine.runner._keep_rows
            engine.runner._keep_rows = (lambda prev, kept, table: dropped.append(prev.n - len(kept))
                                    or keep(prev, kept, table))
            runs[overlap] = [(o.token_ids, o.finish_reason) for o in engine.generate(prompts, params)]
            assert engine.scheduler.pool.num_free_pages == 512
        assert runs[True] == runs[False]
        assert engine.stats.chained_windows > 0
        if isinstance(params, list):
            assert dropped, "ragged lengths should drop rows from a chained window"


def test_chained_windows_over_static_graph_inputs_on_cpu():
    """The CUDA-graph path of chained windows, on a CPU: each bucket's "graph" replays the model over
    its static inputs into its logits buffer, as a captured graph would. Ragged lengths drop rows from
    chained windows (the static rows move up, the rest become padding): the tokens of windows read
    one by one without graphs."""
    model = tiny_model("llama-gqa")
    prompts = _prompts(12, seed=9)
    params = [SamplingParams(max_new_tokens=6 + 4 * i, stop_token_ids=(11,)) for i in range(12)]
    settings = dict(num_pages=256, page_size=4, max_num_seqs=12, num_decode_steps=5)
    plain = Engine(model, **settings)
    expected = [(o.token_ids, o.finish_reason) for o in plain.generate(prompts, params)]

    class Replay:  # stands in for torch.cuda.CUDAGraph
        def __init__(self, runner, static, logits):
            self.runner, self.static, self.logits = runner, static, logits

        def replay(self):
            self.logits.copy_(self.runner.model.forward(self.static, self.runner.kv_cache))

    engine = Engine(model, overlap_windows=True, **settings)
    runner, dropped = engine.runner, []
    with torch.inference_mode():
        for size in runner._buckets():
            static = runner._static_inputs(size)
            logits = runner.model.forward(static, runner.kv_cache).clone()
            runner.graphs[size] = (Replay(runner, static, logits), static, logits)
    keep = runner._keep_rows
    runner._keep_rows = (lambda prev, kept, table: dropped.append((prev.graph is not None, prev.n - len(kept)))
                         or keep(prev, kept, table))
    assert [(o.token_ids, o.finish_reason) for o in engine.generate(prompts, params)] == expected
    assert engine.stats.chained_windows >= 5 and len(dropped) >= 3 and all(graph for graph, _ in dropped), dropped
    assert engine.scheduler.pool.num_free_pages == 256


@pytest.mark.parametrize("max_num_seqs,buckets", [(15, [1, 2, 4, 8, 15]), (39, [1, 2, 4, 8, 16, 24, 32, 39]),
                                                   (256, [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256])])
def test_decode_graph_buckets_end_at_max_num_seqs(max_num_seqs, buckets):
    """A full batch has a graph of its own size (the KV memory can set max_num_seqs to any number)."""
    engine = Engine(tiny_model("llama-gqa"), num_pages=64, page_size=4, max_num_seqs=max_num_seqs)
    assert engine.runner._buckets() == buckets


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_full_batch_of_an_odd_size_decodes_by_graph_replay(monkeypatch):
    """max_num_seqs = 5 (no GRAPH_BATCH_SIZES entry): once all five decode, no step runs eagerly."""
    pytest.importorskip("triton")
    import fxforge

    lowered = fxforge.optimize(tiny_model("llama-gqa"), passes=[{"name": "lower", "backend": "triton"}])
    lowered.module.cuda()
    engine = Engine(lowered, num_pages=256, page_size=16, max_num_seqs=5, max_num_batched_tokens=4096,
                    num_decode_steps=4)
    assert 5 in engine.runner.graphs, engine.runner.graph_error
    eager = []
    run_eagerly = engine.runner._eager
    monkeypatch.setattr(engine.runner, "_eager", lambda *args: eager.append(1) or run_eagerly(*args))
    engine.generate(_prompts(5, seed=4), SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert len(eager) == engine.stats.prefill_steps == 1  # the one prefill step; every decode step replayed


def test_packed_v_stored_channels_by_tokens_gives_the_same_tokens():
    """EngineConfig.v_layout="channels" keeps every layer's packed V channels by tokens (the layout the
    "i8t" decode kernel reads): the same greedy tokens as rows; a V that is not packed is refused."""
    import fxforge
    from fxforge.kernels.kv_cache import v_channels_by_tokens

    model = fxforge.optimize(tiny_model("llama-gqa"), passes=["bfp-kv", "lower"])
    prompts, params = _prompts(5, seed=8), SamplingParams(max_new_tokens=8, ignore_eos=True)
    settings = dict(num_pages=64, page_size=4, max_num_batched_tokens=32)
    rows, channels = Engine(model, **settings), Engine(model, v_layout="channels", **settings)
    assert all(v_channels_by_tokens(t) for t in channels.runner.kv_cache[2::4] + channels.runner.kv_cache[3::4])
    assert not any(v_channels_by_tokens(t) for t in rows.runner.kv_cache)
    assert ([o.token_ids for o in channels.generate(prompts, params)]
            == [o.token_ids for o in rows.generate(prompts, params)])
    with pytest.raises(ValueError, match="v_layout='channels' needs a packed V format"):
        Engine(tiny_model("llama-gqa"), v_layout="channels", **settings)
    with pytest.raises(ValueError, match=r"EngineConfig.v_layout must be one of \('auto', 'rows', 'channels'\)"):
        EngineConfig(v_layout="columns")


def test_auto_v_layout_is_channels_only_where_i8t_was_tuned_for_every_layer(monkeypatch):
    """EngineConfig.v_layout="auto" (the default) resolves to "channels" only on CUDA with the Triton
    kernels, where i8t runs every layer's shape and this device's tuned configs hold an i8t entry for
    it; rows everywhere else. (Resolution reads formats and config files only, so it runs on CPU.)"""
    import fxforge
    from fxforge.kernels import paged_attention as pa

    assert EngineConfig().v_layout == "auto"
    lowered = [{"name": "lower", "backend": "triton"}]
    bfp16 = fxforge.optimize(tiny_model("llama-gqa", dtype=torch.bfloat16),
                             passes=[{"name": "bfp-kv", "k_format": "bfp16"}, *lowered])
    key = pa.decode_config_key(pa.parse_kv_format("bfp16_32"), pa.parse_kv_format("bfp16_32"), 32, 2,
                               torch.bfloat16, "channels")
    tuned = {key: pa.DecodeConfig(kernel="i8t", num_warps=1)}
    monkeypatch.setattr(pa, "_device_name", lambda device: "test")
    monkeypatch.setattr(pa, "tuned_decode_configs", lambda name: tuned)
    cuda = torch.device("cuda")
    assert bfp16.resolve_v_layout("auto", cuda) == "channels"
    assert bfp16.resolve_v_layout("rows", cuda) == "rows" and bfp16.resolve_v_layout("auto", "cpu") == "rows"
    engine = Engine(bfp16, num_pages=16, page_size=4)  # on CPU: rows
    assert engine.runner.v_layout == "rows"
    assert bfp16.new_kv_cache(4, 4, v_layout="auto")[2].is_contiguous()  # Model.new_kv_cache resolves it too
    bfp12 = fxforge.optimize(tiny_model("llama-gqa", dtype=torch.bfloat16), passes=["bfp-kv", *lowered])
    tuned[key.replace("K=bfp16_32", "K=bfp12_32")] = tuned[key]
    assert bfp12.resolve_v_layout("auto", cuda) == "rows"  # i8t cannot run BFP12 keys at head_dim 32
    reference = fxforge.optimize(tiny_model("llama-gqa", dtype=torch.bfloat16),
                                 passes=[{"name": "bfp-kv", "k_format": "bfp16"}, {"name": "lower", "backend": "torch"}])
    assert reference.resolve_v_layout("auto", cuda) == "rows"  # the references read rows as fast
    dense = fxforge.optimize(tiny_model("llama-gqa", dtype=torch.bfloat16), passes=lowered)
    assert dense.resolve_v_layout("auto", cuda) == "rows"
    del tuned[key]
    assert bfp16.resolve_v_layout("auto", cuda) == "rows"  # not tuned on this device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_v_layout_on_this_gpu_follows_its_tuned_channels_entries():
    """On a real GPU the default engine keeps V channels by tokens exactly where this device's tuned
    file holds i8t entries: a d128, 4-query-heads-per-KV-head model in BFP12-K/BFP16-V (Llama-3-8B's
    attention shape; the H200's file has it) decodes by i8t with the default config, and generates."""
    import fxforge
    from fxforge.ir.spec import ModelSpec
    from fxforge.kernels import paged_attention as pa
    from fxforge.kernels.kv_cache import v_channels_by_tokens

    spec = ModelSpec(family="llama", vocab_size=257, hidden_size=512, intermediate_size=256, num_layers=2,
                     num_heads=4, num_kv_heads=1, head_dim=128, rope_theta=10000.0, max_position_embeddings=512)
    base = Model.from_state_dict(spec, None, dtype=torch.bfloat16, device="cuda")
    model = fxforge.optimize(base, passes=["bfp-kv", {"name": "lower", "backend": "triton"}])
    key = pa.decode_config_key(pa.parse_kv_format("bfp12_32"), pa.parse_kv_format("bfp16_32"), 128, 4,
                               torch.bfloat16, "channels")
    tuned = key in pa.tuned_decode_configs(pa._device_name(torch.device("cuda")))
    engine = Engine(model, num_pages=64, page_size=16, max_num_seqs=4)
    assert engine.runner.v_layout == ("channels" if tuned else "rows")
    assert v_channels_by_tokens(engine.runner.kv_cache[2]) == tuned
    outputs = engine.generate(_prompts(4, seed=3), SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert all(len(o.token_ids) == 8 for o in outputs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_v_stored_channels_by_tokens_decodes_with_i8t_on_cuda(monkeypatch):
    """On CUDA with the Triton kernels and bf16, the channels layout decodes by "i8t" (in CUDA graphs)
    and generates what rows do, but for near-ties (i8t weighs V in int8 limbs of P, i8k in bf16 P).
    A shape i8t cannot run (BFP12 keys at head_dim 32: its int8 dot would contract over 16) is refused
    when the engine is built, not at the first decode step."""
    pytest.importorskip("triton")
    import fxforge
    from fxforge.kernels import paged_attention as pa

    settings = dict(num_pages=256, page_size=16, max_num_seqs=8, max_num_batched_tokens=4096, num_decode_steps=4)
    bfp12 = fxforge.optimize(tiny_model("llama-gqa", dtype=torch.bfloat16),
                             passes=["bfp-kv", {"name": "lower", "backend": "triton"}])
    bfp12.module.cuda()
    refused = r"layer 0 \(K bfp12_32, V bfp16_32, head_dim 32.*cannot be decoded by the 'i8t'"
    with pytest.raises(ValueError, match=refused):
        Engine(bfp12, v_layout="channels", **settings)
    model = fxforge.optimize(tiny_model("llama-gqa", dtype=torch.bfloat16),
                             passes=[{"name": "bfp-kv", "k_format": "bfp16"}, {"name": "lower", "backend": "triton"}])
    model.module.cuda()
    prompts, params = _prompts(8, seed=9), SamplingParams(max_new_tokens=16, ignore_eos=True)
    expected = [o.token_ids for o in Engine(model, **settings).generate(prompts, params)]
    kernels = []
    real = pa._decode_constexprs
    monkeypatch.setattr(pa, "_decode_constexprs", lambda config, *a: kernels.append(config.kernel) or real(config, *a))
    engine = Engine(model, v_layout="channels", **settings)
    got = [o.token_ids for o in engine.generate(prompts, params)]
    assert kernels and set(kernels) == {"i8t"}, kernels
    same = sum(a == b for x, y in zip(got, expected) for a, b in zip(x, y))
    assert same >= 0.9 * sum(map(len, expected)), (got, expected)


@pytest.mark.parametrize("kind", ["llama-gqa", "mixtral-moe"])
def test_eager_steps_skip_torch_library_dispatch_with_the_same_tokens(kind, monkeypatch):
    """Eager steps run the lowered graph with its custom ops called directly (ir/ops.py DIRECT): every
    op but the MoE one goes through a direct function, none through torch.library, and the greedy
    tokens equal those of the dispatching run (direct_dispatch=False)."""
    import fxforge
    from fxforge.ir import ops

    model = fxforge.optimize(tiny_model(kind), passes=["bfp-kv", "lower"])
    prompts = _prompts(5, seed=3)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    dispatched = Engine(model, num_pages=64, page_size=4, max_num_batched_tokens=32, direct_dispatch=False)
    expected = [o.token_ids for o in dispatched.generate(prompts, params)]
    calls = []
    real = ops.implementation
    monkeypatch.setattr(ops, "implementation", lambda name, impl, t: calls.append(name) or real(name, impl, t))
    engine = Engine(model, num_pages=64, page_size=4, max_num_batched_tokens=32)
    direct = engine.runner._eager
    targets = {n.target for n in direct.graph.nodes if n.op == "call_function"}
    assert not targets & (set(ops.OP_NAMES) - {ops.MOE}) and targets & set(ops.DIRECT.values())
    assert [o.token_ids for o in engine.generate(prompts, params)] == expected
    assert {"rmsnorm", "attention", "rope", "add_rmsnorm", "rope_kv_write"} <= set(calls)  # lower's fused defaults
