"""Log-likelihood cards checked against lm-eval's own `local-completions` client on the same questions.

`python -m evalpipe.interop.loglik_crosscheck CONFIG RUN_DIR --side candidate --base-url URL --tokenizer DIR` takes
the questions a run scored on its log-likelihood cards, asks lm-eval (in its own environment,
evalpipe/interop/lmeval_loglikelihood.py) to score the same (prompt, option continuation) pairs against the same
server, and writes `RUN_DIR/loglik_crosscheck.json`: per task both accuracies, how often the two pick the same
option, the paired difference with its 95% interval, and how far the log-likelihoods differ. The server must be
the one the run's side was evaluated on, still up.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evalpipe.errors import UserError
from evalpipe.interop.harnesses import HarnessError, harness_python
from evalpipe.journal import latest_by_key, read_journal
from evalpipe.run_files import journal_path
from evalpipe.runner import is_loglikelihood, plan_from_config
from evalpipe.scoring import loglikelihood_choice
from evalpipe.metrics import Z95

log = logging.getLogger(__name__)
LMEVAL_SCRIPT = Path(__file__).with_name("lmeval_loglikelihood.py")
RESULT_FILE = "loglik_crosscheck.json"


def compare_loglikelihoods(ours: Sequence[Sequence[float]], theirs: Sequence[Sequence[float]], gold: Sequence[int],
                           continuations: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Both sides' acc and acc_norm on the same questions, how often they choose the same option, the paired
    difference of acc (ours - theirs) with a 95% interval, and the absolute log-likelihood differences."""
    picks = [[loglikelihood_choice(list(lls), list(conts)) for lls, conts in zip(side, continuations, strict=True)]
             for side in (ours, theirs)]
    gold_arr = np.asarray(gold)
    acc = [np.array([p[0] for p in side]) == gold_arr for side in picks]
    acc_norm = [np.array([p[1] for p in side]) == gold_arr for side in picks]
    diff = acc[0].astype(float) - acc[1].astype(float)
    n = len(gold)
    stderr = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    gaps = np.abs(np.concatenate([np.asarray(a) - np.asarray(b) for a, b in zip(ours, theirs, strict=True)]))
    return {
        "n_questions": n,
        "acc": {"evalpipe": float(acc[0].mean()), "lm_eval": float(acc[1].mean())},
        "acc_norm": {"evalpipe": float(acc_norm[0].mean()), "lm_eval": float(acc_norm[1].mean())},
        "same_choice": float(np.mean([a[0] == b[0] for a, b in zip(*picks, strict=True)])),
        "acc_difference": float(diff.mean()),
        "acc_difference_ci95": [float(diff.mean() - Z95 * stderr), float(diff.mean() + Z95 * stderr)],
        "abs_logprob_difference": {"mean": float(gaps.mean()), "max": float(gaps.max())},
    }


def lmeval_loglikelihoods(base_url: str, model: str, tokenizer: str, items: Sequence[dict[str, Any]]
                          ) -> list[list[float]]:
    """lm-eval's log-likelihood of every continuation of every item (`{"context", "continuations"}`), in order."""
    python = harness_python("lm-eval")
    header = {"base_url": base_url.rstrip("/") + "/completions", "model": model, "tokenizer": tokenizer}
    payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in [header, *items])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([str(python), str(LMEVAL_SCRIPT)], input=payload, capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-5:])
        raise HarnessError(f"lm-eval's log-likelihood run ({python}) failed with exit code {proc.returncode}: {tail}")
    rows = [json.loads(line)["logprobs"] for line in proc.stdout.splitlines() if line.strip()]
    if len(rows) != len(items):
        raise HarnessError(f"lm-eval returned {len(rows)} answers for {len(items)} questions")
    return rows


def crosscheck_run(config: str, run_dir: Path, side: str, base_url: str, tokenizer: str, model: str
                   ) -> dict[str, Any]:
    _, plans = plan_from_config(config)
    records = latest_by_key(read_journal(journal_path(run_dir, side)))
    result: dict[str, Any] = {}
    for plan in (p for p in plans if is_loglikelihood(p)):
        scored = [(request, records[request.key]) for request in plan.requests
                  if request.key in records and records[request.key].option_logprobs is not None]
        if not scored:
            continue
        items = [{"context": r.messages[-1]["content"], "continuations": list(r.continuations)} for r, _ in scored]
        log.info("%s: lm-eval scores %d questions", plan.name, len(items))
        theirs = lmeval_loglikelihoods(base_url, model, tokenizer, items)
        result[plan.name] = compare_loglikelihoods(
            [rec.option_logprobs for _, rec in scored], theirs, [r.letters.index(r.gold) for r, _ in scored],
            [r.continuations for r, _ in scored])
    return result



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the run's config")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--side", default="candidate")
    parser.add_argument("--base-url", required=True, help="the side's server, still up (…/v1)")
    parser.add_argument("--model", required=True, help="the model id the server serves")
    parser.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer directory of the served model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = crosscheck_run(args.config, args.run_dir, args.side, args.base_url, args.tokenizer, args.model)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
    (args.run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    log.info("%s", json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
