"""Agreement of our grader with EvalScope's and lm-eval's on the same responses (the figures in docs/interop.md).

Runs `evalpipe run` and then `evalpipe crosscheck` with each grader whose environment exists
(scripts/setup_extra.sh lmeval|evalscope), and prints agreement per task and the disagreements by class.
Two sources of responses:

- styled (default): the four cards against the styled fake server (evalpipe/testing/answer_styles.py: the answer
  endings of R1-style outputs, in a synthetic mix); disagreements are also counted by the style that produced them.
- `--demo`: MMLU, MATH-500 and GPQA-Diamond subsets, greedy, against `evalpipe serve` on the demo model
  (SmolLM2-135M-Instruct as an MoE): a real, if small, model (about 15 minutes on 2 CPU cores).

    python bench/interop_agreement.py [--mmlu 1000] [--math500 500] [--gpqa 198] [--aime-samples 4] [--keep DIR]
    python bench/interop_agreement.py --demo [--mmlu 100] [--math500 40] [--gpqa 30]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
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
from evalpipe.testing.serve_process import evalpipe_serve  # noqa: E402


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    if result.exit_code != 0:
        raise SystemExit(f"evalpipe {' '.join(args)} failed ({result.exit_code}): {result.output[-2000:]}")
    return result.output.strip().splitlines()[-1]


def styled_tasks(args: argparse.Namespace) -> list[dict]:
    return [{"task": "aime24", "samples": args.aime_samples, "max_tokens": 4096},
            {"task": "math500", "samples": 1, "max_tokens": 4096, "limit": args.math500},
            {"task": "gpqa_diamond", "samples": 2, "max_tokens": 4096, "limit": args.gpqa},
            {"task": "mmlu", "samples": 1, "max_tokens": 4096, "limit": args.mmlu}]


def demo_tasks(args: argparse.Namespace) -> list[dict]:
    # Greedy and short: a 135M model does not reason for long, and CPU time is the limit.
    return [{"task": "mmlu", "samples": 1, "max_tokens": 192, "limit": args.mmlu, "temperature": 0.0},
            {"task": "math500", "samples": 1, "max_tokens": 256, "limit": args.math500, "temperature": 0.0},
            {"task": "gpqa_diamond", "samples": 1, "max_tokens": 192, "limit": args.gpqa, "temperature": 0.0}]


def print_crosscheck(entry: dict, records: dict, style_of: dict | None) -> None:
    print(f"{'task':14} {'their task':34} {'samples':>7} {'agree %':>8} {'ours %':>7} {'theirs %':>8} "
          f"{'ours only':>9} {'theirs only':>11}")
    for task, t in entry["tasks"].items():
        print(f"{task:14} {t['harness_task']:34} {t['graded']:7d} {100 * t['agreement']:8.1f} "
              f"{100 * t['ours_correct_rate']:7.1f} {100 * t['theirs_correct_rate']:8.1f} "
              f"{t['ours_only']:9d} {t['theirs_only']:11d}")

    def label(d: dict) -> str:
        key = (d["task"], d["question_id"], d["sample_index"])
        return style_of[key] if style_of else f"our rule {records[key].rule}"

    classes = Counter((d["task"], d["kind"], d["where"], label(d)) for d in entry["disagreements"])
    print("disagreements by (task, kind, where they part, answer style or our rule):")
    for (task, kind, where, what), n in sorted(classes.items()):
        print(f"  {n:5d}  {task:13} {kind:12} {where:11} {what}")
    print("one example each (content tail | ours | theirs; GPQA text withheld):")
    example: dict = {}
    for d in entry["disagreements"]:
        example.setdefault((d["task"], d["kind"], d["where"], label(d)), d)
    for (task, kind, where, what), d in sorted(example.items()):
        r = records[(d["task"], d["question_id"], d["sample_index"])]
        tail = "(withheld)" if task == "gpqa_diamond" else " ".join((r.content or "").split())[-90:]
        print(f"  {task}/{kind}/{where}/{what}: ...{tail!r} | ours {d['ours']['extracted']!r} {d['ours']['outcome']}"
              f" | theirs {d['theirs']['extracted']!r} {'correct' if d['theirs']['correct'] else 'not correct'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true", help="the demo model behind evalpipe serve, not the fake")
    parser.add_argument("--mmlu", type=int, help="MMLU questions, 1 sample each (default 1000; --demo 100)")
    parser.add_argument("--math500", type=int, help="MATH-500 questions, 1 sample each (default 500; --demo 40)")
    parser.add_argument("--gpqa", type=int, help="GPQA-Diamond questions (default 198 x 2 samples; --demo 30 x 1)")
    parser.add_argument("--aime-samples", type=int, default=4, help="samples per AIME24 question (styled only)")
    parser.add_argument("--accuracy", type=float, default=0.7, help="styled: mean chance of a correct answer")
    parser.add_argument("--data-dir", default=os.environ.get("EVALPIPE_DATA_DIR", str(REPO.parent / "shared/datasets")))
    parser.add_argument("--keep", help="write the run here instead of a temporary directory")
    args = parser.parse_args()
    defaults = {"mmlu": 100, "math500": 40, "gpqa": 30} if args.demo else {"mmlu": 1000, "math500": 500, "gpqa": 198}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        out = Path(args.keep or tmp)
        config = {"name": "interop-agreement", "output_dir": str(out), "data_dir": args.data_dir,
                  "concurrency": 8 if args.demo else 32,
                  "candidate": {"label": "demo" if args.demo else "styled-fake", "base_url": "http://127.0.0.1:1/v1",
                                "model": "demo" if args.demo else "fake-model"},
                  "tasks": demo_tasks(args) if args.demo else styled_tasks(args),
                  "preflight": {"max_truncation_rate": None}}
        config_path = out / "interop-agreement.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(config))
        _, plans = plan_from_config(config_path)
        if args.demo:
            from runtime.tools.demo_model import demo_model_path  # the runtime is needed in this mode only

            server = stack.enter_context(evalpipe_serve(
                "--model", str(demo_model_path("bf16")), "--served-model-name", "demo", "--max-model-len", "4096",
                "--kv-cache-gib", "1.0", "--max-num-seqs", "8", startup_timeout_s=300))
            config["candidate"]["base_url"] = server.base_url
        else:
            server = stack.enter_context(StyledServer(known_questions(plans), {"accuracy": args.accuracy}))
            config["candidate"]["base_url"] = server.base_url
        config_path.write_text(yaml.safe_dump(config))
        started = time.monotonic()
        run_dir = Path(invoke("run", str(config_path), "--no-progress"))
        print(f"run: {sum(len(p.requests) for p in plans)} samples in {time.monotonic() - started:.1f} s "
              f"-> {run_dir}")
        style_of = None
        if not args.demo:
            style_of = {(r.task, r.question_id, r.sample_index):
                        server.style_of.get((text_key(r.messages[-1]["content"]), r.seed, 0), "unstyled")
                        for p in plans for r in p.requests}
            print("answer styles used:", json.dumps(dict(sorted(Counter(style_of.values()).items()))))
        stack.close()
        records = {(r.task, r.question_id, r.sample_index): r
                   for r in read_journal(run_dir / "candidate" / "journal.jsonl")}
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
            print_crosscheck(entry, records, style_of)


if __name__ == "__main__":
    main()
