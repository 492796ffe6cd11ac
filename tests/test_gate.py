import xml.etree.ElementTree as ET

import numpy as np
import pytest
from pydantic import ValidationError

from evalpipe.comparison import compare_task
from evalpipe.config import GateConfig
from evalpipe.gate import EXIT_INFRASTRUCTURE, EXIT_PASS, EXIT_REGRESSION, apply_gate, decide_task
from evalpipe.outcomes import SideOutcomes
from evalpipe.render.junit import junit_xml

N, K = 100, 8


def _sides(drop: float, seed: int = 0, truncate_cand: float = 0.0, error_cand: float = 0.0):
    rng = np.random.default_rng(seed)
    ids = tuple(f"q{i}" for i in range(N))
    p = rng.beta(0.7, 0.5, N)
    base = (rng.random((N, K)) < p[:, None]).astype(float)
    cand = (rng.random((N, K)) < (p * (1 - drop))[:, None]).astype(float)
    truncated = rng.random((N, K)) < truncate_cand
    cand[truncated] = 0.0
    errored = rng.random((N, K)) < error_cand
    cand[errored] = np.nan
    truncated &= ~errored
    none = np.zeros((N, K), bool)
    return SideOutcomes(ids, cand, truncated, errored), SideOutcomes(ids, base, none, none)


def _decide(config: GateConfig, task: str = "math500", **side_args):
    cand, base = _sides(**side_args)
    rule = config.for_task(task)
    return decide_task(compare_task(task, cand, base, rule.margin, rule.alpha), rule)


def test_per_task_overrides_replace_gate_wide_settings():
    config = GateConfig(margin=0.02, tasks={"aime24": {"margin": 0.1, "max_truncation_rate": 0.2}})
    aime, mmlu = config.for_task("aime24"), config.for_task("mmlu")
    assert (aime.margin, aime.max_truncation_rate, aime.alpha) == (0.1, 0.2, 0.05)
    # no hard truncation cap by default (a noisy observed rate); the truncation test's margin follows margin
    assert (mmlu.margin, mmlu.max_truncation_rate, mmlu.on_inconclusive) == (0.02, None, "fail")
    assert (mmlu.truncation_margin, aime.truncation_margin) == (0.02, 0.1)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"margin": -0.1}, "margin"),
        ({"alpha": 1.5}, "alpha"),
        ({"on_inconclusive": "maybe"}, "on_inconclusive"),
        ({"tasks": {"aime24": {"margn": 0.1}}}, "tasks.aime24.margn"),
        ({"max_error_rate": 2}, "max_error_rate"),
    ],
)
def test_bad_gate_config_names_the_field(raw, field):
    with pytest.raises(ValidationError) as info:
        GateConfig.model_validate(raw)
    locations = [".".join(str(part) for part in error["loc"]) for error in info.value.errors()]
    assert field in locations


def test_no_difference_passes_and_a_large_drop_fails_with_numbers():
    config = GateConfig(margin=0.1)
    ok = _decide(config, drop=0.0)
    assert ok.status == "pass" and ok.reasons == ()
    bad = _decide(config, drop=0.5)
    assert bad.status == "fail" and bad.verdict == "fail"
    assert "delta" in bad.summary and "95% CI" in bad.summary and "margin -10.0 pts" in bad.summary
    assert bad.reasons[0].startswith("regression")


def test_inconclusive_follows_on_inconclusive():
    tight = GateConfig(margin=0.001)
    decision = _decide(tight, drop=0.0)
    assert decision.verdict == "inconclusive" and decision.status == "fail"
    assert "evalpipe plan" in decision.reasons[0]
    lenient = GateConfig(margin=0.001, on_inconclusive="pass")
    assert _decide(lenient, drop=0.0).status == "pass"


def test_truncation_above_the_limit_cannot_pass_and_says_raise_max_tokens():
    config = GateConfig(margin=0.5, max_truncation_rate=0.05)
    decision = _decide(config, drop=0.0, truncate_cand=0.2)
    assert decision.verdict == "pass" and decision.status == "fail"
    assert any("raise max_tokens" in reason and "candidate truncated" in reason for reason in decision.reasons)
    allowed = GateConfig(margin=0.5, max_truncation_rate=0.5)
    assert _decide(allowed, drop=0.0, truncate_cand=0.2).status == "pass"


def test_error_rate_above_the_limit_is_an_infrastructure_error():
    decision = _decide(GateConfig(max_error_rate=0.01), drop=0.0, error_cand=0.1)
    assert decision.status == "error"
    assert "error rate" in decision.reasons[0] and "max_error_rate" in decision.reasons[0]


def _three_tasks():
    """mmlu unchanged, aime24 halved, gpqa unchanged but with 20% failed requests on the candidate."""
    comparisons = {}
    for task, args in {"mmlu": {"drop": 0.0}, "aime24": {"drop": 0.5}, "gpqa": {"drop": 0.0, "error_cand": 0.2}}.items():
        cand, base = _sides(**args)
        comparisons[task] = compare_task(task, cand, base, 0.1)
    return comparisons


def test_exit_code_is_the_worst_task():
    config = GateConfig(margin=0.1, max_error_rate=0.01)
    comparisons = _three_tasks()
    assert apply_gate({"mmlu": comparisons["mmlu"]}, config).exit_code == EXIT_PASS
    two = apply_gate({t: comparisons[t] for t in ("mmlu", "aime24")}, config)
    assert two.exit_code == EXIT_REGRESSION and two.status == "fail"
    everything = apply_gate(comparisons, config)
    assert everything.exit_code == EXIT_INFRASTRUCTURE
    assert everything.to_dict()["tasks"]["aime24"]["status"] == "fail"


def test_junit_has_one_testcase_per_task_with_numbers_in_failures():
    config = GateConfig(margin=0.1, max_error_rate=0.01)
    comparisons = _three_tasks()
    root = ET.fromstring(junit_xml(apply_gate(comparisons, config)))
    suite = root.find("testsuite")
    assert suite.get("tests") == "3" and suite.get("failures") == "1" and suite.get("errors") == "1"
    cases = {case.get("name"): case for case in suite.findall("testcase")}
    assert set(cases) == {"mmlu", "aime24", "gpqa"}
    failure = cases["aime24"].find("failure")
    assert failure is not None and "delta" in failure.text and "pts" in failure.text
    assert "regression" in failure.get("message")
    assert cases["gpqa"].find("error") is not None
    assert cases["mmlu"].find("failure") is None and "pass" in cases["mmlu"].find("system-out").text


def test_an_inconclusive_task_never_reads_pass_and_says_how_it_counted():
    from evalpipe.render.comparison import gate_lines

    lenient = GateConfig(margin=0.001, on_inconclusive="pass")
    decision = _decide(lenient, drop=0.0)
    assert decision.status == "pass" and decision.shown == "inconclusive" and decision.counted_as == "pass"
    document = {"gate": apply_gate({"math500": compare_task("math500", *_sides(0.0), 0.001)}, lenient).to_dict()}
    line = gate_lines(document)[0]
    assert line.startswith("math500: INCONCLUSIVE (counted as pass) - ") and "PASS" not in line
    root = ET.fromstring(junit_xml(apply_gate({"math500": compare_task("math500", *_sides(0.0), 0.001)}, lenient)))
    assert root.find("testsuite").get("skipped") == "1"  # undecided, not green
    assert root.find("testsuite/testcase/skipped").get("message") == "INCONCLUSIVE (counted as pass)"


def test_truncation_is_judged_by_a_test_on_the_increase_not_a_cut():
    tested = GateConfig(margin=0.5, truncation_margin=0.05)
    decision = _decide(tested, drop=0.0, truncate_cand=0.2)
    assert decision.verdict == "pass" and decision.status == "fail" and decision.shown == "fail"
    assert any(reason.startswith("truncation:") and "raise max_tokens" in reason for reason in decision.reasons)
    assert decision.truncation["verdict"] == "fail" and decision.truncation["lower"] > 0.05
    assert _decide(GateConfig(margin=0.5, truncation_margin="off"), drop=0.0, truncate_cand=0.2).status == "pass"
    # the same small truncation on both sides passes (no hard cut on a noisy rate)
    assert _decide(GateConfig(margin=0.5, truncation_margin=0.05), drop=0.0).status == "pass"
