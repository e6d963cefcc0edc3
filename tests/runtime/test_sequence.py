import math

import pytest

from fxforge.runtime.sequence import SamplingParams, Sequence, SequenceStatus


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("temperature", "hot"),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("max_new_tokens", 0),
        ("max_new_tokens", True),
        ("seed", -3),
        ("seed", 1.0),
        ("stop_token_ids", (1, -2)),
        ("stop_token_ids", "12"),
        ("ignore_eos", 1),
    ],
    ids=lambda v: repr(v),
)
def test_sampling_params_reject_names_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    message = str(err.value)
    assert f"SamplingParams.{field}" in message
    assert repr(value) in message


def test_sampling_params_accepts_edges_and_stores_stop_ids_as_tuple():
    p = SamplingParams(temperature=0, top_k=0, top_p=1.0, max_new_tokens=1, seed=0, stop_token_ids=[5, 7])
    assert p.stop_token_ids == (5, 7) and p.is_greedy
    assert not SamplingParams(temperature=0.5).is_greedy
    with pytest.raises(AttributeError):
        p.temperature = 1.0  # frozen


def test_sequence_ids_are_unique_and_counts_track_tokens():
    a, b = Sequence([1, 2, 3]), Sequence([4])
    assert a.seq_id != b.seq_id
    assert (a.num_tokens, a.num_prompt_tokens, a.num_output_tokens, a.num_uncomputed) == (3, 3, 0, 3)
    assert a.status is SequenceStatus.WAITING and a.page_ids == [] and a.finish_reason is None
    a.num_computed_tokens = 3
    a.append_token(9)
    assert a.all_token_ids == [1, 2, 3, 9]
    assert a.prompt_token_ids == [1, 2, 3] and a.output_token_ids == [9]
    assert a.num_uncomputed == 1 and a.is_decoding and a.last_token_id == 9
    assert a.token_slice(1, 3) == [2, 3]


def test_prompt_copy_is_independent_of_caller_list():
    prompt = [1, 2]
    seq = Sequence(prompt)
    prompt.append(3)
    seq.all_token_ids.append(4)
    assert seq.all_token_ids == [1, 2]


@pytest.mark.parametrize("bad", [[1, -1], [1, 2.0], [True]], ids=repr)
def test_sequence_rejects_bad_prompt_tokens(bad):
    with pytest.raises(ValueError, match="prompt token ids"):
        Sequence(bad)


def test_append_rejects_bad_token_and_finished_sequence():
    seq = Sequence([1])
    with pytest.raises(ValueError, match="token id"):
        seq.append_token(-5)
    seq.finish("stop")
    with pytest.raises(RuntimeError, match="finished"):
        seq.append_token(3)


@pytest.mark.parametrize(
    "params, tokens, eos, expected",
    [
        (SamplingParams(max_new_tokens=5), [7, 2], 2, "stop"),
        (SamplingParams(max_new_tokens=5, ignore_eos=True), [7, 2], 2, None),
        (SamplingParams(max_new_tokens=5, stop_token_ids=(7,)), [7], 2, "stop"),
        (SamplingParams(max_new_tokens=5, ignore_eos=True, stop_token_ids=(7,)), [7], 2, "stop"),
        (SamplingParams(max_new_tokens=2), [4, 5], 2, "length"),
        (SamplingParams(max_new_tokens=3), [4, 5], 2, None),
        (SamplingParams(max_new_tokens=3), [4, 5], None, None),
        (SamplingParams(max_new_tokens=50), [4, 5, 6], None, "length"),  # hits max_model_len 6
    ],
    ids=["eos", "ignore_eos", "stop_id", "stop_id_despite_ignore_eos", "max_new", "below_max_new", "no_eos",
         "max_model_len"],
)
def test_stop_reason(params, tokens, eos, expected):
    seq = Sequence([1, 2, 3], params)
    assert seq.stop_reason(eos, max_model_len=6) is None  # nothing generated yet, even if prompt ends in eos
    for tok in tokens:
        seq.append_token(tok)
    assert seq.stop_reason(eos, max_model_len=6) == expected


def test_finish_and_recompute_require_pages_released():
    seq = Sequence([1, 2, 3])
    seq.status = SequenceStatus.RUNNING
    seq.page_ids = [4]
    seq.num_computed_tokens = 3
    seq.append_token(8)
    with pytest.raises(RuntimeError, match="free them first"):
        seq.reset_for_recompute()
    with pytest.raises(RuntimeError, match="free them first"):
        seq.finish("stop")
    seq.page_ids.clear()
    seq.reset_for_recompute()
    assert seq.status is SequenceStatus.WAITING
    assert seq.num_computed_tokens == 0 and seq.num_uncomputed == 4 and seq.all_token_ids == [1, 2, 3, 8]
    assert not seq.is_decoding
    seq.finish("length")
    assert seq.is_finished and seq.finish_reason == "length"
