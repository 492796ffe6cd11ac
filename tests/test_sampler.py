"""Sampling distributions, truncation, seeds and reported logprobs of the row-wise sampler."""

import pytest
import torch

from runtime.engine.sampler import SampleRequest, sample
from runtime.engine.sampling_params import InvalidRequestError, SamplingParams

LOGITS = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])


def draw(params: SamplingParams, n: int = 4000) -> torch.Tensor:
    """One token from each of n rows of identical logits, every row with its own seeded generator."""
    requests = [SampleRequest(params, torch.Generator().manual_seed(i)) for i in range(n)]
    tokens, _ = sample(LOGITS.repeat(n, 1), requests)
    return torch.bincount(torch.tensor(tokens), minlength=len(LOGITS)).float() / n


def test_frequencies_follow_the_tempered_softmax():
    freq = draw(SamplingParams(temperature=0.7))
    assert torch.allclose(freq, torch.softmax(LOGITS / 0.7, -1), atol=0.03)


def test_top_k_keeps_only_the_k_best_and_renormalizes():
    freq = draw(SamplingParams(temperature=1.0, top_k=2))
    assert freq[2:].sum() == 0
    assert torch.allclose(freq[:2], torch.softmax(LOGITS[:2], -1), atol=0.03)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.softmax(LOGITS, -1)  # 0.64, 0.23, 0.09, ...: 0.8 needs the first two
    freq = draw(SamplingParams(temperature=1.0, top_p=0.8))
    assert freq[2:].sum() == 0
    assert torch.allclose(freq[:2], probs[:2] / probs[:2].sum(), atol=0.03)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, top_k=1),
                                    SamplingParams(temperature=1.5, top_p=1e-6)])
def test_degenerate_settings_are_greedy(params):
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(0))
    tokens, _ = sample(logits, [SampleRequest(params, torch.Generator().manual_seed(i)) for i in range(16)])
    assert tokens == logits.argmax(-1).tolist()


def test_a_seed_fixes_the_draw_and_rows_do_not_affect_each_other():
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0)
    alone, _ = sample(logits[1:2], [SampleRequest(params, torch.Generator().manual_seed(7))])
    batch, _ = sample(logits, [SampleRequest(params, torch.Generator().manual_seed(s)) for s in (3, 7, 5)])
    assert batch[1] == alone[0]


def test_reported_logprobs_are_the_raw_model_distribution():
    params = SamplingParams(temperature=0.3, logprobs=2)
    _, logprobs = sample(LOGITS[None], [SampleRequest(params, torch.Generator().manual_seed(0))])
    raw = torch.log_softmax(LOGITS, -1)
    entry = logprobs[0]
    assert entry.logprob == pytest.approx(raw[entry.token_id].item())
    assert [t for t, _ in entry.top] == [0, 1]
    assert [lp for _, lp in entry.top] == pytest.approx(raw[:2].tolist())


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("temperature", -0.1), ("temperature", float("nan")),
                                          ("top_p", 0.0), ("top_p", 1.01), ("top_k", -2), ("logprobs", 21)])
def test_invalid_settings_name_their_field(field, value):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field
