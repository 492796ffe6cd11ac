import math

import numpy as np
import pytest
from scipy import stats as sps

from evalpipe.stats import (
    WORST_CASE,
    VarianceComponents,
    minimum_detectable_effect,
    noninferiority,
    noninferiority_rows,
    paired_difference,
    questions_needed,
    samples_needed,
    variance_components,
)


def test_paired_difference_is_mean_of_per_question_differences_with_t_interval():
    rng = np.random.default_rng(0)
    cand = (rng.random((40, 4)) < 0.6).astype(float)
    base = (rng.random((40, 4)) < 0.7).astype(float)
    d = cand.mean(axis=1) - base.mean(axis=1)
    result = paired_difference(cand, base)
    assert result.delta == pytest.approx(d.mean())
    assert result.stderr == pytest.approx(d.std(ddof=1) / math.sqrt(40))
    half = sps.t.ppf(0.975, 39) * result.stderr
    assert result.ci95 == pytest.approx((d.mean() - half, d.mean() + half))
    assert result.n_questions == 40 and not result.floored
    assert result.candidate_accuracy - result.baseline_accuracy == pytest.approx(result.delta)


def test_nan_samples_are_skipped_and_empty_rows_drop_the_question_on_both_sides():
    cand = np.array([[1, np.nan], [0, 0], [np.nan, np.nan], [1, 1]], dtype=float)
    base = np.array([[1, 0, 1, 0, 1], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0], [np.nan, 1, 1, 1, 1]], dtype=float)
    result = paired_difference(cand, base)
    # question 2 has no candidate sample; k differs between sides (2 vs 5)
    expected = np.array([1 - 0.6, 0 - 0.8, 1 - 1.0])
    assert result.n_questions == 3
    assert result.delta == pytest.approx(expected.mean())
    assert result.baseline_accuracy == pytest.approx(np.mean([0.6, 0.8, 1.0]))


def test_one_dimensional_input_means_one_sample_per_question():
    assert paired_difference([1, 0, 1, 1], [1, 1, 1, 0]).delta == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("cand", "base", "message"),
    [
        (np.ones((3, 2)), np.ones((4, 2)), "rows must pair"),
        (np.full((3, 2), 2.0), np.ones((3, 2)), "candidate: outcomes must lie in"),
        (np.ones((3, 2, 1)), np.ones((3, 2)), "candidate: expected an"),
        (np.full((3, 2), np.nan), np.ones((3, 2)), "no question has outcomes on both sides"),
    ],
)
def test_bad_inputs_are_rejected_with_a_reason(cand, base, message):
    with pytest.raises(ValueError, match=message):
        paired_difference(cand, base)


@pytest.mark.parametrize("margin", [-0.01, float("nan")])
def test_margin_must_be_a_non_negative_fraction(margin):
    with pytest.raises(ValueError, match="margin"):
        noninferiority(np.ones((5, 1)), np.ones((5, 1)), margin)


def test_identical_sides_do_not_pass_on_a_zero_standard_error():
    # Both sides all correct with one sample on 30 questions: zero observed spread, yet 30 samples cannot
    # certify a 5- or 10-point margin (a true 10-point drop shows no failure in 4% of such runs).
    ones = np.ones((30, 1))
    verdict = noninferiority(ones, ones, margin=0.05)
    assert verdict.stderr > 0 and math.isfinite(verdict.lower)
    assert verdict.verdict == "inconclusive"
    assert noninferiority(ones, ones, margin=0.10).verdict == "inconclusive"
    # With 16 samples per side the same clean sheet is strong evidence.
    many = np.ones((30, 16))
    assert noninferiority(many, many, margin=0.05).verdict == "pass"
    assert paired_difference(many, many).floored


def test_identical_greedy_answers_with_mixed_outcomes_give_a_finite_floor():
    rng = np.random.default_rng(1)
    outcomes = (rng.random((200, 1)) < 0.5).astype(float)
    result = paired_difference(outcomes, outcomes)
    assert result.delta == 0.0 and result.floored
    assert result.stderr == pytest.approx(math.sqrt(4 / (199 * 200)))


def test_the_quickstarts_96_questions_fail_a_collapse_once_the_baseline_answers_10():
    # configs/quickstart.yaml and the README: 96 one-sample MMLU questions at a 5-point margin fail a candidate that
    # answers none whenever the baseline answers 10 or more (it answers 16-17), and pass two identical sides.
    def collapse(baseline_correct: int) -> str:
        baseline = np.zeros((96, 1))
        baseline[:baseline_correct] = 1.0
        return noninferiority(np.zeros((96, 1)), baseline, margin=0.05).verdict

    assert [collapse(k) for k in (9, 10, 17)] == ["inconclusive", "fail", "fail"]
    same = np.zeros((96, 1))
    same[:17] = 1.0
    assert noninferiority(same, same, margin=0.05).verdict == "pass"


def test_a_single_paired_question_is_inconclusive():
    verdict = noninferiority([[1.0]], [[1.0]], margin=0.5)
    assert verdict.verdict == "inconclusive" and math.isinf(verdict.stderr)


def test_verdict_bounds_p_value_and_three_way_rule():
    rng = np.random.default_rng(2)
    base = (rng.random((100, 8)) < 0.7).astype(float)
    cand = base.copy()
    cand[:30, :4] = 0.0  # a clear drop of about 0.5 * 0.7 * 0.3 ~ 10 points
    verdict = noninferiority(cand, base, margin=0.02, alpha=0.05)
    half = sps.t.ppf(0.95, 99) * verdict.stderr
    assert (verdict.lower, verdict.upper) == pytest.approx((verdict.delta - half, verdict.delta + half))
    assert verdict.verdict == "fail" and verdict.upper < -0.02
    assert verdict.p_value > 0.5
    loose = noninferiority(cand, base, margin=0.30, alpha=0.05)
    assert loose.verdict == "pass" and loose.p_value < 0.05 and loose.lower > -0.30
    middle = noninferiority(cand, base, margin=-verdict.delta, alpha=0.05)
    assert middle.verdict == "inconclusive" and middle.p_value == pytest.approx(0.5)


def test_margin_zero_is_a_superiority_test():
    base = np.zeros((50, 4))
    cand = np.ones((50, 4))
    assert noninferiority(cand, base, margin=0.0).verdict == "pass"
    assert noninferiority(base, base, margin=0.0).verdict == "inconclusive"


def _beta_components(a: float, b: float) -> VarianceComponents:
    mean = a / (a + b)
    between = a * b / ((a + b) ** 2 * (a + b + 1))
    return VarianceComponents(mean, between, mean * (1 - mean) - between, "Beta(a, b)")


def test_variance_components_recover_the_between_within_split():
    rng = np.random.default_rng(3)
    truth = _beta_components(0.7, 0.5)
    p = rng.beta(0.7, 0.5, 4000)
    outcomes = (rng.random((4000, 6)) < p[:, None]).astype(float)
    outcomes[::7, 5] = np.nan  # uneven k per question
    est = variance_components(outcomes)
    assert est.mean == pytest.approx(truth.mean, abs=0.02)
    assert est.within == pytest.approx(truth.within, abs=0.01)
    assert est.between == pytest.approx(truth.between, abs=0.01)
    assert est.total == pytest.approx(truth.total, abs=0.01)


def test_variance_components_without_repeats_or_data():
    single = variance_components(np.array([[1.0], [0.0], [1.0], [1.0]]))
    assert single.between == 0.0 and single.within == pytest.approx(0.75 * 0.25)
    assert variance_components(np.full((3, 2), np.nan)) == WORST_CASE


def test_minimum_detectable_effect_matches_the_normal_formula_for_large_n_and_shrinks_with_k():
    comp = VarianceComponents(0.8, 0.1, 0.05, "test")
    # Reference table (eval-anchors E.4): AIME24, w=0.05, k=16 -> 3.6 points with normal quantiles.
    aime = minimum_detectable_effect(30, 16, alpha=0.05, power=0.8, components=comp)
    assert 0.036 <= aime <= 0.040  # t quantiles with 29 df are a little wider
    big = minimum_detectable_effect(100_000, 4, components=comp)
    z = sps.norm.ppf(0.95) + sps.norm.ppf(0.8)
    assert big == pytest.approx(z * math.sqrt(2 * 0.05 / 4 / 100_000), rel=1e-3)
    effects = [minimum_detectable_effect(198, k, components=comp) for k in (1, 2, 4, 8, 16)]
    assert effects == sorted(effects, reverse=True)
    # worst case is the most pessimistic
    assert minimum_detectable_effect(198, 4) > minimum_detectable_effect(198, 4, components=comp)


def test_samples_needed_is_the_smallest_k_that_reaches_the_margin():
    comp = _beta_components(0.7, 0.5)
    k = samples_needed(30, 0.1, components=comp)
    assert minimum_detectable_effect(30, k, components=comp) <= 0.1
    assert minimum_detectable_effect(30, k - 1, components=comp) > 0.1
    # a stored baseline with 2 samples caps what more candidate samples can buy
    assert samples_needed(30, 0.1, components=comp, k_baseline=2) is None
    fixed = samples_needed(30, 0.1, components=comp, k_baseline=64)
    assert fixed is not None and fixed < k
    with pytest.raises(ValueError, match="margin"):
        samples_needed(30, 0.0)


def test_questions_needed_is_the_smallest_n_that_reaches_the_margin():
    n = questions_needed(0.08, 0.10)
    assert n == 99  # (t_0.95 + t_0.8) * sqrt(0.10 / n) <= 0.08 first at n = 99
    assert questions_needed(0.08, 0.10, max_questions=98) is None
    assert questions_needed(0.05, 0.10) > n > questions_needed(0.10, 0.10)  # a tighter margin needs more
    assert questions_needed(0.08, 0.39) > 3 * n  # independent sides at p = 0.27 vs 10% discordance
    with pytest.raises(ValueError, match="margin"):
        questions_needed(0.0, 0.1)
    with pytest.raises(ValueError, match="variance"):
        questions_needed(0.05, 1.5)


@pytest.mark.parametrize(("discordance", "margin"), [(0.10, 0.08), (0.20, 0.05), (0.04, 0.03)])
def test_questions_needed_reaches_the_planned_power_by_simulation(discordance, margin):
    """Deterministic sides that answer a share `discordance` of the questions differently, half of those in
    each direction (no true difference): at the planned n the shipped test passes about 80% of runs."""
    n = questions_needed(margin, discordance, alpha=0.05, power=0.8)
    rng = np.random.default_rng(18)
    u = rng.random((4000, n))
    diffs = np.where(u < discordance / 2, 1.0, np.where(u < discordance, -1.0, 0.0))
    verdicts = noninferiority_rows(diffs, np.zeros_like(diffs), 1, 1, margin, 0.05).verdict
    assert 0.76 <= np.mean(verdicts == "pass") <= 0.88
    fewer = noninferiority_rows(diffs[:, : n // 2], np.zeros((4000, n // 2)), 1, 1, margin, 0.05).verdict
    assert np.mean(fewer == "pass") < 0.7  # half the questions fall short of the power


# ---- Monte-Carlo checks: the test keeps its level and reaches the planned power -------------------------

SIMS = 2000
# Heterogeneous per-question success probabilities, U-shaped like real benchmarks (many easy, many hard).
BETA_A, BETA_B = 0.7, 0.5


def _simulate(rng, n, k_cand, k_base, margin, true_drop, sims=SIMS):
    """Verdict frequencies over `sims` comparisons; each draws fresh questions p_i ~ Beta and samples.

    The candidate's success probabilities are the baseline's scaled so that E[p_c - p_b] = -true_drop exactly
    while staying in [0, 1] (the drop is larger on easy questions, as quantization damage tends to be).
    """
    mean_p = BETA_A / (BETA_A + BETA_B)
    p_base = rng.beta(BETA_A, BETA_B, (sims, n))
    p_cand = p_base * (1.0 - true_drop / mean_p)
    cand = (rng.random((sims, n, k_cand)) < p_cand[..., None]).astype(float)
    base = (rng.random((sims, n, k_base)) < p_base[..., None]).astype(float)
    counts = {"pass": 0, "fail": 0, "inconclusive": 0}
    for i in range(sims):
        counts[noninferiority(cand[i], base[i], margin).verdict] += 1
    return {name: count / sims for name, count in counts.items()}


# 3 binomial standard errors of a rate near the boundary over SIMS runs
TOLERANCE = 3 * math.sqrt(0.05 * 0.95 / SIMS)


@pytest.mark.parametrize(("n", "margin"), [(30, 0.10), (198, 0.05)])
def test_monte_carlo_level_power_and_regression_detection(n, margin):
    rng = np.random.default_rng(n)
    # Plan from a pilot baseline run, the way `evalpipe plan` does.
    pilot_p = rng.beta(BETA_A, BETA_B, n)
    pilot = (rng.random((n, 8)) < pilot_p[:, None]).astype(float)
    k = samples_needed(n, margin, alpha=0.05, power=0.8, components=variance_components(pilot))
    assert k is not None and 2 <= k <= 64

    at_margin = _simulate(rng, n, k, k, margin, true_drop=margin)
    assert at_margin["pass"] <= 0.05 + TOLERANCE

    no_difference = _simulate(rng, n, k, k, margin, true_drop=0.0)
    assert no_difference["pass"] >= 0.80 - 3 * math.sqrt(0.8 * 0.2 / SIMS)

    twice = _simulate(rng, n, k, k, margin, true_drop=2 * margin)
    assert twice["fail"] > 0.5 and twice["pass"] == 0.0


def test_monte_carlo_with_a_stored_baseline_of_different_k():
    rng = np.random.default_rng(7)
    n, margin, k_base = 60, 0.08, 16
    k = samples_needed(n, margin, components=_beta_components(BETA_A, BETA_B), k_baseline=k_base)
    assert k is not None and k < k_base
    at_margin = _simulate(rng, n, k, k_base, margin, true_drop=margin)
    assert at_margin["pass"] <= 0.05 + TOLERANCE
    no_difference = _simulate(rng, n, k, k_base, margin, true_drop=0.0)
    assert no_difference["pass"] >= 0.80 - 3 * math.sqrt(0.8 * 0.2 / SIMS)

