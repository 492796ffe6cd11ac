"""`evalpipe run` end to end against the fake server over loopback HTTP (in-process CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evalpipe.cards import load_card
from evalpipe.journal import read_journal
from evalpipe.runner import plan_from_config
from evalpipe.testing.fake_server import FakeServer, answer_key_for_plans, text_key
from orch_helpers import needs_shared_data, run_cli, write_config

pytestmark = needs_shared_data

TASKS = [
    {"task": "aime24", "samples": 3, "max_tokens": 256, "limit": 6},
    {"task": "math500", "samples": 2, "max_tokens": 256, "limit": 8},
    {"task": "gpqa_diamond", "samples": 2, "max_tokens": 256, "limit": 8},
    {"task": "mmlu", "samples": 1, "max_tokens": 256, "limit": 12, "subjects": ["anatomy", "virology"]},
]
CONTRACT = {"schema_version", "run_id", "config_name", "label", "tasks"}
TASK_CONTRACT = {"card_hash", "n_questions", "samples", "accuracy", "stderr", "ci95", "cons_at_k", "pass_at_k",
                 "truncation_rate", "no_answer_rate", "error_rate", "completion_tokens"}


def oracle(config: Path, **behaviour: object) -> FakeServer:
    _, plans = plan_from_config(config)
    key = answer_key_for_plans(plans)
    return FakeServer({"answer_key": key, **behaviour})


def configured(tmp_path: Path, tasks: list[dict] = TASKS, **extra: object) -> Path:
    return write_config(tmp_path / "run.yaml", "http://127.0.0.1:1/v1", tasks, **extra)


def point_at(config: Path, base_url: str | list[str], **changes: object) -> None:
    data = yaml.safe_load(config.read_text())
    data["candidate"]["base_url"] = base_url
    data.update(changes)
    config.write_text(yaml.safe_dump(data))


def run_dir_of(result) -> Path:
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("stream", "reasoning"), [(True, "field"), (False, "think_tags")])
def test_full_run_writes_journal_summary_and_report(tmp_path: Path, stream: bool, reasoning: str) -> None:
    config = configured(tmp_path, client={"stream": stream, "backoff_initial": 0.01})
    with oracle(config, accuracy=0.7, truncation_rate=0.1, no_answer_rate=0.05, reasoning=reasoning) as server:
        point_at(config, server.base_url)
        result = run_cli("run", str(config), "--no-progress")
        assert result.exit_code == 0, result.output
        run_dir = run_dir_of(result)
        _, plans = plan_from_config(config)
    assert run_dir.parent == tmp_path / "runs" / "t"
    summary = json.loads((run_dir / "candidate" / "summary.json").read_text())
    assert set(summary) == CONTRACT and summary["config_name"] == "t" and summary["label"] == "fake"
    assert summary["run_id"] == run_dir.name
    records = read_journal(run_dir / "candidate" / "journal.jsonl")
    planned = {r.key for p in plans for r in p.requests}
    assert sorted(r.key for r in records) == sorted(planned)  # every sample exactly once
    assert len(server.requests) == len(planned)  # and sent exactly once (no retries were needed)
    for plan in plans:
        entry = summary["tasks"][plan.name]
        assert set(entry) == TASK_CONTRACT
        assert entry["card_hash"] == plan.card_hash == plan.card.card_hash
        assert entry["n_questions"] == len(plan.questions) and entry["samples"] == plan.samples
        for rate in ("accuracy", "truncation_rate", "no_answer_rate", "error_rate", "cons_at_k", "pass_at_k"):
            assert 0.0 <= entry[rate] <= 1.0
        assert entry["ci95"][0] <= entry["accuracy"] <= entry["ci95"][1]
        assert entry["error_rate"] == 0.0
    total_truncated = sum(r.outcome == "truncated" for r in records)
    assert 0 < total_truncated < len(records) / 3
    assert all(r.finish_reason == "length" for r in records if r.outcome == "truncated")
    mmlu = [r for r in records if r.task == "mmlu"]
    assert {r.labels["subject"] for r in mmlu} <= {"anatomy", "virology"}
    correct = [r for r in records if r.outcome == "correct"]
    assert correct and all(r.rule in ("boxed_last", "mc_answer_marker") for r in correct)
    if reasoning == "field":
        assert all(r.reasoning for r in records if r.outcome in ("correct", "wrong"))
    details = json.loads((run_dir / "candidate" / "details.json").read_text())
    assert set(details["tasks"]["math500"]["breakdown"]) == {"level", "subject"}
    assert set(details["tasks"]["mmlu"]["breakdown"]) == {"category", "subject"}
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["resolved"]["tasks"]["aime24"]["card_hash"] == summary["tasks"]["aime24"]["card_hash"]
    report = (run_dir / "report.md").read_text()
    assert "aime24" in report and "--resume" in report
    assert "accuracy" in result.stdout


def test_dry_run_prints_the_plan_and_sends_nothing(tmp_path: Path) -> None:
    config = configured(tmp_path)
    with FakeServer() as server:
        point_at(config, server.base_url)
        result = run_cli("run", str(config), "--dry-run")
    assert result.exit_code == 0
    assert server.requests == [] and not (tmp_path / "runs").exists()
    assert "nothing sent" in result.stdout and "total: 62 requests" in result.stdout
    assert load_card("aime24").with_sampling(max_tokens=256).card_hash in result.stdout


BAD_CONFIGS = [
    ("name: [unclosed", "invalid YAML"),
    ("- just\n- a list", "expected a mapping"),
    ({"tasks": [{"task": "aime24", "samples": 0}]}, "tasks.0.samples: Input should be greater than or equal to 1"),
    ({"tasks": [{"task": "aime24", "temperatur": 0.1}]}, "tasks.0.temperatur: Extra inputs are not permitted"),
    ({"tasks": [{"task": "aime25"}]}, "tasks.0.task: unknown task 'aime25'"),
    ({"candidate": {"label": "x", "model": "m", "base_url": "localhost:8000"}}, "candidate.base_url"),
    ({"candidate": {"label": "x", "model": "m", "launch": {"engine": "vllm"}}}, "launch"),
    ({"concurrency": -1}, "concurrency: Input should be greater than or equal to 1"),
    ({"data_dir": "/nonexistent/data"}, "missing data file /nonexistent/data/aime2024/test.jsonl"),
    ({"candidate": {"label": "x", "model": "m", "base_url": "${EVALPIPE_TEST_UNSET_URL}"}},
     "candidate.base_url: environment variable EVALPIPE_TEST_UNSET_URL is not set"),
    ({"tasks": [{"task": "aime24", "subjects": ["algebra"]}]}, "tasks.0.subjects: task aime24 has no subjects"),
    ({"tasks": [{"task": "math500", "subjects": ["Astrology"]}]}, "tasks.0.subjects: unknown subject(s) ['Astrology']"),
]


@pytest.mark.parametrize(("change", "message"), BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_bad_input_exits_2_with_the_field_path_and_writes_nothing(tmp_path: Path, change, message: str) -> None:
    config = configured(tmp_path, tasks=[{"task": "aime24", "limit": 2}])
    if isinstance(change, str):
        config.write_text(change)
    else:
        data = yaml.safe_load(config.read_text())
        data.update(change)
        config.write_text(yaml.safe_dump(data))
    result = run_cli("run", str(config))
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_missing_config_file_and_missing_resume_dir(tmp_path: Path) -> None:
    result = run_cli("run", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and "config file not found" in result.stderr
    config = configured(tmp_path, tasks=[{"task": "aime24", "limit": 2}])
    result = run_cli("run", str(config), "--resume", str(tmp_path / "no-run"))
    assert result.exit_code == 2 and "no such run directory" in result.stderr


def test_unwritable_output_dir_is_a_one_line_error(tmp_path: Path) -> None:
    config = configured(tmp_path, tasks=[{"task": "mmlu", "limit": 2, "max_tokens": 64}])
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with FakeServer() as server:
        point_at(config, server.base_url, output_dir=str(tmp_path / "blocker" / "runs"))
        result = run_cli("run", str(config))
    assert result.exit_code == 2 and "output_dir: cannot create the run directory" in result.stderr
    assert "Traceback" not in result.output


def test_unreachable_endpoint_exits_3_and_writes_nothing(tmp_path: Path) -> None:
    config = configured(tmp_path, tasks=[{"task": "aime24", "limit": 2}])
    point_at(config, "http://127.0.0.1:9/v1")
    result = run_cli("run", str(config))
    assert result.exit_code == 3 and "cannot reach http://127.0.0.1:9/v1/models" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_model_not_served_exits_2(tmp_path: Path) -> None:
    config = configured(tmp_path, tasks=[{"task": "aime24", "limit": 2}])
    with FakeServer({"model": "other-model"}) as server:
        point_at(config, server.base_url)
        result = run_cli("run", str(config))
    assert result.exit_code == 2 and "candidate.model: 'fake-model' is not served" in result.stderr
    assert "other-model" in result.stderr and server.requests == []


def test_preflight_truncation_aborts_with_advice_and_writes_nothing(tmp_path: Path) -> None:
    config = configured(tmp_path, tasks=[{"task": "math500", "limit": 6, "max_tokens": 128}],
                        preflight={"pilot_samples": 4, "max_truncation_rate": 0.5})
    with FakeServer({"truncation_rate": 1.0}) as server:
        point_at(config, server.base_url)
        result = run_cli("run", str(config))
    assert result.exit_code == 2
    assert "4 of 4 pilot answers of math500 hit max_tokens=128" in result.stderr
    assert "raise tasks.0.max_tokens" in result.stderr
    assert len(server.requests) == 4 and not (tmp_path / "runs").exists()


def test_context_length_is_checked_against_max_model_len(tmp_path: Path) -> None:
    config = configured(tmp_path, tasks=[{"task": "aime24", "limit": 10, "max_tokens": 4096}],
                        preflight={"pilot_samples": 1})
    with FakeServer({"max_model_len": 4096}) as server:
        point_at(config, server.base_url)
        result = run_cli("run", str(config))
        assert result.exit_code == 2 and "max_model_len" in result.stderr and server.requests == []
        # max_tokens fits with the pilot's prompt, not with the longest prompt (estimated from the pilot).
        _, plans = plan_from_config(config)
        pilot = plans[0].requests[0]
        assert max(r.prompt_chars for r in plans[0].requests) > 1.1 * pilot.prompt_chars
        with FakeServer({"max_model_len": 4000 + len(pilot.messages[-1]["content"].split()) + 1}) as tight:
            point_at(config, tight.base_url)
            data = yaml.safe_load(config.read_text())
            data["tasks"][0]["max_tokens"] = 4000
            config.write_text(yaml.safe_dump(data))
            result = run_cli("run", str(config))
            assert len(tight.requests) == 1
    assert result.exit_code == 2 and "exceeds the server's max_model_len" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_pilot_refused_by_the_server_exits_2_with_its_message(tmp_path: Path) -> None:
    config = configured(tmp_path, tasks=[{"task": "aime24", "limit": 4, "max_tokens": 4090}])
    with FakeServer({"max_model_len": 4096}) as server:
        point_at(config, server.base_url)
        result = run_cli("run", str(config))
    assert result.exit_code == 2 and "every pilot request of aime24 was refused" in result.stderr
    assert "maximum context length is 4096" in result.stderr and len(server.requests) == 4


def test_transport_errors_are_recorded_excluded_from_accuracy_and_retried_on_resume(tmp_path: Path) -> None:
    config = configured(tmp_path, tasks=[{"task": "math500", "limit": 6, "samples": 2, "max_tokens": 64}],
                        preflight={"enabled": False})
    _, plans = plan_from_config(config)
    victim = plans[0].questions[0]
    needle = victim.text[:40]
    rules = [{"match": __import__("re").escape(needle), "replies": [{"status": 500}]}]
    with oracle(config, rules=rules) as server:
        point_at(config, server.base_url)
        result = run_cli("run", str(config), "--no-progress")
        assert result.exit_code == 0
        run_dir = run_dir_of(result)
        summary = json.loads((run_dir / "candidate" / "summary.json").read_text())["tasks"]["math500"]
        assert summary["error_rate"] == pytest.approx(2 / 12)
        records = read_journal(run_dir / "candidate" / "journal.jsonl")
        failed = [r for r in records if r.outcome == "error"]
        assert {r.question_id for r in failed} == {victim.id} and all(r.attempts == 3 for r in failed)
        assert "HTTP 500" in failed[0].error
        sent_before = len(server.requests)
        resumed = run_cli("run", str(config), "--resume", str(run_dir), "--no-progress")
        assert resumed.exit_code == 0
        assert len(server.requests) - sent_before == 2 * 3  # only the two errored samples, each with retries


def test_resume_reissues_only_missing_keys_and_refuses_a_changed_protocol(tmp_path: Path) -> None:
    config = configured(tmp_path, tasks=TASKS[:2])
    with oracle(config, truncation_rate=0.1) as server:
        point_at(config, server.base_url)
        first = run_cli("run", str(config), "--no-progress")
        run_dir = run_dir_of(first)
        summary_path = run_dir / "candidate" / "summary.json"
        original = json.loads(summary_path.read_text())
        journal = run_dir / "candidate" / "journal.jsonl"
        lines = journal.read_text().splitlines(keepends=True)
        journal.write_text("".join(lines[:9]) + lines[9][:30])  # as if killed while writing line 10
        kept = {(r.question_id, r.seed) for r in read_journal(journal)}
        _, plans = plan_from_config(config)
        text_of = {(q.question_id, q.seed): text_key(q.messages[-1]["content"]) for p in plans for q in p.requests}
        before = len(server.requests)
        resumed = run_cli("run", str(config), "--resume", str(run_dir), "--no-progress")
        assert resumed.exit_code == 0 and run_dir_of(resumed) == run_dir
        new = server.requests[before:]
        assert len(new) == len(lines) - 9
        assert not {(r["key"], r["seed"]) for r in new} & {(text_of[k], k[1]) for k in kept}
        assert json.loads(summary_path.read_text()) == original
        data = yaml.safe_load(config.read_text())
        data["tasks"][0]["max_tokens"] = 512
        config.write_text(yaml.safe_dump(data))
        refused = run_cli("run", str(config), "--resume", str(run_dir))
    assert refused.exit_code == 2 and "aime24: protocol changed" in refused.stderr


def test_replica_list_in_config(tmp_path: Path) -> None:
    config = configured(tmp_path, tasks=[{"task": "mmlu", "limit": 30, "max_tokens": 64}])
    with oracle(config, latency_s=0.01) as a, oracle(config, latency_s=0.01) as b:
        point_at(config, [a.base_url, b.base_url])
        result = run_cli("run", str(config), "--no-progress")
    assert result.exit_code == 0
    assert len(a.requests) + len(b.requests) == 30 and min(len(a.requests), len(b.requests)) >= 5
    records = read_journal(run_dir_of(result) / "candidate" / "journal.jsonl")
    assert {r.replica for r in records} == {a.base_url, b.base_url}
