import math

import numpy as np
import pytest

from evalpipe.adaptive import (
    AdaptiveDesign,
    evaluate_look,
    questions_to_extend,
    replay,
    unbiased_question_means,
)
from evalpipe.comparison import SideOutcomes, compare_task

BETA_A, BETA_B = 0.7, 0.5


def test_looks_double_from_min_to_max_and_split_alpha():
    design = AdaptiveDesign(4, 20)
    assert design.looks == (4, 8, 16, 20)
    assert design.look_alpha(0.05) == pytest.approx(0.0125)
    assert AdaptiveDesign(4, 4).looks == (4,)
    with pytest.raises(ValueError, match="min_samples"):
        AdaptiveDesign(1, 8)
    with pytest.raises(ValueError, match="max_samples"):
        AdaptiveDesign(8, 4)


def test_questions_mixed_on_either_side_are_extended():
    cand = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=float)
    base = np.array([[1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=float)
    design = AdaptiveDesign(2, 8)
    # only the first two samples count: q0 cand (1,1), base (1,1) -> no; q1 base (1,0) -> yes
    assert questions_to_extend(cand, base, design).tolist() == [False, True, False, False]
    # a stored baseline is judged on all its samples
    stored = AdaptiveDesign(2, 8, baseline_adaptive=False)
    assert questions_to_extend(cand, base, stored).tolist() == [False, True, False, False]
    base[0, 3] = 0.0
    assert questions_to_extend(cand, base, stored).tolist() == [True, True, False, False]
    assert questions_to_extend(cand, base, design).tolist() == [False, True, False, False]


def _adaptive_sample(rng, p_cand, p_base, design, sims):
    """Outcome tensors (sims, n, max) after one extension to max_samples, NaN where not sampled."""
    shape = (sims, p_cand.size, design.max_samples)
    full_c = (rng.random(shape) < p_cand[None, :, None]).astype(float)
    full_b = (rng.random(shape) < p_base[None, :, None]).astype(float)
    first = design.min_samples
    mixed = lambda x: (x[..., :first].sum(-1) > 0) & (x[..., :first].sum(-1) < first)  # noqa: E731
    stop = ~(mixed(full_c) | mixed(full_b))
    full_c[..., first:][stop] = np.nan
    full_b[..., first:][stop] = np.nan
    return full_c, full_b


def test_rao_blackwell_estimates_are_unbiased_where_plain_means_are_not():
    rng = np.random.default_rng(0)
    design = AdaptiveDesign(4, 16)
    p_base = rng.beta(BETA_A, BETA_B, 100)
    p_cand = p_base * (1 - 0.08 / p_base.mean())  # a true 8-point drop
    cand, base = _adaptive_sample(rng, p_cand, p_base, design, sims=300)
    plain, unbiased = [], []
    for c, b in zip(cand, base, strict=True):
        plain.append(np.nanmean(c, axis=1).mean() - np.nanmean(b, axis=1).mean())
        c_means, b_means = unbiased_question_means(c, b, design)
        unbiased.append((c_means - b_means).mean())
    assert np.mean(unbiased) == pytest.approx(-0.08, abs=0.004)  # ~5 simulation standard errors
    assert np.mean(plain) > -0.07  # the naive estimate shrinks the drop by a fifth or more


def test_data_that_do_not_follow_the_rule_keep_plain_means():
    # question extended although unanimous on both sides in the first stage
    cand = np.array([[1, 1, 0, 1], [1, 0, 1, 1]], dtype=float)
    base = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=float)
    c_means, b_means = unbiased_question_means(cand, base, AdaptiveDesign(2, 4))
    assert c_means[0] == pytest.approx(0.75) and b_means[0] == pytest.approx(1.0)
    assert c_means[1] != pytest.approx(0.75)  # mixed: Rao-Blackwell estimate


def test_a_look_uses_only_samples_before_k_so_a_replay_decides_the_same():
    rng = np.random.default_rng(1)
    design = AdaptiveDesign(2, 8)
    cand = (rng.random((40, 8)) < 0.6).astype(float)
    base = (rng.random((40, 8)) < 0.6).astype(float)
    first = evaluate_look(cand[:, :2], base[:, :2], design, 2, margin=0.05, alpha=0.05)
    replay = evaluate_look(cand, base, design, 2, margin=0.05, alpha=0.05)  # journal holds more samples
    assert first.verdict == replay.verdict and first.next_k == replay.next_k == 4
    np.testing.assert_array_equal(first.extend, replay.extend)
    assert first.verdict.alpha == pytest.approx(0.05 / 3)
    with pytest.raises(ValueError, match="not a look"):
        evaluate_look(cand, base, design, 3, margin=0.05, alpha=0.05)


def test_a_decided_look_stops():
    ones = np.ones((200, 4))
    look = evaluate_look(ones, ones, AdaptiveDesign(4, 16), 4, margin=0.05, alpha=0.05)
    assert look.verdict.verdict == "pass" and look.next_k is None and not look.extend.any()


def _run_adaptive(full_c, full_b, design, margin):
    """The adaptive procedure the orchestrator drives, on pre-drawn outcomes: (final look, samples used)."""
    cand = np.full(full_c.shape, np.nan)
    base = np.full(full_b.shape, np.nan) if design.baseline_adaptive else full_b
    k = design.min_samples
    cand[:, :k] = full_c[:, :k]
    if design.baseline_adaptive:
        base[:, :k] = full_b[:, :k]
    while True:
        look = evaluate_look(cand, base, design, k, margin, alpha=0.05)
        if look.next_k is None:
            return look, int(np.sum(~np.isnan(cand)))
        rows, upto = look.extend, look.next_k
        cand[rows, k:upto] = full_c[rows, k:upto]
        if design.baseline_adaptive:
            base[rows, k:upto] = full_b[rows, k:upto]
        k = upto


def _run_by_replay(full_c, full_b, design, margin):
    """The same procedure driven the way a (resumable) run drives it: replay, send what is wanted, repeat."""
    width = design.max_samples
    cand_issued = np.zeros(full_c.shape, bool)
    base_issued = np.zeros(full_b.shape, bool) if design.baseline_adaptive else np.ones(full_b.shape, bool)
    while True:
        cand, base = np.where(cand_issued, full_c, np.nan), np.where(base_issued, full_b, np.nan)
        progress = replay(cand, cand_issued, base, base_issued, design, margin, alpha=0.05)
        if progress.finished:
            return progress.look, int(cand_issued.sum())
        assert progress.wanted.shape == (full_c.shape[0], width)
        cand_issued |= progress.wanted
        if design.baseline_adaptive:
            base_issued |= progress.wanted


@pytest.mark.parametrize("baseline_adaptive", [True, False])
def test_replay_from_issued_samples_reaches_the_same_decision_and_ignores_extra_samples(baseline_adaptive):
    rng = np.random.default_rng(5)
    design = AdaptiveDesign(2, 16, baseline_adaptive=baseline_adaptive)
    for drop in (0.0, 0.1, 0.3):
        p = rng.beta(BETA_A, BETA_B, 40)
        full_c = (rng.random((40, 16)) < (p * (1 - drop))[:, None]).astype(float)
        full_b = (rng.random((40, 16)) < p[:, None]).astype(float)
        direct, used = _run_adaptive(full_c, full_b, design, margin=0.1)
        replayed, used_by_replay = _run_by_replay(full_c, full_b, design, margin=0.1)
        assert (replayed.k, replayed.verdict) == (direct.k, direct.verdict) and used_by_replay == used
        # a journal holding every sample (e.g. from an interrupted later stage) replays to the same look
        everything = np.ones(full_c.shape, bool)
        again = replay(full_c, everything, full_b, everything, design, 0.1, 0.05)
        assert again.finished and (again.look.k, again.look.verdict) == (direct.k, direct.verdict)


def test_replay_waits_for_the_first_stage():
    design = AdaptiveDesign(4, 16)
    cand = np.full((5, 16), np.nan)
    issued = np.zeros((5, 16), bool)
    progress = replay(cand, issued, cand, issued, design, 0.1, 0.05)
    assert progress.look is None and not progress.finished
    assert progress.wanted[:, :4].all() and not progress.wanted[:, 4:].any()


def _simulate_adaptive(rng, n, margin, true_drop, design, sims=2000):
    counts = {"pass": 0, "fail": 0, "inconclusive": 0}
    used = 0
    mean_p = BETA_A / (BETA_A + BETA_B)
    for _ in range(sims):
        p_base = rng.beta(BETA_A, BETA_B, n)
        p_cand = p_base * (1 - true_drop / mean_p)
        full_c = (rng.random((n, design.max_samples)) < p_cand[:, None]).astype(float)
        full_b = (rng.random((n, design.max_samples)) < p_base[:, None]).astype(float)
        look, samples = _run_adaptive(full_c, full_b, design, margin)
        counts[look.verdict.verdict] += 1
        used += samples
    return {name: c / sims for name, c in counts.items()}, used / (sims * n)


def test_monte_carlo_adaptive_sampling_keeps_the_level_and_saves_samples():
    rng = np.random.default_rng(2)
    n, margin, sims = 30, 0.10, 2000
    design = AdaptiveDesign(4, 16)
    at_margin, _ = _simulate_adaptive(rng, n, margin, margin, design, sims)
    assert at_margin["pass"] <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / sims)
    no_difference, samples = _simulate_adaptive(rng, n, margin, 0.0, design, sims)
    assert no_difference["pass"] >= 0.8
    assert samples < 0.6 * design.max_samples  # most questions stop at the first stage
    twice, _ = _simulate_adaptive(rng, n, margin, 2 * margin, design, sims)
    assert twice["fail"] > 0.5 and twice["pass"] == 0.0


def test_monte_carlo_adaptive_against_a_stored_baseline():
    rng = np.random.default_rng(3)
    design = AdaptiveDesign(4, 16, baseline_adaptive=False)
    at_margin, _ = _simulate_adaptive(rng, 30, 0.10, 0.10, design, sims=1000)
    assert at_margin["pass"] <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 1000)


def test_compare_task_with_an_adaptive_design_uses_the_per_look_alpha_and_unbiased_means():
    rng = np.random.default_rng(4)
    design = AdaptiveDesign(2, 8)
    p = rng.beta(BETA_A, BETA_B, 50)
    cand, base = _adaptive_sample(rng, p, p, design, sims=1)
    ids = tuple(f"q{i}" for i in range(50))
    none = np.zeros((50, 8), bool)
    result = compare_task("t", SideOutcomes(ids, cand[0], none, none), SideOutcomes(ids, base[0], none, none),
                          margin=0.1, design=design)
    c_means, b_means = unbiased_question_means(cand[0], base[0], design)
    assert result.test.alpha == pytest.approx(0.05 / 3)
    assert result.test.delta == pytest.approx((c_means - b_means).mean())
    assert result.candidate.accuracy - result.baseline.accuracy == pytest.approx(result.test.delta)
