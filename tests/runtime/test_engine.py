import random

import pytest
import torch

from fxforge.runtime.engine import Engine
from fxforge.runtime.sequence import SamplingParams
from tests.conftest import tiny_model


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
    assert tight.scheduler.block_manager.num_free_pages == 40


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
    lowered.module.cuda()
    prompts = _prompts(24, seed=3)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    runs = {}
    for k in (1, 6):
        engine = Engine(lowered, num_pages=512, page_size=16, max_num_seqs=16, num_decode_steps=k)
        assert engine.runner.graphs, engine.runner.graph_error
        runs[k] = [o.token_ids for o in engine.generate(prompts, params)]
        assert engine.scheduler.block_manager.num_free_pages == 512
    assert runs[6] == runs[1]
    if not passes:
        assert runs[1] == model.generate(prompts, max_new_tokens=20)
