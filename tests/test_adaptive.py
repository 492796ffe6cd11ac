import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from evalpipe.adaptive import (
    AdaptiveDesign,
    adjusted_inference,
    crossing_probability,
    evaluate_look,
    replay,
    simulate_decision,
    spending_boundaries,
)
from evalpipe.comparison import TaskResult, compare_sides
from evalpipe.outcomes import SideOutcomes
from evalpipe.stats import noninferiority
from evalpipe.drop_patterns import DROP_PATTERNS, dropped_probabilities

BETA_A, BETA_B = 0.7, 0.5


def test_looks_double_from_min_to_max():
    assert AdaptiveDesign(4, 20).looks == (4, 8, 16, 20)
    assert AdaptiveDesign(4, 4).looks == (4,)
    with pytest.raises(ValueError, match="min_samples"):
        AdaptiveDesign(1, 8)
    with pytest.raises(ValueError, match="max_samples"):
        AdaptiveDesign(8, 4)
    with pytest.raises(ValueError, match="spending"):
        AdaptiveDesign(4, 8, "haybittle")


def test_boundaries_match_the_published_lan_demets_values():
    # Jennison & Turnbull (2000), Lan-DeMets spending, 4 and 5 equally spaced looks, one-sided 0.025
    assert spending_boundaries((1, 2, 3, 4), 0.025, "obrien-fleming") == pytest.approx(
        (4.3326, 2.9631, 2.3590, 2.0141), abs=2e-3)
    assert spending_boundaries((1, 2, 3, 4, 5), 0.025, "pocock") == pytest.approx(
        (2.438, 2.427, 2.410, 2.397, 2.386), abs=2e-3)
    # one look: the fixed test
    assert AdaptiveDesign(8, 8).nominal_levels(0.05) == pytest.approx((0.05,))


def test_crossing_probability_agrees_with_the_bivariate_normal():
    rho = math.sqrt(4 / 9)
    both_below = scipy_stats.multivariate_normal([0, 0], [[1, rho], [rho, 1]]).cdf([1.5, 2.0])
    assert crossing_probability([1.5, 2.0], [4.0, 9.0]) == pytest.approx(1 - both_below, abs=2e-4)
    assert crossing_probability([1.96], [3.0]) == pytest.approx(0.025, abs=1e-4)


def _draw(rng, p_cand, p_base, width):
    return ((rng.random((p_cand.size, width)) < p_cand[:, None]).astype(float),
            (rng.random((p_base.size, width)) < p_base[:, None]).astype(float))


def _rates(rng, design, p_base, drop, pattern, sims, margin):
    """P(pass), P(fail) and mean candidate samples per question of the sequential design."""
    verdicts, used = [], 0
    for _ in range(sims):
        cand, base = _draw(rng, dropped_probabilities(rng, p_base, drop, pattern), p_base, design.max_samples)
        decision = simulate_decision(cand, base, design, margin, 0.05)
        verdicts.append(decision.verdict)
        used += decision.candidate_samples
    return verdicts.count("pass") / sims, verdicts.count("fail") / sims, used / (sims * p_base.size)


def test_each_look_holds_its_level_with_the_plain_paired_t_statistic():
    rng = np.random.default_rng(11)
    p_base = rng.beta(BETA_A, BETA_B, 30)
    sims, margin = 1500, 0.10
    for k in (4, 16):
        passes = 0
        for _ in range(sims):
            cand, base = _draw(rng, dropped_probabilities(rng, p_base, margin, "logit"), p_base, k)
            passes += noninferiority(cand, base, margin, 0.05).verdict == "pass"
        assert passes / sims <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / sims)


@pytest.mark.parametrize("pattern", DROP_PATTERNS)
def test_overall_pass_rate_at_the_margin_is_at_most_alpha(pattern):
    rng = np.random.default_rng(12)
    p_base = rng.beta(BETA_A, BETA_B, 30)  # a fixed question set
    sims = 1200
    passed, _, _ = _rates(rng, AdaptiveDesign(4, 16), p_base, 0.10, pattern, sims, margin=0.10)
    assert passed <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / sims)


def test_looking_at_the_nominal_level_every_time_would_not_hold_the_level():
    """What the spending function corrects: three looks at 0.05 each pass too often at the margin."""
    rng = np.random.default_rng(13)
    p_base = np.full(200, 0.5)
    sims, passes = 1500, 0
    for _ in range(sims):
        cand, base = _draw(rng, p_base - 0.05, p_base, 16)
        passes += any(noninferiority(cand[:, :k], base[:, :k], 0.05, 0.05).verdict == "pass" for k in (4, 8, 16))
    assert passes / sims > 0.075
    sequential = sum(simulate_decision(*_draw(rng, p_base - 0.05, p_base, 16), AdaptiveDesign(4, 16), 0.05,
                                       0.05).verdict == "pass" for _ in range(sims))
    assert sequential / sims <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / sims)


def test_sequential_design_saves_samples_and_keeps_the_power_of_the_fixed_design_of_equal_cost():
    rng = np.random.default_rng(14)
    p_base = rng.beta(BETA_A, BETA_B, 30)
    design, margin, sims = AdaptiveDesign(4, 16), 0.10, 800
    identical_pass, _, identical_cost = _rates(rng, design, p_base, 0.0, "proportional", sims, margin)
    assert identical_pass >= 0.95 and identical_cost < 0.75 * design.max_samples
    # power (P(fail)) at margin + 3 points against the fixed design with the same expected samples, on the
    # same draws (common random numbers)
    sequential_fails, costs, fixed_fails = 0, 0, {}
    draws = []
    for _ in range(sims):
        cand, base = _draw(rng, dropped_probabilities(rng, p_base, margin + 0.03, "proportional"), p_base, 16)
        decision = simulate_decision(cand, base, design, margin, 0.05)
        sequential_fails += decision.verdict == "fail"
        costs += decision.candidate_samples
        draws.append((cand, base))
    expected_k = costs / (sims * p_base.size)
    for k in (math.floor(expected_k), math.ceil(expected_k)):
        fixed_fails[k] = sum(noninferiority(c[:, :k], b[:, :k], margin, 0.05).verdict == "fail" for c, b in draws)
    low, high = math.floor(expected_k), math.ceil(expected_k)
    fixed_at_cost = fixed_fails[low] + (expected_k - low) * (fixed_fails[high] - fixed_fails[low])
    assert sequential_fails >= fixed_at_cost - 0.01 * sims


def test_a_look_uses_only_samples_before_k_so_a_replay_decides_the_same():
    rng = np.random.default_rng(1)
    design = AdaptiveDesign(2, 8)
    cand = (rng.random((40, 8)) < 0.6).astype(float)
    base = (rng.random((40, 8)) < 0.6).astype(float)
    first = evaluate_look(cand[:, :2], base[:, :2], design, 2, margin=0.05, alpha=0.05)
    again = evaluate_look(cand, base, design, 2, margin=0.05, alpha=0.05)  # journal holds more samples
    assert first.verdict == again.verdict and first.next_k == again.next_k == 4
    assert first.verdict.alpha == pytest.approx(design.nominal_levels(0.05)[0]) and first.verdict.alpha < 0.01
    with pytest.raises(ValueError, match="not a look"):
        evaluate_look(cand, base, design, 3, margin=0.05, alpha=0.05)


def test_a_decided_look_stops():
    ones = np.ones((200, 4))
    look = evaluate_look(ones, ones, AdaptiveDesign(4, 16), 4, margin=0.05, alpha=0.05)
    assert look.verdict.verdict == "pass" and look.next_k is None


def _run_by_replay(full_c, full_b, design, margin):
    """The procedure driven the way a (resumable) run drives it: replay, send what is wanted, repeat."""
    cand_issued = np.zeros(full_c.shape, bool)
    base_issued = np.zeros(full_b.shape, bool) if design.baseline_adaptive else np.ones(full_b.shape, bool)
    while True:
        cand, base = np.where(cand_issued, full_c, np.nan), np.where(base_issued, full_b, np.nan)
        progress = replay(cand, cand_issued, base, base_issued, design, margin, alpha=0.05)
        if progress.finished:
            return progress.look, int(cand_issued.sum())
        cand_issued |= progress.wanted
        if design.baseline_adaptive:
            base_issued |= progress.wanted


@pytest.mark.parametrize("baseline_adaptive", [True, False])
def test_replay_from_issued_samples_reaches_the_decision_of_the_simulation(baseline_adaptive):
    rng = np.random.default_rng(5)
    design = AdaptiveDesign(2, 16, baseline_adaptive=baseline_adaptive)
    for drop in (0.0, 0.1, 0.3):
        p = rng.beta(BETA_A, BETA_B, 40)
        full_c, full_b = _draw(rng, p * (1 - drop), p, 16)
        direct = simulate_decision(full_c, full_b, design, 0.1, 0.05)
        replayed, used = _run_by_replay(full_c, full_b, design, margin=0.1)
        assert (replayed.k, replayed.verdict.verdict) == (direct.looks[-1].k, direct.verdict)
        assert used == direct.candidate_samples == 40 * replayed.k


def test_replay_waits_for_the_first_stage():
    design = AdaptiveDesign(4, 16)
    cand = np.full((5, 16), np.nan)
    issued = np.zeros((5, 16), bool)
    progress = replay(cand, issued, cand, issued, design, 0.1, 0.05)
    assert progress.look is None and not progress.finished
    assert progress.wanted[:, :4].all() and not progress.wanted[:, 4:].any()


def test_adjusted_inference_is_the_t_test_for_one_look_and_agrees_with_the_verdict():
    rng = np.random.default_rng(6)
    p = rng.beta(BETA_A, BETA_B, 30)
    cand, base = _draw(rng, p * 0.9, p, 16)
    single = AdaptiveDesign(16, 16)
    decision = simulate_decision(cand, base, single, 0.1, 0.05)
    adjusted = adjusted_inference(decision.looks, single, 0.1, 0.05)
    fixed = noninferiority(cand, base, 0.1, 0.05)
    assert adjusted.p_value == pytest.approx(fixed.p_value, rel=1e-4)
    assert (adjusted.lower, adjusted.upper) == pytest.approx((fixed.lower, fixed.upper), abs=1e-5)
    design = AdaptiveDesign(4, 16)
    for drop in (0.0, 0.1, 0.25):
        cand, base = _draw(rng, dropped_probabilities(rng, p, drop, "proportional"), p, 16)
        decision = simulate_decision(cand, base, design, 0.1, 0.05)
        adjusted = adjusted_inference(decision.looks, design, 0.1, 0.05)
        assert (decision.verdict == "pass") == (adjusted.p_value <= 0.05) == (adjusted.lower > -0.1)
        assert (decision.verdict == "fail") == (adjusted.upper < -0.1)
        assert adjusted.ci95[0] < adjusted.median_unbiased < adjusted.ci95[1]


def test_adjusted_interval_covers_the_true_drop():
    rng = np.random.default_rng(7)
    p = np.full(60, 0.5)
    design, sims, covered = AdaptiveDesign(4, 16), 120, 0
    for _ in range(sims):
        cand, base = _draw(rng, p - 0.05, p, 16)
        decision = simulate_decision(cand, base, design, 0.02, 0.05)  # stops early often: pass or fail
        low, high = adjusted_inference(decision.looks, design, 0.02, 0.05).ci95
        covered += low <= -0.05 <= high
    assert covered / sims >= 0.95 - 3 * math.sqrt(0.05 * 0.95 / sims)


def test_compare_sides_records_the_sequential_design_and_adjusted_inference():
    rng = np.random.default_rng(4)
    p = rng.beta(BETA_A, BETA_B, 50)
    cand, base = _draw(rng, p, p, 8)
    ids = tuple(f"q{i}" for i in range(50))
    none = np.zeros((50, 8), bool)
    sides = [{"t": TaskResult("h", {}, SideOutcomes(ids, outcomes, none, none), (2, 8, "pocock"))}
             for outcomes in (cand, base)]
    result = compare_sides(*sides, lambda task: (0.1, 0.05))["t"]
    section = result.to_dict()["sequential"]
    decision = simulate_decision(cand, base, AdaptiveDesign(2, 8, "pocock"), 0.1, 0.05)
    assert section["design"]["spending"] == "pocock" and section["design"]["looks"] == [2, 4, 8]
    assert section["stopped_at"] == decision.looks[-1].k and result.verdict == decision.verdict
    assert [look["k"] for look in section["looks_taken"]] == [look.k for look in decision.looks]
    assert result.test.p_value == section["adjusted"]["p_value"]
    assert result.test.lower == pytest.approx(section["adjusted"]["lower"])


def test_config_spending_defaults_to_obrien_fleming_and_needs_samples_auto():
    from pydantic import ValidationError

    from evalpipe.config import TaskEntry

    assert TaskEntry(task="aime24", samples="auto").spending == "obrien-fleming"
    assert TaskEntry(task="aime24", samples="auto", spending="pocock").spending == "pocock"
    with pytest.raises(ValidationError, match="apply only with samples: auto"):
        TaskEntry(task="aime24", samples=4, spending="pocock")
    with pytest.raises(ValidationError, match="spending"):
        TaskEntry(task="aime24", samples="auto", spending="haybittle")
