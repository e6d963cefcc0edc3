from types import SimpleNamespace

import pytest
import torch

from fxforge.runtime.sampling import GREEDY_TEMPERATURE, make_generator, sample
from fxforge.runtime.sequence import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BASE_LOGITS = torch.tensor([2.0, 1.0, 0.0, -1.0])


def _logits(batch, vocab, seed=0, dtype=torch.float32, device="cpu"):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def _counts(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens.cpu(), minlength=vocab).double()


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = counts.sum() * probs.double()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_greedy_is_argmax(dtype, device):
    logits = _logits(7, 33, dtype=dtype, device=device)
    params = [SamplingParams()] * 6 + [SamplingParams(temperature=GREEDY_TEMPERATURE / 2)]
    tokens = sample(logits, params)
    assert tokens.dtype == torch.int64 and tokens.device.type == device
    assert torch.equal(tokens, logits.argmax(dim=-1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.5, top_p=1e-6),
     SamplingParams(temperature=3.0, top_k=5, top_p=1e-6)],
    ids=["top_k=1", "tiny_top_p", "top_k+tiny_top_p"],
)
def test_filters_that_keep_one_token_equal_greedy(params, device):
    logits = _logits(64, 101, seed=1, device=device)
    for _ in range(5):
        assert torch.equal(sample(logits, [params] * 64), logits.argmax(dim=-1))


def test_greedy_rows_are_argmax_inside_a_sampling_batch():
    logits = _logits(6, 50, seed=2)
    params = [SamplingParams(), SamplingParams(temperature=1.0)] * 3
    tokens = sample(logits, params)
    assert torch.equal(tokens[0::2], logits[0::2].argmax(dim=-1))


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_reproducible_whatever_the_batch(device):
    vocab = 500
    seeded_logits = _logits(1, vocab, seed=3, device=device)[0]
    seeded = SamplingParams(temperature=1.0, top_k=100, top_p=0.95, seed=1234)

    def draws(position, batch, other_seed, global_seed):
        torch.manual_seed(global_seed)
        logits = _logits(batch, vocab, seed=other_seed, device=device)
        logits[position] = seeded_logits
        params = [SamplingParams(temperature=0.8, top_k=7 * (i % 3)) for i in range(batch)]
        params[position] = seeded
        generators = [None] * batch
        generators[position] = make_generator(seeded.seed, device)
        if batch > 2:  # another seeded row, with its own generator, next to ours
            other = (position + 1) % batch
            params[other] = SamplingParams(temperature=1.0, seed=99)
            generators[other] = make_generator(99, device)
        return [int(sample(logits, params, generators)[position]) for _ in range(30)]

    first = draws(position=0, batch=1, other_seed=10, global_seed=0)
    assert draws(position=0, batch=1, other_seed=10, global_seed=0) == first
    assert draws(position=5, batch=8, other_seed=11, global_seed=1) == first
    assert draws(position=2, batch=3, other_seed=12, global_seed=2) == first
    assert len(set(first)) > 5  # really sampled, not a constant
    # A different seed gives a different stream.
    logits = seeded_logits[None]
    generator = make_generator(4321, device)
    other_stream = [int(sample(logits, [seeded], [generator])[0]) for _ in range(30)]
    assert other_stream != first


def test_greedy_seeded_row_does_not_advance_its_generator():
    generator = make_generator(7, "cpu")
    state = generator.get_state()
    sample(_logits(2, 10), [SamplingParams(seed=7), SamplingParams(temperature=1.0)], [generator, None])
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_matches_softmax_of_scaled_logits(temperature):
    torch.manual_seed(0)
    n = 40_000
    tokens = sample(BASE_LOGITS.expand(n, -1), [SamplingParams(temperature=temperature)] * n)
    counts = _counts(tokens, 4)
    # chi-square, 3 degrees of freedom: 27.9 is the 1e-5 tail.
    assert _chi_square(counts, torch.softmax(BASE_LOGITS / temperature, -1)) < 27.9
    wrong_temperature = 1.0 if temperature != 1.0 else 2.0
    assert _chi_square(counts, torch.softmax(BASE_LOGITS / wrong_temperature, -1)) > 200  # the check has power


def test_higher_temperature_flattens_the_empirical_distribution():
    torch.manual_seed(1)
    n = 20_000
    top_share, entropy = [], []
    for temperature in (0.25, 0.5, 1.0, 2.0, 4.0):
        freq = _counts(sample(BASE_LOGITS.expand(n, -1), [SamplingParams(temperature=temperature)] * n), 4) / n
        top_share.append(float(freq[0]))
        entropy.append(float(-(freq[freq > 0] * freq[freq > 0].log()).sum()))
    assert top_share == sorted(top_share, reverse=True) and top_share[0] > 0.95 and top_share[-1] < 0.45
    assert entropy == sorted(entropy)


@pytest.mark.parametrize(
    "params, support, expected",
    [
        (SamplingParams(temperature=1.0, top_k=2), [0, 1], [0.625, 0.375]),
        (SamplingParams(temperature=1.0, top_p=0.7), [0, 1], [0.625, 0.375]),
        (SamplingParams(temperature=1.0, top_p=0.9), [0, 1, 2], [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]),
        (SamplingParams(temperature=1.0, top_k=3, top_p=0.8), [0, 1], [0.625, 0.375]),
        (SamplingParams(temperature=1.0, top_k=10), [0, 1, 2, 3], [0.5, 0.3, 0.15, 0.05]),
    ],
    ids=["top_k=2", "top_p=0.7", "top_p=0.9", "top_k=3,top_p=0.8", "top_k>vocab"],
)
def test_top_k_top_p_support_and_renormalised_frequencies(params, support, expected):
    torch.manual_seed(2)
    n = 40_000
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    order = torch.tensor([2, 0, 3, 1])  # scatter the ranks over token ids: filters must follow values
    logits = torch.empty(4)
    logits[order] = probs.log()
    tokens = sample(logits.expand(n, -1), [params] * n)
    counts = _counts(tokens, 4)[order]  # counts by rank
    assert set(torch.nonzero(counts).flatten().tolist()) == set(support)
    assert _chi_square(counts[support], torch.tensor(expected)) < 27.9


def test_invalid_inputs_rejected():
    ok = SamplingParams(temperature=1.0)
    with pytest.raises(ValueError, match=r"\[batch, vocab\]"):
        sample(torch.zeros(5), [ok])
    with pytest.raises(ValueError, match=r"\[batch, vocab\]"):
        sample(torch.zeros(1, 5, dtype=torch.int64), [ok])
    with pytest.raises(ValueError, match="2 SamplingParams for 1 rows"):
        sample(torch.zeros(1, 5), [ok, ok])
    with pytest.raises(ValueError, match="1 generators for 2 rows"):
        sample(torch.zeros(2, 5), [ok, ok], [None])
    with pytest.raises(ValueError, match="row 1 has seed 5 but no generator"):
        sample(torch.zeros(2, 5), [ok, SamplingParams(temperature=1.0, seed=5)])
    with pytest.raises(ValueError, match=r"row 0: invalid sampling parameters temperature=-1.0"):
        sample(torch.zeros(1, 5), [SimpleNamespace(temperature=-1.0, top_k=0, top_p=1.0, seed=None)])
    with pytest.raises(ValueError, match="top_p=0.0"):
        sample(torch.zeros(1, 5), [SimpleNamespace(temperature=1.0, top_k=0, top_p=0.0, seed=None)])
    with pytest.raises(ValueError, match="SamplingParams.top_k"):
        SamplingParams(top_k=-2)


def test_empty_batch():
    assert sample(torch.zeros(0, 5), []).shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generator_device_must_match_logits():
    params = [SamplingParams(temperature=1.0, seed=1)]
    with pytest.raises(ValueError, match="generator on cpu but logits on cuda"):
        sample(torch.zeros(1, 5, device="cuda"), params, [make_generator(1, "cpu")])
