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
    engine = Engine(model, num_pages=64, page_size=4)
    lengths = [7, 2, 4]
    outs = list(engine.stream([[1], [2], [3]], [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]))
    assert [o.request_id for o in outs] == [1, 2, 0]
    assert engine.stats.generated_tokens == sum(lengths)
