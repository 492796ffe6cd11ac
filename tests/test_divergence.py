"""The divergence statistics (evalpipe.divergence) and the gate's decision on them, as pure functions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evalpipe.divergence import (
    ScoredPosition,
    SequenceScores,
    against_null,
    calibrate_null,
    divergence_verdict,
    null_means,
    position_kl,
    score_sequence,
    skew_corrected_bounds,
    summarize,
    weighted_quantile,
)
from evalpipe.config import GateConfig
from evalpipe.gate import decide_divergence


def top_k(logprobs: np.ndarray, k: int) -> dict[str, float]:
    order = np.argsort(-logprobs)[:k]
    return {f"t{i}": float(logprobs[i]) for i in order}


def position(logprobs: np.ndarray, token: int, k: int) -> ScoredPosition:
    return ScoredPosition(f"t{token}", float(logprobs[token]), top_k(logprobs, k))


def full_kl(p_log: np.ndarray, q_log: np.ndarray) -> float:
    p = np.exp(p_log)
    return float(np.sum(p * (p_log - q_log)))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def test_identical_distributions_have_zero_kl_and_agree() -> None:
    lp = log_softmax(np.random.default_rng(0).normal(size=50))
    pos = position(lp, 3, 5)
    assert position_kl(pos, pos) == pytest.approx(0.0, abs=1e-12)
    scores = score_sequence([pos, pos], [pos, pos])
    assert scores.top1_agree.all() and np.all(scores.logprob_delta == 0)


def test_full_top_k_gives_the_exact_kl() -> None:
    rng = np.random.default_rng(1)
    p, q = log_softmax(rng.normal(size=8)), log_softmax(rng.normal(size=8))
    assert position_kl(position(p, 2, 8), position(q, 2, 8)) == pytest.approx(full_kl(p, q), rel=1e-9)


def test_two_token_example_by_hand() -> None:
    # Vocabulary {a, b}: P = (0.9, 0.1), Q = (0.6, 0.4); both list only "a" (k = 1), the token scored is "a".
    base = ScoredPosition("a", math.log(0.9), {"a": math.log(0.9)})
    cand = ScoredPosition("a", math.log(0.6), {"a": math.log(0.6)})
    expected = 0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4)  # the tail bucket is exactly "b"
    assert position_kl(base, cand) == pytest.approx(expected)


def test_top_k_kl_is_a_lower_bound_close_to_the_full_kl() -> None:
    rng = np.random.default_rng(2)
    for _ in range(200):
        p = log_softmax(3 * rng.normal(size=200))
        q = log_softmax(p + 0.3 * rng.normal(size=200))
        token = int(rng.integers(200))
        exact = full_kl(p, q)
        approx = position_kl(position(p, token, 20), position(q, token, 20))
        assert approx <= exact + 1e-9
        assert approx >= 0.5 * exact - 1e-3  # peaked distributions: the top-20 holds most of the divergence


def test_top1_disagreement_and_logprob_change() -> None:
    base = ScoredPosition("x", -0.2, {"x": -0.2, "y": -2.0})
    cand = ScoredPosition("x", -1.5, {"y": -0.4, "x": -1.5})
    scores = score_sequence([base], [cand])
    assert not scores.top1_agree[0] and scores.logprob_delta[0] == pytest.approx(-1.3)


def test_servers_that_tokenize_differently_cannot_be_compared() -> None:
    with pytest.raises(ValueError, match="tokenized differently"):
        score_sequence([ScoredPosition("ab", -1.0, {})], [ScoredPosition("a", -1.0, {})])
    with pytest.raises(ValueError, match="scored 1 and 0 positions"):
        score_sequence([ScoredPosition("ab", -1.0, {})], [])


def sequences(rng: np.random.Generator, n: int, mean_kl: float) -> list[SequenceScores]:
    out = []
    for _ in range(n):
        length = int(rng.integers(20, 120))
        level = rng.gamma(4.0, mean_kl / 4.0)  # generations differ: positions within one are correlated
        out.append(SequenceScores(rng.exponential(level, length), rng.random(length) < 0.9,
                                  rng.normal(0.0, 0.3, length)))
    return out


def test_summary_point_estimates_are_means_over_answers() -> None:
    a = SequenceScores(np.array([0.1, 0.3]), np.array([True, False]), np.array([0.5, -0.5]))
    b = SequenceScores(np.array([0.0, 0.0, 0.0, 1.0]), np.array([True] * 4), np.array([0.0, 0.0, 0.0, 1.0]))
    s = summarize([a, b], resamples=200)
    assert s.n_sequences == 2 and s.n_positions == 6
    assert s.mean_kld.value == pytest.approx((0.2 + 0.25) / 2)
    assert s.top1_agreement.value == pytest.approx((0.5 + 1.0) / 2)
    assert s.mean_abs_logprob_change.value == pytest.approx((0.5 + 0.25) / 2)
    assert s.p99_kld.value == 1.0
    assert s.mean_kld.ci95[0] <= s.mean_kld.value <= s.mean_kld.ci95[1]


def test_summary_is_reproducible_and_narrows_with_more_generations() -> None:
    rng = np.random.default_rng(3)
    few, many = sequences(rng, 8, 0.2), sequences(rng, 128, 0.2)
    assert summarize(few, seed=5) == summarize(few, seed=5)
    width = lambda s: s.mean_kld.ci95[1] - s.mean_kld.ci95[0]  # noqa: E731
    assert width(summarize(many)) < 0.5 * width(summarize(few))


def test_skew_corrected_bounds_are_the_t_interval_without_skew_and_shift_up_with_right_skew() -> None:
    symmetric = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    t = 2.7764451051977987  # Student t 0.975 quantile, 4 degrees of freedom
    half = t * symmetric.std(ddof=1) / math.sqrt(5)
    assert skew_corrected_bounds(symmetric, 0.975) == pytest.approx((3.0 - half, 3.0 + half))
    skewed = np.array([0.1, 0.1, 0.2, 0.2, 1.5])
    low, high = skew_corrected_bounds(skewed, 0.975)
    plain = t * skewed.std(ddof=1) / math.sqrt(5)
    assert high > skewed.mean() + plain and low > skewed.mean() - plain
    assert skew_corrected_bounds(np.zeros(4), 0.95) == (0.0, 0.0)
    assert skew_corrected_bounds(np.array([0.3]), 0.95) == (-math.inf, math.inf)


# Per-answer mean KL populations the probe's interval is checked on (docs/ci-gate.md states the figures), scaled
# to a true mean of 0.2 nats: the spread of the quickstart's W4AFP8 probe (16 answers: CV 0.19, skewness -0.13;
# gamma of that CV, which is right-skewed, 0.38), and right-skewed ones with twice that: gamma, shape 8
# (skewness 0.7), and a heavier-tailed lognormal of about the same skewness.
COVERAGE_POPULATIONS = {
    "gamma shape 28": lambda rng, size: rng.gamma(28.0, 0.2 / 28.0, size),
    "gamma shape 8": lambda rng, size: rng.gamma(8.0, 0.2 / 8.0, size),
    "lognormal sigma 0.23": lambda rng, size: rng.lognormal(math.log(0.2) - 0.23**2 / 2, 0.23, size),
}


@pytest.mark.parametrize("population", COVERAGE_POPULATIONS)
@pytest.mark.parametrize("answers", [8, 16, 64])
def test_one_sided_bounds_cover_the_true_mean_within_two_points(population: str, answers: int) -> None:
    """Each one-sided 95% bound (the gate checks max_kld at the upper one) covers the true mean 95% +- 2 points."""
    rng = np.random.default_rng(answers)
    trials = 3000
    draws = COVERAGE_POPULATIONS[population](rng, (trials, answers))
    bounds = np.array([skew_corrected_bounds(row, 0.95) for row in draws])
    lower_cover, upper_cover = np.mean(bounds[:, 0] <= 0.2), np.mean(0.2 <= bounds[:, 1])
    assert abs(upper_cover - 0.95) <= 0.02 and abs(lower_cover - 0.95) <= 0.02


def test_the_null_sets_the_limit_at_its_quantile_plus_the_tolerance() -> None:
    per_answer = [0.0] * 15 + [0.0096]  # the shape of the quickstart's A/A probe: one answer drifts
    null = calibrate_null(per_answer, [{"source": "a"}], answers=16, tolerance=0.3)
    means = null_means(per_answer, 16)
    assert null.null_kld == pytest.approx(np.quantile(means, 0.99)) and 0.0 < null.null_kld < 0.0096
    assert null.max_kld == pytest.approx(null.null_kld + 0.3)
    assert type(null).from_dict(null.to_dict()) == null
    far = against_null(null, 0.22, 16)
    assert far["share_of_null_at_or_above"] == 0.0 and far["null_quantile_kld"] == pytest.approx(null.null_kld)
    assert against_null(null, 0.0, 16)["share_of_null_at_or_above"] == 1.0
    with pytest.raises(ValueError, match="tolerance"):
        calibrate_null(per_answer, [], 16, tolerance=-0.1)


def testweighted_quantile_matches_numpy_on_a_resample() -> None:
    rng = np.random.default_rng(5)
    values = np.sort(rng.exponential(size=300))
    weights = rng.integers(0, 3, size=(4, 300)).astype(float)
    for row, result in zip(weights, weighted_quantile(values, weights, 0.99), strict=True):
        expanded = np.repeat(values, row.astype(int))
        assert result == np.quantile(expanded, 0.99, method="inverted_cdf")


def test_verdicts_at_the_one_sided_bounds() -> None:
    rng = np.random.default_rng(6)
    s = summarize(sequences(rng, 64, 0.2))
    lower, upper = s.mean_kld.lower, s.mean_kld.upper
    assert divergence_verdict(s, upper + 0.01, None)[0] == "pass"
    assert divergence_verdict(s, lower - 0.01, None)[0] == "fail"
    verdict, checks = divergence_verdict(s, (lower + upper) / 2, None)
    assert verdict == "inconclusive" and checks[0][0] == "unsure"
    agreement = s.top1_agreement
    verdict, checks = divergence_verdict(s, upper + 0.01, agreement.upper + 0.01)
    assert verdict == "fail" and [state for state, _ in checks] == ["holds", "broken"]
    assert divergence_verdict(summarize(sequences(rng, 1, 0.2)), 10.0, None)[0] == "inconclusive"


def test_gate_decision_on_the_probe() -> None:
    s = summarize(sequences(np.random.default_rng(7), 32, 0.2))
    strict = GateConfig(max_kld=s.mean_kld.lower / 2, tasks={"divergence": {"on_inconclusive": "pass"}})
    decision = decide_divergence(s, 0, 32, strict.for_task("divergence"))
    assert decision.status == "fail" and "over the limit: mean KLD" in decision.reasons[0]
    loose = GateConfig(max_kld=1.0, min_top1_agreement=0.5).for_task("divergence")
    assert decide_divergence(s, 0, 32, loose).status == "pass"
    unsure = GateConfig(max_kld=s.mean_kld.value).for_task("divergence")
    assert decide_divergence(s, 0, 32, unsure).status == "fail"  # inconclusive counts as fail by default
    assert decide_divergence(s, 0, 32, GateConfig().for_task("divergence")).reasons == (
        "no max_kld or min_top1_agreement: reported only",)
    assert decide_divergence(s, 3, 32, loose).status == "error"  # 9% of generations failed > max_error_rate 2%
    assert decide_divergence(None, 32, 32, loose).status == "error"
