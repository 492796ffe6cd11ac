"""Agreement of our grader with EvalScope's and lm-eval's on the same responses (the figures in docs/interop.md).

Runs `evalpipe run` on all four cards against the styled fake server (evalpipe/testing/answer_styles.py: the
answer endings of R1-style outputs, in a synthetic mix), then `evalpipe crosscheck` with each grader whose
environment exists (scripts/setup_extra.sh lmeval|evalscope), and prints agreement per task and the disagreements
counted by class (kind, where they part, the answer style that produced them).

    python bench/interop_agreement.py [--mmlu 1000] [--math500 500] [--gpqa 198] [--aime-samples 4] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evalpipe.cli import app  # noqa: E402
from evalpipe.errors import UserError  # noqa: E402
from evalpipe.interop.harnesses import HARNESS_NAMES, harness_python  # noqa: E402
from evalpipe.journal import read_journal  # noqa: E402
from evalpipe.runner import plan_from_config  # noqa: E402
from evalpipe.testing.answer_styles import StyledServer, known_questions  # noqa: E402
from evalpipe.testing.fake_server import text_key  # noqa: E402


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    if result.exit_code != 0:
        raise SystemExit(f"evalpipe {' '.join(args)} failed ({result.exit_code}): {result.output[-2000:]}")
    return result.output.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mmlu", type=int, default=1000, help="MMLU questions (1 sample each)")
    parser.add_argument("--math500", type=int, default=500, help="MATH-500 questions (1 sample each)")
    parser.add_argument("--gpqa", type=int, default=198, help="GPQA-Diamond questions (2 samples each)")
    parser.add_argument("--aime-samples", type=int, default=4, help="samples per AIME24 question (30 questions)")
    parser.add_argument("--accuracy", type=float, default=0.7, help="mean chance of a correct answer")
    parser.add_argument("--data-dir", default=os.environ.get("EVALPIPE_DATA_DIR", str(REPO.parent / "shared/datasets")))
    parser.add_argument("--keep", help="write the run here instead of a temporary directory")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep or tmp)
        config = {
            "name": "interop-agreement", "output_dir": str(out), "data_dir": args.data_dir, "concurrency": 32,
            "candidate": {"label": "styled-fake", "base_url": "http://127.0.0.1:1/v1", "model": "fake-model"},
            "tasks": [{"task": "aime24", "samples": args.aime_samples, "max_tokens": 4096},
                      {"task": "math500", "samples": 1, "max_tokens": 4096, "limit": args.math500},
                      {"task": "gpqa_diamond", "samples": 2, "max_tokens": 4096, "limit": args.gpqa},
                      {"task": "mmlu", "samples": 1, "max_tokens": 4096, "limit": args.mmlu}],
            "preflight": {"max_truncation_rate": None},
        }
        config_path = out / "interop-agreement.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(config))
        _, plans = plan_from_config(config_path)
        with StyledServer(known_questions(plans), {"accuracy": args.accuracy}) as server:
            config["candidate"]["base_url"] = server.base_url
            config_path.write_text(yaml.safe_dump(config))
            started = time.monotonic()
            run_dir = Path(invoke("run", str(config_path), "--no-progress"))
            samples = sum(len(p.requests) for p in plans)
            print(f"run: {samples} samples in {time.monotonic() - started:.1f} s -> {run_dir}")
            style_of = {(r.task, r.question_id, r.sample_index):
                        server.style_of.get((text_key(r.messages[-1]["content"]), r.seed, 0), "unstyled")
                        for p in plans for r in p.requests}
        print("answer styles used:", json.dumps(dict(sorted(Counter(style_of.values()).items()))))
        journal = read_journal(run_dir / "candidate" / "journal.jsonl")
        records = {(r.task, r.question_id, r.sample_index): r for r in journal}
        for grader in HARNESS_NAMES:
            try:
                harness_python(grader)
            except UserError as exc:
                print(f"\n{grader}: skipped ({exc})")
                continue
            started = time.monotonic()
            invoke("crosscheck", str(run_dir), "--grader", grader)
            entry = json.loads((run_dir / "crosscheck.json").read_text())["graders"][grader]["candidate"]
            print(f"\n{grader} {entry['harness_version']}: graded in {time.monotonic() - started:.1f} s")
            print(f"{'task':14} {'their task':34} {'samples':>7} {'agree %':>8} {'ours %':>7} {'theirs %':>8} "
                  f"{'ours only':>9} {'theirs only':>11}")
            for task, t in entry["tasks"].items():
                print(f"{task:14} {t['harness_task']:34} {t['graded']:7d} {100 * t['agreement']:8.1f} "
                      f"{100 * t['ours_correct_rate']:7.1f} {100 * t['theirs_correct_rate']:8.1f} "
                      f"{t['ours_only']:9d} {t['theirs_only']:11d}")
            classes = Counter((d["task"], d["kind"], d["where"],
                               style_of[(d["task"], d["question_id"], d["sample_index"])])
                              for d in entry["disagreements"])
            print("disagreements by (task, kind, where they part, answer style):")
            for (task, kind, where, style), n in sorted(classes.items()):
                print(f"  {n:5d}  {task:13} {kind:12} {where:11} {style}")
            example = {}
            for d in entry["disagreements"]:
                example.setdefault(style_of[(d["task"], d["question_id"], d["sample_index"])], d)
            print("one example per answer style (content tail | ours | theirs):")
            for style, d in sorted(example.items()):
                r = records[(d["task"], d["question_id"], d["sample_index"])]
                tail = " ".join((r.content or "").split())[-90:]
                print(f"  {style}: ...{tail!r} | ours {d['ours']['extracted']!r} {d['ours']['outcome']} | "
                      f"theirs {d['theirs']['extracted']!r} {'correct' if d['theirs']['correct'] else 'not correct'}")


if __name__ == "__main__":
    main()
