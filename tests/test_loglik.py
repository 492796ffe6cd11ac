"""Log-likelihood multiple choice (scoring.method: loglikelihood): the pure scoring functions, the cards' rules, and
`evalpipe run` end to end against the fake server (one /v1/completions request per question, one prompt per
option, echo + logprobs), paired per question like every other task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evalpipe.cards import TaskCard, load_card
from evalpipe.errors import UserError
from evalpipe.journal import read_journal
from evalpipe.runner import plan_from_config
from evalpipe.scoring import continuation_logprob, loglikelihood_choice
from evalpipe.stats import questions_needed
from evalpipe.testing.fake_server import FakeServer, answer_key_for_plans
from orch_helpers import needs_shared_data, run_cli, write_config


def echoed(tokens: list[str], values: list[float | None]) -> dict:
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": values, "text_offset": offsets}


def test_continuation_logprob_sums_the_tokens_after_the_context_and_drops_the_generated_one() -> None:
    block = echoed(["Q", ":", " 2+2", "?", " fo", "ur", " so"], [None, -1.0, -2.0, -0.5, -0.25, -0.125, -9.0])
    assert continuation_logprob(block, " four") == (-0.375, 6)
    # a context character split over two tokens (each shown as U+FFFD) does not move the continuation
    split = echoed(["caf", "\ufffd", "\ufffd", " Answer:", " A", "."], [None, -1.0, -1.0, -1.0, -0.5, -2.0])
    assert continuation_logprob(split, " A") == (-0.5, 5)
    # and one split inside the continuation is matched to the character it spells
    forall = echoed(["Answer:", " (", "\ufffd", "\ufffd", "x)", " so"], [None, -1.0, -0.5, -0.25, -0.125, -3.0])
    assert continuation_logprob(forall, " (∀x)") == (-1.875, 5)


def test_a_token_across_the_context_boundary_is_an_error_not_a_guess() -> None:
    block = echoed(["Answer", ": A", " so"], [None, -1.0, -2.0])
    with pytest.raises(ValueError, match="on a token boundary"):
        continuation_logprob(block, " A")
    with pytest.raises(ValueError, match="no logprob"):
        continuation_logprob(echoed(["Answer:", " A", " so"], [None, None, -1.0]), " A")


def test_acc_picks_the_most_likely_option_acc_norm_the_most_likely_per_byte() -> None:
    # a long option with a lower total but a higher per-byte log-likelihood: acc and acc_norm disagree
    assert loglikelihood_choice([-3.0, -4.0, -9.0], [" Paris", " a large city in Europe", " Rome"]) == (0, 1)
    assert loglikelihood_choice([-1.0, -1.0], [" A", " B"]) == (0, 0)  # ties: the first option


def _card(**changes: object) -> dict:
    data = load_card("mmlu_loglik").model_dump(mode="json")
    for dotted, value in changes.items():
        section, field = dotted.split("__")
        data[section][field] = value
    return data


@pytest.mark.parametrize(("changes", "message"), [
    ({"scoring__extract": ["mc_answer_marker"]}, "extracts nothing"),
    ({"scoring__answer_type": "math"}, "must be multiple_choice"),
    ({"prompt__continuation": None}, "continuation is given exactly for"),
    ({"prompt__system": "be brief"}, "without a chat template"),
    ({"scoring__method": "generate"}, "needs an extraction ladder"),
])
def test_inconsistent_loglikelihood_cards_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TaskCard.model_validate(_card(**changes))


def test_a_cloze_card_may_leave_the_options_out_of_the_prompt() -> None:
    card = TaskCard.model_validate(_card(prompt__template="Question: {question}\nAnswer:",
                                         prompt__continuation=" {text}"))
    assert card.card_hash != load_card("mmlu_loglik").card_hash


TASKS = [{"task": "mmlu_loglik", "limit": 24}, {"task": "gpqa_diamond_loglik", "limit": 8}]


def _run_against(server: FakeServer, config: Path):
    """Point the config's candidate at the fake server and run it through the CLI."""
    data = yaml.safe_load(config.read_text())
    data["candidate"]["base_url"] = server.base_url
    config.write_text(yaml.safe_dump(data))
    return run_cli("run", str(config))


@needs_shared_data
def test_loglikelihood_tasks_run_end_to_end_one_record_per_question(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.yaml", "http://127.0.0.1:1/v1", TASKS)
    _, plans = plan_from_config(config)
    assert [p.card.scoring.method for p in plans] == ["loglikelihood", "loglikelihood"]
    request = plans[1].requests[0]
    assert request.continuations == (" (A)", " (B)", " (C)", " (D)")
    with FakeServer({"answer_key": answer_key_for_plans(plans), "accuracy": 0.5}) as server:
        result = _run_against(server, config)
        assert result.exit_code == 0, result.output
        sent = [r for r in server.requests if r["endpoint"] == "completions"]
    assert len(sent) == 4 * (24 + 8)  # one prompt per option, nothing generated beyond one token
    run_dir = Path(result.output.strip().splitlines()[-1])
    records = read_journal(run_dir / "candidate" / "journal.jsonl")
    assert len(records) == 32 and {r.rule for r in records} == {"loglikelihood"}
    assert all(r.outcome in ("correct", "wrong") and len(r.option_logprobs) == 4 for r in records)
    # the oracle's pick is the most likely option: it is what was extracted, and right about half the time
    for r in records:
        assert r.extracted == r.extracted_norm == "ABCD"[r.option_logprobs.index(max(r.option_logprobs))]
    summary = json.loads((run_dir / "candidate" / "summary.json").read_text())["tasks"]
    for task, n in (("mmlu_loglik", 24), ("gpqa_diamond_loglik", 8)):
        mine = [r for r in records if r.task == task]
        assert summary[task]["n_questions"] == n
        assert summary[task]["accuracy"] == summary[task]["acc_norm"] == sum(r.outcome == "correct" for r in mine) / n
    assert 0.2 < summary["mmlu_loglik"]["accuracy"] < 0.8


@needs_shared_data
def test_an_oracle_that_always_knows_scores_every_question(tmp_path: Path) -> None:
    config = write_config(tmp_path / "run.yaml", "http://127.0.0.1:1/v1", TASKS[:1])
    _, plans = plan_from_config(config)
    with FakeServer({"answer_key": answer_key_for_plans(plans), "accuracy": 1.0}) as server:
        result = _run_against(server, config)
    assert result.exit_code == 0, result.output
    run_dir = Path(result.output.strip().splitlines()[-1])
    assert json.loads((run_dir / "candidate" / "summary.json").read_text())["tasks"]["mmlu_loglik"]["accuracy"] == 1.0


def test_the_lm_eval_comparison_counts_choices_and_pairs_the_difference() -> None:
    from evalpipe.interop.loglik_crosscheck import compare_loglikelihoods

    conts = [[" A", " B"]] * 4
    ours = [[-1.0, -2.0], [-1.0, -2.0], [-2.0, -1.0], [-2.0, -1.0]]
    theirs = [[-1.0, -2.0], [-2.0, -1.0], [-2.0, -1.0], [-2.0, -1.5]]
    result = compare_loglikelihoods(ours, theirs, [0, 0, 1, 0], conts)
    assert result["acc"] == {"evalpipe": 0.75, "lm_eval": 0.5}
    assert result["same_choice"] == 0.75 and result["acc_difference"] == 0.25
    assert result["acc_difference_ci95"][0] < 0.25 < result["acc_difference_ci95"][1]
    assert result["abs_logprob_difference"] == {"mean": 0.3125, "max": 1.0}


@needs_shared_data
def test_limit_auto_takes_the_questions_the_margin_needs(tmp_path: Path) -> None:
    """`limit: auto` on a one-sample card: the planner's count (evalpipe.stats.questions_needed) from the stated
    discordance, else from the stated accuracy as two independent sides; refused where samples decide instead."""
    side = {"label": "base", "base_url": "http://127.0.0.1:9/v1", "model": "fake-model"}
    tasks = [{"task": "mmlu_cloze_loglik", "limit": "auto"}, {"task": "gpqa_diamond_loglik", "limit": "auto"}]
    gate = {"margin": 0.08, "tasks": {"gpqa_diamond_loglik": {"margin": 0.2}}}
    planning = {"discordance": {"mmlu_cloze_loglik": 0.10}, "accuracy": {"gpqa_diamond_loglik": 0.25}}
    config = write_config(tmp_path / "c.yaml", "http://127.0.0.1:9/v1", tasks, baseline=side, gate=gate,
                          planning=planning)
    _, plans = plan_from_config(str(config))
    assert [len(p.questions) for p in plans] == [99, questions_needed(0.2, 2 * 0.25 * 0.75)] == [99, 60]
    sampled = write_config(tmp_path / "s.yaml", "http://127.0.0.1:9/v1",
                           [{"task": "mmlu", "limit": "auto", "samples": 4}], baseline=side, gate={"margin": 0.1})
    with pytest.raises(UserError, match=r"tasks\.0\.limit: 'auto' chooses questions for one-sample tasks"):
        plan_from_config(str(sampled))
    ungated = write_config(tmp_path / "u.yaml", "http://127.0.0.1:9/v1", tasks[:1], baseline=side)
    result = run_cli("run", str(ungated), "--dry-run")
    assert result.exit_code == 2 and "tasks.0.limit: 'auto' plans for the gate's margin" in result.output
