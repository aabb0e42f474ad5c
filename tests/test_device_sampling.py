"""The device sampler (``device_sampling.py``) on CPU tensors: the same code and the same
torch operations as on a GPU. Greedy rows agree with the host sampler token for token;
sampled rows follow the distribution that temperature, top-k and top-p define; a seed gives
its stream whatever shares the batch; a failed call takes no draw."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpt2_triton import device_sampling
from gpt2_triton.sampling import SamplingError, SamplingParams, TokenSampler, sample_batch

VOCAB = 300


def samplers_for(params, prompts=None):
    prompts = prompts or [()] * len(params)
    return [TokenSampler(p, seen) for p, seen in zip(params, prompts, strict=True)]


def test_greedy_rows_equal_the_host_sampler_with_penalty_and_suppression():
    logits = np.random.default_rng(0).normal(size=(6, VOCAB)).astype(np.float32)
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1  # a tie: the lower id wins on both
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, repetition_penalty=1.7),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, repetition_penalty=0.5),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, repetition_penalty=3.0),
    ]
    histories = [(), tuple(np.argsort(-logits[1])[:5]), (), (4, 4, 200), (), (1,)]
    suppressed = [None, None, None, None, int(logits[4].argmax()), 1]
    host = sample_batch(logits, samplers_for(params, histories), suppressed)
    tensor = torch.from_numpy(logits.copy())
    device = device_sampling.sample_batch(tensor, samplers_for(params, histories), suppressed)
    np.testing.assert_array_equal(device, host)
    assert host[2] == 7 and host[4] != logits[4].argmax()
    np.testing.assert_array_equal(tensor.numpy(), logits)  # the engine's logits untouched


def expected_distribution(row: np.ndarray, params: SamplingParams) -> np.ndarray:
    """What temperature, top-k then top-p define, computed directly (sorting, cumsum)."""
    scaled = row.astype(np.float64) / params.temperature
    order = np.argsort(-scaled, kind="stable")
    probs = np.zeros_like(scaled)
    kept = order[: params.top_k] if params.top_k else order
    weights = np.exp(scaled[kept] - scaled[kept].max())
    weights /= weights.sum()
    ahead = np.cumsum(weights) - weights
    nucleus = ahead < params.top_p
    probs[kept[nucleus]] = weights[nucleus] / weights[nucleus].sum()
    return probs


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=0.5, seed=2),
        SamplingParams(temperature=1.0, top_k=3, seed=3),
        SamplingParams(temperature=0.8, top_p=0.6, seed=4),
        SamplingParams(temperature=1.2, top_k=5, top_p=0.7, seed=5),
    ],
)
def test_sampled_rows_follow_the_distribution_the_parameters_define(params):
    vocab = 12
    row = np.linspace(2.0, -1.0, vocab).astype(np.float32)[
        np.random.default_rng(9).permutation(vocab)
    ]
    draws = 20_000
    logits = torch.from_numpy(np.tile(row, (draws, 1)))
    samplers = [TokenSampler(params, rng=np.random.default_rng(i)) for i in range(draws)]
    tokens = device_sampling.sample_batch(logits, samplers)
    counts = np.bincount(tokens, minlength=vocab) / draws
    expected = expected_distribution(row, params)
    assert (counts[expected == 0] == 0).all()  # nothing outside top-k / the nucleus
    np.testing.assert_allclose(counts, expected, atol=0.015)  # ~4 standard deviations


def test_a_seed_gives_its_stream_whatever_shares_the_batch():
    rng = np.random.default_rng(3)
    steps = [rng.normal(size=(3, VOCAB)).astype(np.float32) for _ in range(8)]
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=1234)

    def stream(row, others):
        mine = TokenSampler(seeded)
        neighbours = [TokenSampler(SamplingParams(temperature=1.0, top_k=4)) for _ in others]
        out = []
        for logits in steps:
            batch = np.stack([logits[row]] + [logits[o] for o in others])
            tokens = device_sampling.sample_batch(torch.from_numpy(batch), [mine, *neighbours])
            out.append(int(tokens[0]))
        return out

    alone = stream(0, [])
    assert stream(0, [1, 2]) == alone
    assert stream(0, [2]) == alone


def test_a_row_that_cannot_be_sampled_fails_the_call_and_takes_no_draw():
    logits = np.random.default_rng(1).normal(size=(3, VOCAB)).astype(np.float32)
    logits[1] = np.nan
    samplers = samplers_for(
        [SamplingParams(temperature=1.0, seed=5, repetition_penalty=1.2)] * 3, [(1, 2)] * 3
    )
    before = [s.rng.bit_generator.state for s in samplers]
    with pytest.raises(SamplingError, match="row 1"):
        device_sampling.sample_batch(torch.from_numpy(logits), samplers)
    assert [s.rng.bit_generator.state for s in samplers] == before
    assert all(s.counts.counts == {1: 1, 2: 1} for s in samplers)  # nothing observed
    logits[1] = 0.0
    tokens = device_sampling.sample_batch(torch.from_numpy(logits), samplers)
    assert all(s.counts.counts.get(int(t)) for s, t in zip(samplers, tokens, strict=True))


def test_every_row_at_once_on_a_mixed_batch():
    """Greedy, sampled, suppressed and penalized rows in one call: each row's token is one
    its own parameters allow."""
    logits = np.random.default_rng(2).normal(size=(5, VOCAB)).astype(np.float32)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_k=1),  # top-1: the argmax, sampled
        SamplingParams(temperature=0.7, top_p=1e-6),  # the nucleus is one token
        SamplingParams(temperature=1.0, top_k=2, repetition_penalty=10.0),
        SamplingParams(temperature=1.0),
    ]
    best = np.argsort(-logits, axis=1)
    histories = [(), (), (), (int(best[3, 0]),), ()]
    suppressed = [None, None, None, None, int(best[4, 0])]
    tokens = device_sampling.sample_batch(
        torch.from_numpy(logits), samplers_for(params, histories), suppressed
    )
    assert tokens[0] == best[0, 0] and tokens[1] == best[1, 0] and tokens[2] == best[2, 0]
    assert tokens[3] in best[3, :3] and tokens[4] != best[4, 0]


def test_top_k_keeps_exactly_k_with_ties_to_the_lower_id_and_any_k_is_valid():
    logits = np.zeros((3, 8), np.float32)
    logits[:, [2, 5, 6]] = 1.0  # three tied leaders
    params = [
        SamplingParams(temperature=1.0, top_k=1, seed=1),  # only token 2, every time
        SamplingParams(temperature=1.0, top_k=2, seed=2),  # 2 or 5, never 6
        SamplingParams(temperature=1.0, top_k=50, seed=3),  # more than the vocabulary: off
    ]
    seen = [set(), set(), set()]
    for _ in range(200):
        tokens = device_sampling.sample_batch(torch.from_numpy(logits), samplers_for(params))
        for row, token in enumerate(tokens):
            seen[row].add(int(token))
        params = [SamplingParams(p.temperature, p.top_k, seed=p.seed + 3) for p in params]
    assert seen[0] == {2} and seen[1] == {2, 5} and len(seen[2]) == 8
    host = sample_batch(logits, samplers_for([SamplingParams(temperature=1.0, top_k=1)] * 3))
    assert host.tolist() == [2, 2, 2]


def test_cpu_tensors_are_sampled_on_the_host(monkeypatch):
    """sampling.sample_batch reads a CPU tensor as numpy (the host sampler is the faster
    one there: 1.5 against 5 ms for 16 rows at temperature 0.8, in a review's
    measurement); only a GPU tensor goes to the device sampler."""
    calls = []
    monkeypatch.setattr(device_sampling, "sample_batch", lambda *a: calls.append(a))
    logits = torch.zeros((1, VOCAB))
    assert sample_batch(logits, samplers_for([SamplingParams(temperature=0)])).tolist() == [0]
    assert not calls


def test_sampling_ahead_hands_the_tokens_over_before_reading_them():
    """``sample_batch_ahead``: the launch gets the tokens on the device and returns them
    read; a row that cannot be sampled fails alone (None), the others are observed as
    ``sample_batch`` observes them; a launch that fails costs only the overlap."""
    logits = np.random.default_rng(2).normal(size=(3, VOCAB)).astype(np.float32)
    logits[1] = np.nan
    params = [SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=0.7, seed=6)]
    reference = samplers_for(params + [SamplingParams(temperature=0)])
    handed = []

    def launch(tokens):
        assert isinstance(tokens, torch.Tensor)
        handed.append(tokens.clone())
        return tokens.numpy()

    samplers = samplers_for(params + [SamplingParams(temperature=0)])
    tokens, launched = device_sampling.sample_batch_ahead(
        torch.from_numpy(logits), samplers, None, launch
    )
    assert launched and tokens[1] is None and handed[0][1] == -1
    healthy = logits[[0, 2]]
    want = device_sampling.sample_batch(torch.from_numpy(healthy), [reference[0], reference[2]])
    assert [tokens[0], tokens[2]] == want.tolist()
    assert samplers[0].rng.bit_generator.state == reference[0].rng.bit_generator.state

    def refuse(tokens):
        raise RuntimeError("no")

    again, launched = device_sampling.sample_batch_ahead(
        torch.from_numpy(healthy), samplers_for([params[0], params[1]]), None, refuse
    )
    want = device_sampling.sample_batch(torch.from_numpy(healthy), samplers_for(params))
    assert not launched and again == want.tolist()


@pytest.mark.parametrize("temperature", [1e-40, 1e-20, 1e-6])
def test_a_vanishing_temperature_is_greedy_on_both_samplers(temperature):
    """1 / t overflowed float32 below ~1e-38: the row had no finite maximum and the request
    failed with an internal error. Below 1e-5 it is greedy, as in vLLM."""
    logits = np.random.default_rng(2).normal(size=(2, VOCAB)).astype(np.float32)
    params = [SamplingParams(temperature=temperature, seed=3)] * 2
    assert params[0].greedy
    host = sample_batch(logits, samplers_for(params))
    device = device_sampling.sample_batch(torch.from_numpy(logits), samplers_for(params))
    np.testing.assert_array_equal(host, logits.argmax(axis=1))
    np.testing.assert_array_equal(device, host)
    assert not SamplingParams(temperature=1e-5).greedy  # from there on, sampled


@pytest.mark.parametrize("broken", [np.nan, np.inf, -np.inf])
def test_a_greedy_row_with_no_finite_maximum_fails_as_a_sampled_one_does(broken):
    """An all-NaN row came out as token 0 when greedy (end-of-text, or GPT-2's "!": a
    wrong text, silently) and as an error when sampled: both fail now, on both samplers,
    taking no draw for the other rows."""
    logits = np.random.default_rng(4).normal(size=(3, VOCAB)).astype(np.float32)
    logits[1] = broken
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0)]
    params.append(SamplingParams(temperature=0.8, seed=6))
    for sample in (sample_batch, device_sampling.sample_batch):
        samplers = samplers_for(params)
        before = samplers[2].rng.bit_generator.state
        rows = logits if sample is sample_batch else torch.from_numpy(logits)
        with pytest.raises(SamplingError, match="row 1"):
            sample(rows, samplers)
        assert samplers[2].rng.bit_generator.state == before
        assert all(not s.counts.counts for s in samplers if s.counts is not None)


def test_each_row_draws_in_its_own_order_whatever_its_neighbours_ask():
    """A seeded temperature-only stream drew other tokens whenever a top-p request shared
    its batch (the whole batch was walked sorted); a seeded top-k stream drew other tokens
    than on the host (walked in id order there, likeliest first here). Each row now walks
    in the host's order, so both equal the host's stream, with any neighbours."""
    rng = np.random.default_rng(5)
    steps = [rng.normal(size=(3, VOCAB)).astype(np.float32) for _ in range(40)]
    neighbours = [
        [],
        [SamplingParams(temperature=1.0, top_p=0.9)],
        [SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=0)],
    ]

    def stream(params, others, sample):
        mine = TokenSampler(params)
        out = []
        for logits in steps:
            batch = logits[: 1 + len(others)].copy()
            samplers = [mine, *(TokenSampler(p) for p in others)]
            rows = batch if sample is sample_batch else torch.from_numpy(batch)
            out.append(int(sample(rows, samplers)[0]))
        return out

    for params in (
        SamplingParams(temperature=1.0, seed=99),
        SamplingParams(temperature=0.7, top_k=20, seed=98),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.8, seed=97),
    ):
        host = stream(params, [], sample_batch)
        for others in neighbours:
            assert stream(params, others, device_sampling.sample_batch) == host, (params, others)
