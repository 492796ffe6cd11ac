"""A real external client against our server: lm-eval 0.4.13's `local-chat-completions` model evaluates a small
local multiple-choice task against `evalpipe serve` (a subprocess serving the demo model, SmolLM2-135M-Instruct as
an MoE), and `evalpipe run` evaluates the same questions under a card with the same prompt. Greedy decoding: both
must receive the same responses, extract the same letters, and so report the same score; imported with
`evalpipe import lm-eval`, lm-eval's run reports that score too.

lm-eval lives in its own environment (scripts/setup_extra.sh lmeval); without it this module is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from evalpipe.interop.harnesses import harness_python
from evalpipe.journal import read_journal
from evalpipe.runner import plan_from_config
from evalpipe.testing.serve_process import evalpipe_serve
from interop_helpers import needs_harness
from orch_helpers import run_cli, write_config
from runtime.tools.demo_model import demo_model_path

pytestmark = [pytest.mark.slow, needs_harness("lm-eval")]

QUESTIONS = [  # easy ones, and the 135M model still gets several wrong: both scores must agree either way
    ("q1", "What is the capital of France?", ["Berlin", "Paris", "Madrid", "Rome"], "B"),
    ("q2", "What is the largest ocean on Earth?", ["Pacific Ocean", "Atlantic Ocean", "Indian Ocean",
                                                   "Arctic Ocean"], "A"),
    ("q3", "How many legs does a spider have?", ["Six", "Four", "Ten", "Eight"], "D"),
    ("q4", "Which planet is known as the Red Planet?", ["Mars", "Jupiter", "Venus", "Saturn"], "A"),
    ("q5", "Which gas do plants absorb from the air?", ["Oxygen", "Carbon dioxide", "Nitrogen", "Helium"], "B"),
    ("q6", "What is the boiling point of water at sea level?", ["100 degrees Celsius", "50 degrees Celsius",
                                                                "0 degrees Celsius", "200 degrees Celsius"], "A"),
]
TEMPLATE = ("Answer the following multiple-choice question.\n\n{question}\n\n{options}\n\n"
            "Reply with the letter of the correct option only.")
MAX_TOKENS = 32
# lm-eval's side of the same answer contract as the card's ladder for these replies: the leading letter of the
# last line ('B) Paris'), else nothing.
LETTER_FILTER = [{"function": "regex", "regex_pattern": r"(?m)^\s*\(?([A-D])[).:]", "group_select": -1},
                 {"function": "take_first"}]


def write_card_and_data(tasks_dir: Path, data_dir: Path) -> None:
    rows = "".join(json.dumps({"id": qid, "question": q, "A": o[0], "B": o[1], "C": o[2], "D": o[3], "answer": a})
                   + "\n" for qid, q, o, a in QUESTIONS)
    (data_dir / "tiny_mc").mkdir(parents=True)
    (data_dir / "tiny_mc" / "test.jsonl").write_text(rows)
    card = {
        "name": "tiny_mc", "version": 1, "description": "six easy general-knowledge questions (test only)",
        "dataset": {"format": "jsonl",
                    "local": {"files": {"tiny_mc/test.jsonl": hashlib.sha256(rows.encode()).hexdigest()}},
                    "hub": {"path": "none/tiny-mc", "revision": "0" * 40, "split": "test"}},
        "fields": {"id": "id", "question": "question", "options": ["A", "B", "C", "D"], "answer": "answer"},
        "prompt": {"template": TEMPLATE, "option_format": "{letter}) {text}"},
        "sampling": {"temperature": 0.0, "top_p": 1.0, "max_tokens": MAX_TOKENS, "samples": 1},
        "scoring": {"answer_type": "multiple_choice",
                    "extract": ["mc_answer_marker", "mc_boxed", "mc_answer_phrase", "mc_final_letter_line"]},
    }
    tasks_dir.mkdir()
    (tasks_dir / "tiny_mc.yaml").write_text(yaml.safe_dump(card, sort_keys=False))


def write_lmeval_task(work: Path, prompts: list[dict]) -> None:
    """The same questions as an lm-eval task whose documents are the card's rendered prompts."""
    data = work / "evalpipe_tiny_mc.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    task = {"task": "evalpipe_tiny_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{gold}}",
            "generation_kwargs": {"until": [], "max_gen_toks": MAX_TOKENS, "do_sample": False, "temperature": 0.0},
            "filter_list": [{"name": "letter", "filter": LETTER_FILTER}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    (work / "evalpipe_tiny_mc.yaml").write_text(yaml.safe_dump(task))


def test_lm_eval_client_and_orchestrator_get_the_same_responses_and_score(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    tasks_dir, data_dir, work = tmp_path / "tasks", tmp_path / "data", tmp_path / "lmeval"
    write_card_and_data(tasks_dir, data_dir)
    monkeypatch.setenv("EVALPIPE_TASKS_DIR", str(tasks_dir))
    config = write_config(tmp_path / "run.yaml", "http://127.0.0.1:1/v1", [{"task": "tiny_mc"}],
                          data_dir=str(data_dir), concurrency=4, candidate={"label": "demo", "model": "demo",
                                                                             "base_url": "http://127.0.0.1:1/v1"})
    _, (plan,) = plan_from_config(config)
    work.mkdir()
    write_lmeval_task(work, [{"id": r.question_id, "prompt": r.messages[-1]["content"], "gold": r.gold}
                             for r in plan.requests])

    with evalpipe_serve("--model", str(demo_model_path("bf16")), "--served-model-name", "demo", "--dtype", "float32",
                        "--max-model-len", "1024", "--kv-cache-gib", "0.1", "--max-num-seqs", "4") as server:
        base_url = server.base_url
        config.write_text(config.read_text().replace("http://127.0.0.1:1/v1", base_url))
        ours = run_cli("run", str(config), "--no-progress")
        assert ours.exit_code == 0, ours.output
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        theirs = subprocess.run(
            [str(harness_python("lm-eval")), "-m", "lm_eval", "run", "--model", "local-chat-completions",
             "--model_args", f"model=demo,base_url={base_url}/chat/completions,num_concurrent=2,max_retries=1",
             "--apply_chat_template", "--include_path", str(work), "--tasks", "evalpipe_tiny_mc",
             "--output_path", str(work / "out"), "--log_samples"],
            cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert theirs.returncode == 0, theirs.stderr[-3000:]

    run_dir = Path(ours.stdout.strip().splitlines()[-1])
    records = {r.question_id: r for r in read_journal(run_dir / "candidate" / "journal.jsonl")}
    (samples_file,) = (work / "out").glob("*/samples_evalpipe_tiny_mc_*.jsonl")
    samples = {s["doc"]["id"]: s for s in map(json.loads, samples_file.read_text().splitlines())}
    assert set(samples) == set(records) == {q[0] for q in QUESTIONS}
    for qid, sample in samples.items():
        record = records[qid]
        assert sample["resps"][0][0] == record.content  # the same greedy response to the same prompt
        letter = sample["filtered_resps"][0]
        assert (None if letter == "[invalid]" else letter) == record.extracted
        assert bool(sample["exact_match"]) == (record.outcome == "correct")
    summary = json.loads((run_dir / "candidate" / "summary.json").read_text())["tasks"]["tiny_mc"]
    (results_file,) = (work / "out").glob("*/results_*.json")
    lm_eval_score = json.loads(results_file.read_text())["results"]["evalpipe_tiny_mc"]["exact_match,letter"]
    assert summary["accuracy"] == pytest.approx(lm_eval_score)
    assert 0 < lm_eval_score < 1  # some right, some wrong: the agreement is not a trivial all-or-nothing

    imported = run_cli("import", "lm-eval", str(work / "out"), "--output-dir", str(tmp_path / "imported"))
    assert imported.exit_code == 0, imported.output
    imported_summary = json.loads((Path(imported.stdout.strip().splitlines()[-1]) / "candidate" / "summary.json")
                                  .read_text())["tasks"]["evalpipe_tiny_mc"]
    assert imported_summary["accuracy"] == pytest.approx(lm_eval_score)
