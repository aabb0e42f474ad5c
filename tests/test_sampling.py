"""The batched sampler against a straightforward reference: float64, a full stable sort."""

import collections
import dataclasses

import numpy as np
import pytest

from gpt2_triton import sampling
from gpt2_triton.errors import RequestValidationError
from gpt2_triton.sampling import (
    SamplingError,
    SamplingParams,
    TokenCounts,
    TokenSampler,
    penalize_repeats,
    sample_batch,
    sample_rows,
)

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=5000).astype(np.float32)
VOCAB = 50257  # GPT-2's: the size the sampler's blocks and guesses are tuned for


def draws(params, n=300, logits=LOGITS):
    sampler = TokenSampler(params)
    return [sampler(logits) for _ in range(n)]


def reference_probs(logits, params, seen=(), suppressed=None):
    """What each token's probability should be: the pipeline written the plain way."""
    scaled = logits.astype(np.float64)
    for token in set(seen):
        value = scaled[token]
        scaled[token] = (
            value / params.repetition_penalty if value > 0 else value * params.repetition_penalty
        )
    if suppressed is not None:
        scaled[suppressed] = -np.inf
    mass = np.exp((scaled - scaled.max()) / params.temperature)
    order = np.argsort(-mass, kind="stable")  # likeliest first, equal ones by id
    if 0 < params.top_k < logits.size:
        order = order[: params.top_k]
    if params.top_p < 1:
        cumulative = np.cumsum(mass[order])
        order = order[: np.searchsorted(cumulative, params.top_p * cumulative[-1]) + 1]
    probs = np.zeros(logits.size)
    probs[order] = mass[order]
    return probs / probs.sum()


def reference_order(probs):
    return np.argsort(-probs, kind="stable")


def test_greedy_is_argmax():
    assert draws(SamplingParams(temperature=0), n=3) == [int(LOGITS.argmax())] * 3


def test_greedy_rows_of_a_mixed_batch_are_exactly_argmax_of_their_adjusted_row():
    logits = RNG.normal(size=(4, VOCAB)).astype(np.float32)
    before = logits.copy()
    best = [int(np.argmax(row)) for row in logits]
    samplers = [
        TokenSampler(SamplingParams(temperature=0)),
        TokenSampler(SamplingParams(temperature=0.8, top_p=0.95, seed=1)),
        TokenSampler(SamplingParams(temperature=0, repetition_penalty=10), [best[2]]),
        TokenSampler(SamplingParams(temperature=0)),
    ]
    tokens = sample_batch(logits, samplers, [None, None, None, best[3]])
    penalized, suppressed = logits[2].copy(), logits[3].copy()
    penalized[best[2]] /= 10  # a positive logit: the largest of 50,257 normal draws
    suppressed[best[3]] = -np.inf  # end-of-text before min_length
    assert tokens[0] == best[0]
    assert tokens[2] == int(np.argmax(penalized)) != best[2]
    assert tokens[3] == int(np.argmax(suppressed)) != best[3]
    np.testing.assert_array_equal(logits, before)  # the engine's logits are not written to


def test_same_seed_same_tokens_and_different_seed_differs():
    a = draws(SamplingParams(temperature=1.0, seed=7))
    assert a == draws(SamplingParams(temperature=1.0, seed=7))
    assert a != draws(SamplingParams(temperature=1.0, seed=8))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, top_p=0.95, seed=11),
        SamplingParams(top_k=50, seed=12),
        SamplingParams(temperature=1.3, repetition_penalty=1.3, seed=13),
    ],
)
def test_a_seeded_stream_is_the_same_alone_and_in_any_batch(params):
    logits = (RNG.normal(size=(6, VOCAB)) * 2).astype(np.float32)
    alone = TokenSampler(params, [1, 2, 3])
    alone_tokens = [alone(logits[2]) for _ in range(40)]
    others = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.5, top_k=3, seed=5),
        None,  # the seeded row
        SamplingParams(top_p=0.5),
        SamplingParams(temperature=2.0, repetition_penalty=2.0),
        SamplingParams(temperature=0.7, seed=9),
    ]
    samplers = [TokenSampler(p or params, [1, 2, 3]) for p in others]
    batched = [int(sample_batch(logits, samplers)[2]) for _ in range(40)]
    assert batched == alone_tokens


def test_top_k_keeps_exactly_the_k_likeliest_ties_by_lower_id():
    for scale in (0.55, 3.0):
        probs = np.exp(RNG.normal(size=VOCAB) * scale).astype(np.float32)
        probs[[100, 200, 300, 400]] = probs.max()  # four tied for first
        order = reference_order(probs)
        for k in (1, 2, 5, 50, 1000, 20000):
            np.testing.assert_array_equal(sampling._likeliest(probs, k), order[:k])
    assert list(sampling._likeliest(np.ones(100, np.float32), 7)) == list(range(7))


def test_top_k_draws_stay_in_the_top_k():
    best = set(np.argsort(-LOGITS)[:5].tolist())
    assert set(draws(SamplingParams(temperature=2.0, top_k=5, seed=1))) <= best


@pytest.mark.parametrize("scale", [0.55, 3.0])  # a random-weight model's logits; peaked
def test_top_p_is_the_smallest_prefix_of_likeliest_tokens_reaching_p(scale):
    logits = (RNG.normal(size=VOCAB) * scale).astype(np.float32)
    probs = np.exp(logits - logits.max())
    order = reference_order(probs)
    cumulative = np.cumsum(probs[order], dtype=np.float64)
    for top_p in (0.05, 0.5, 0.95):
        target = top_p * cumulative[-1]
        size = int(np.searchsorted(cumulative, target)) + 1  # the smallest prefix >= p
        np.testing.assert_array_equal(sampling._nucleus(probs, target), order[:size])
        # the test each rejection-sampling try makes: in the nucleus or not, token by token
        members = np.zeros(VOCAB, bool)
        members[order[:size]] = True
        tokens = RNG.choice(VOCAB, 400, replace=False)
        assert [sampling._mass_before(probs, t) < target for t in tokens] == list(members[tokens])


def test_top_p_ties_at_the_cut_keep_the_lower_ids():
    # masses 1 (token 7), 0.75 (tokens 0 and 5), 0.5 (tokens 2, 3, 9, 11): 4.5 in all
    logits = np.full(12, -np.inf, np.float32)
    logits[7] = 0.0
    logits[[2, 3, 9, 11]] = np.log(0.5)
    logits[[0, 5]] = np.log(0.75)
    probs = np.exp(logits)
    target = 0.5 * float(probs.sum())
    nucleus = sampling._nucleus(probs, target)
    assert list(nucleus) == [7, 0, 5]  # 1 + 0.75 + 0.75 = 2.5 >= 2.25
    target = 0.7 * float(probs.sum())  # 3.15: 2.5, + 0.5 (id 2) = 3.0, + 0.5 (id 3) = 3.5
    assert list(sampling._nucleus(probs, target)) == [7, 0, 5, 2, 3]
    inside = [t for t in range(12) if sampling._mass_before(probs, t) < target]
    assert inside == [0, 2, 3, 5, 7]


def test_a_draw_at_either_end_of_the_mass_lands_on_a_token_that_has_mass():
    # rounding can put a draw's target at the very end of the mass (or at 0): the walk
    # must then give the last (first) token with mass, never a suppressed one or one past
    # the vocabulary; here the first token and the last ten have none
    probs = np.exp(np.random.default_rng(5).normal(size=600)).astype(np.float32)
    probs[0] = probs[590:] = 0.0
    blocks = np.add.reduceat(probs, np.arange(0, probs.size, sampling._BLOCK))
    blocks[-1] *= np.float32(1 + 1e-5)  # the block sum above its tokens' (their rounding)
    walk = sampling._BlockWalk(probs, blocks)
    assert walk.token(1.0) == 589
    assert walk.token(np.nextafter(1.0, 0.0)) == 589
    assert walk.token(0.0) == 1


def test_top_p_keeps_the_nucleus():
    logits = np.full(3000, -20.0, np.float32)
    logits[[10, 20, 30]] = [5.0, 4.0, 3.0]  # ~99.9% of the mass
    got = set(draws(SamplingParams(temperature=1.0, top_p=0.9, seed=3), logits=logits))
    assert got == {10, 20}  # 0.66 + 0.24 >= 0.9 before token 30 is needed


def test_top_p_on_a_flat_distribution_reaches_past_any_candidate_slice():
    logits = np.zeros(4096, np.float32)  # uniform: the nucleus of 0.9 is tokens 0-3686
    got = draws(SamplingParams(temperature=1.0, top_p=0.9, seed=5), n=2000, logits=logits)
    assert max(got) > 1024 and len(set(got)) > 1100 and max(got) <= 3686


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=0.8, top_p=0.5),
        SamplingParams(top_k=20),
        SamplingParams(temperature=1.3, top_k=100, top_p=0.7),
        SamplingParams(top_p=0.05),  # past the rejection tries: the nucleus listed
        SamplingParams(repetition_penalty=1.5, top_p=0.9),
    ],
)
def test_draws_follow_the_reference_distribution(params):
    logits = (np.random.default_rng(3).normal(size=700) * 1.5).astype(np.float32)
    seen, eos = list(range(50)), int(np.argmax(logits))
    rows, steps = 16, 1250  # 20,000 draws, 16 rows at a time
    samplers = [TokenSampler(dataclasses.replace(params, seed=100 + i), seen) for i in range(rows)]
    for sampler in samplers:
        sampler.observe = lambda token: None  # the same distribution at every step
    batch = np.repeat(logits[np.newaxis], rows, axis=0)
    tokens = np.concatenate([sample_batch(batch, samplers, [eos] * rows) for _ in range(steps)])
    want = reference_probs(logits, params, seen, suppressed=eos)
    got = np.bincount(tokens, minlength=logits.size) / tokens.size
    assert set(np.flatnonzero(got)) <= set(np.flatnonzero(want))  # nothing outside the cut
    sigma = np.sqrt(want * (1 - want) / tokens.size)
    kept = want > 0
    assert np.max(np.abs(got - want)[kept] / sigma[kept]) < 5  # seeded: not a flaky test


def test_a_suppressed_token_is_never_drawn_even_as_the_likeliest():
    logits = np.zeros(50, np.float32)
    logits[7] = 50.0  # all the mass
    sampler = TokenSampler(SamplingParams(temperature=1.0, seed=2))
    assert {sampler(logits, suppressed=7) for _ in range(200)} <= set(range(50)) - {7}


def test_token_counts_kept_incrementally_equal_counts_of_the_history():
    history = list(RNG.integers(0, 300, 40))
    counts = TokenCounts(history)
    for token in RNG.integers(0, 300, 500):
        counts.add(token)
        history.append(token)
        assert counts.counts == collections.Counter(int(t) for t in history)
        np.testing.assert_array_equal(np.sort(counts.distinct), np.unique(history))


def test_the_sampler_counts_its_prompt_and_its_own_draws():
    prompt = [3, 3, 9]
    sampler = TokenSampler(SamplingParams(temperature=1.0, repetition_penalty=1.2, seed=4), prompt)
    drawn = [sampler(LOGITS) for _ in range(30)]
    assert sampler.counts.counts == collections.Counter(prompt + drawn)
    assert TokenSampler(SamplingParams(temperature=1.0)).counts is None  # penalty off: none


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = np.array([2.0, -1.0, 1.5, 0.5], np.float32)
    penalized = logits.copy()
    penalize_repeats(penalized, [0, 1, 1], 2.0)
    np.testing.assert_allclose(penalized, [1.0, -2.0, 1.5, 0.5])
    assert TokenSampler(SamplingParams(temperature=0, repetition_penalty=2.0), [0])(logits) == 2


def test_a_row_that_cannot_be_sampled_fails_before_any_draw():
    logits = np.stack([LOGITS, LOGITS]).copy()
    logits[1, 9] = np.nan
    samplers = [TokenSampler(SamplingParams(seed=s, repetition_penalty=1.1)) for s in (1, 2)]
    states = [s.rng.bit_generator.state for s in samplers]
    with pytest.raises(SamplingError):
        sample_batch(logits, samplers)
    assert [s.rng.bit_generator.state for s in samplers] == states
    assert [s.counts.counts for s in samplers] == [{}, {}]


def test_sample_rows_shares_one_generator_and_reads_each_rows_history():
    logits = np.stack([LOGITS, LOGITS])
    best = int(LOGITS.argmax())
    greedy = SamplingParams(temperature=0, repetition_penalty=10.0)
    tokens = sample_rows(logits, greedy, [[best], []])
    assert tokens[1] == best and tokens[0] != best
    params = SamplingParams(temperature=1.0, seed=21)
    assert list(sample_rows(logits, params)) == list(sample_rows(logits, params))


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
