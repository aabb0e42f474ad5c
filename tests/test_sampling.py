import numpy as np
import pytest

from gpt2_triton.errors import RequestValidationError
from gpt2_triton.sampling import SamplingParams, TokenSampler, apply_repetition_penalty

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=5000).astype(np.float32)


def draws(params, n=300, logits=LOGITS):
    sampler = TokenSampler(params)
    return [sampler(logits) for _ in range(n)]


def test_greedy_is_argmax():
    assert draws(SamplingParams(temperature=0), n=3) == [int(LOGITS.argmax())] * 3


def test_same_seed_same_tokens_and_different_seed_differs():
    a = draws(SamplingParams(temperature=1.0, seed=7))
    assert a == draws(SamplingParams(temperature=1.0, seed=7))
    assert a != draws(SamplingParams(temperature=1.0, seed=8))


def test_top_k_keeps_only_the_k_best():
    best = set(np.argsort(-LOGITS)[:5].tolist())
    assert set(draws(SamplingParams(temperature=2.0, top_k=5, seed=1))) <= best


def test_top_p_keeps_the_nucleus():
    logits = np.full(3000, -20.0, np.float32)
    logits[[10, 20, 30]] = [5.0, 4.0, 3.0]  # ~99.9% of the mass
    got = set(draws(SamplingParams(temperature=1.0, top_p=0.9, seed=3), logits=logits))
    probs = np.exp(logits[[10, 20, 30]] - 5.0)
    probs /= np.exp(logits - 5.0).sum()
    assert got == {10, 20}, probs  # 0.66 + 0.24 >= 0.9 before token 30 is needed


def test_top_p_on_a_flat_distribution_widens_past_the_candidate_slice():
    logits = np.zeros(4096, np.float32)  # uniform: the nucleus of 0.9 is ~3700 tokens
    got = draws(SamplingParams(temperature=1.0, top_p=0.9, seed=5), n=2000, logits=logits)
    assert max(got) > 1024 and len(set(got)) > 1100


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = np.array([2.0, -1.0, 1.5, 0.5], np.float32)
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    np.testing.assert_allclose(out, [1.0, -2.0, 1.5, 0.5])
    assert TokenSampler(SamplingParams(temperature=0, repetition_penalty=2.0))(logits, [0]) == 2


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_parameters_name_the_field(kwargs, field):
    with pytest.raises(RequestValidationError, match=field):
        SamplingParams(**kwargs)
