"""GPU serving check (issue 16): R1-width synthetic checkpoints served as a user would, per variant and backend.

1. builds the checkpoints with the CLI: `evalpipe model synth-deepseek --preset r1` (FP8; 4 layers, 1 dense,
   64 experts by default) and `evalpipe quantize --scheme w4afp8` of it;
2. for each server (variant:backend, e.g. w4afp8:cutlass), starts `evalpipe serve` on loopback and
   - asks a few prompts greedily (the same token ids on every server) and keeps the completions,
   - runs bench/serving.py: a warm-up, then one run per concurrency level (1, 16, 64 by default),
   - checks /health after every run and scans the server log for 5xx responses and engine errors;
3. compares each fast backend's greedy completions with the torch backend's on the same checkpoint;
4. writes `<out>/<gpu>.md` and `<out>/<gpu>.json` with the GPU, driver and versions beside the figures.

Verdict: FAIL on any failed request, any 5xx, any engine error or a server that does not come up; else PASS.
The greedy comparison is reported, not gated: random weights leave near-ties between the top logits, so a
last-bit difference between kernels may flip a greedy token (results/kernels/serve-check-*.md measures how far).
So that a flip can be told from a real error, each server also reports the margin between its two most likely
first tokens (logprob difference = logit difference): a flip where the torch server's margin is below the
kernel's own logit difference (up to about 0.2 at R1 widths, bench/moe_agreement.py) is a near-tie. Completions
are compared by token id: the R1-width model's vocabulary is larger than the tokenizer's, so text would hide ids.

    python bench/gpu_serving.py --work /tmp/serving --out results/serving --tokenizer TOKENIZER_DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

log = logging.getLogger("gpu_serving")
REPO = Path(__file__).resolve().parents[1]
SERVING_BENCH = REPO / "bench" / "serving.py"

# uvicorn's access line: ... "POST /v1/completions HTTP/1.1" 503 Service Unavailable
_ACCESS_5XX = re.compile(r'"[A-Z]+ \S+ HTTP/[\d.]+" (5\d\d)')
_ENGINE_ERROR = re.compile(r"Traceback \(most recent call last\)|CUDA error|illegal memory access|the engine has stopped")


@dataclass
class LevelResult:
    concurrency: int
    summary: dict[str, float]
    healthy_after: bool
    warmup: bool = False

    @property
    def label(self) -> str:
        return f"warm-up {self.concurrency}" if self.warmup else str(self.concurrency)


@dataclass
class ServerResult:
    variant: str
    backend: str
    started: bool
    startup_s: float = 0.0
    greedy: list[str] = field(default_factory=list)
    greedy_ids: list[list[int]] = field(default_factory=list)  # the same completions as token ids
    first_token_margins: list[float] = field(default_factory=list)  # top-1 minus top-2 logprob, per prompt
    levels: list[LevelResult] = field(default_factory=list)
    http_5xx: int = 0
    engine_errors: list[str] = field(default_factory=list)
    eager: bool = False  # served with --enforce-eager (no CUDA graphs)

    @property
    def name(self) -> str:
        return f"{self.variant}:{self.backend}" + (":eager" if self.eager else "")


def scan_server_log(text: str) -> tuple[int, list[str]]:
    """(number of 5xx responses, lines that show an engine error) in an `evalpipe serve` log."""
    n_5xx = sum(1 for line in text.splitlines() if _ACCESS_5XX.search(line))
    errors = [line.strip() for line in text.splitlines() if _ENGINE_ERROR.search(line)]
    return n_5xx, errors


def failures(server: ServerResult) -> list[str]:
    """Why this server fails the check (empty: it passes)."""
    if not server.started:
        return [f"{server.name}: the server did not come up"]
    out = []
    for level in server.levels:
        if level.summary.get("failed", 0):
            out.append(f"{server.name}: {int(level.summary['failed'])} failed requests at concurrency {level.label}")
        if not level.healthy_after:
            out.append(f"{server.name}: /health not ok after concurrency {level.label}")
    if server.http_5xx:
        out.append(f"{server.name}: {server.http_5xx} responses with a 5xx status")
    if server.engine_errors:
        out.append(f"{server.name}: engine error in the log: {server.engine_errors[0][:160]}")
    return out


def sweep_levels(sweep: str, server: str, default: list[int]) -> list[int]:
    """Concurrency levels for `server` from --sweep: "all", or comma-separated NAME or NAME=C1/C2/... entries."""
    if sweep == "all":
        return default
    for entry in sweep.split(","):
        name, _, levels = entry.partition("=")
        if name == server:
            return [int(c) for c in levels.split("/")] if levels else default
    return []


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def greedy_agreement(reference: list[list[int]], other: list[list[int]]) -> dict[str, float]:
    """First-token agreement and mean common-prefix length (tokens) of two servers' greedy completions."""
    if not reference or len(reference) != len(other):
        return {"first_token": float("nan"), "mean_prefix": float("nan"), "identical": float("nan")}
    first = sum(1 for r, o in zip(reference, other) if r[:1] == o[:1]) / len(reference)
    prefix = sum(common_prefix(r, o) for r, o in zip(reference, other)) / len(reference)
    identical = sum(1 for r, o in zip(reference, other) if r == o) / len(reference)
    return {"first_token": first, "mean_prefix": prefix, "identical": identical}


def greedy_agreements(servers: list[ServerResult], tokenize) -> dict[str, dict]:
    """Each non-torch server's greedy completions against the torch server of the same variant, if any, with the
    torch server's first-token top-2 margins at the prompts whose first tokens differ."""
    out = {}
    for s in servers:
        ref = next((r for r in servers if r.variant == s.variant and r.backend == "torch" and r.greedy), None)
        if ref is not None and s is not ref and s.greedy:
            # Token ids as the servers sampled them where both gave them: re-tokenized text merges byte fragments
            # and drops ids past the tokenizer's vocabulary (the R1-width model's 129280 against 49152 here).
            if ref.greedy_ids and s.greedy_ids:
                ref_ids, ids = ref.greedy_ids, s.greedy_ids
            else:
                ref_ids, ids = [tokenize(t) for t in ref.greedy], [tokenize(t) for t in s.greedy]
            out[s.name] = greedy_agreement(ref_ids, ids)
            out[s.name]["ref_margins_where_first_differs"] = [
                m for r, o, m in zip(ref_ids, ids, ref.first_token_margins) if r[:1] != o[:1]]
    return out


def environment() -> dict[str, str]:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "not installed"
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False)
        env["driver"] = smi.stdout.strip() or "unknown"
    else:
        env["gpu"], env["driver"] = "none", "none"
    return env


def evalpipe_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "evalpipe", *args]


def run_checked(cmd: list[str], log_path: Path) -> float:
    """Run a build step, its output to log_path; seconds taken. A failed step stops the check."""
    t = time.perf_counter()
    with open(log_path, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, check=False).returncode
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd[2:5])} failed (rc {rc}); see {log_path}")
    return time.perf_counter() - t


def build_checkpoints(args) -> tuple[dict[str, Path], str]:
    """The two checkpoints, and a note on how they came about (built now, or reused from --work)."""
    fp8, w4 = args.work / "r1-fp8", args.work / "r1-w4afp8"
    t = time.perf_counter()
    reused = (fp8 / "config.json").exists() and (w4 / "config.json").exists()
    if not (fp8 / "config.json").exists():
        s = run_checked(evalpipe_cmd("model", "synth-deepseek", str(fp8), "--preset", "r1", "--layers", str(args.layers),
                                     "--dense-layers", str(args.dense_layers), "--experts", str(args.experts),
                                     "--device", "cuda", "--tokenizer-from", str(args.tokenizer)),
                        args.out_logs / "synth.log")
        log.info("fp8 checkpoint written in %.0f s", s)
    if not (w4 / "config.json").exists():
        s = run_checked(evalpipe_cmd("quantize", str(fp8), str(w4), "--scheme", "w4afp8", "--device", "cuda",
                                     "--calib-samples", str(args.calib_samples)), args.out_logs / "quantize.log")
        log.info("w4afp8 checkpoint written in %.0f s", s)
    note = f"Reused from {args.work}." if reused else f"Both built on the GPU in {time.perf_counter() - t:.0f} s."
    return {"fp8": fp8, "w4afp8": w4}, note


def greedy_prompts(tokenizer_dir: Path, n: int, length: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = ("The quick brown fox jumps over the lazy dog. Explain, step by step, why the sum of two odd numbers is "
            "even, then list three prime numbers above fifty and say how a hash table handles collisions. ")
    base = tok(text * 8)["input_ids"]
    return [base[i * 7 : i * 7 + length] for i in range(n)]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(2)
    return False


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def top2_margin(top_logprobs: dict[str, float] | None) -> float:
    """Top-1 minus top-2 logprob of one position's alternatives (NaN when fewer than two came back)."""
    values = sorted((top_logprobs or {}).values(), reverse=True)
    return values[0] - values[1] if len(values) >= 2 else float("nan")


def ask_greedy(url: str, prompts: list[list[int]], max_tokens: int) -> tuple[list[str], list[list[int]], list[float]]:
    """Greedy completions of the prompts (text and token ids), and the top-2 logprob margin of each one's first
    token. Logprobs name tokens by id (return_tokens_as_token_ids), so that two ids of one text stay apart."""
    model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    texts, token_ids, margins = [], [], []
    for prompt in prompts:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                "logprobs": 2, "return_tokens_as_token_ids": True}
        resp = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
        if resp.status_code != 200:
            texts.append(f"<HTTP {resp.status_code}>")
            token_ids.append([])
            margins.append(float("nan"))
            continue
        choice = resp.json()["choices"][0]
        logprobs = choice.get("logprobs") or {}
        texts.append(choice["text"])
        token_ids.append([int(t.removeprefix("token_id:")) for t in logprobs.get("tokens") or []])
        margins.append(top2_margin((logprobs.get("top_logprobs") or [None])[0]))
    return texts, token_ids, margins


def sweep_level(args, url: str, concurrency: int, num_prompts: int, output_len: int, seed: int, tag: str) -> dict:
    result_json = args.out_logs / f"{tag}.json"
    cmd = [sys.executable, str(SERVING_BENCH), "--base-url", url, "--tokenizer", str(args.tokenizer),
           "--num-prompts", str(num_prompts), "--random-input-len", str(args.input_len),
           "--random-output-len", str(output_len), "--max-concurrency", str(concurrency), "--seed", str(seed),
           "--result-json", str(result_json)]
    with open(args.out_logs / f"{tag}.log", "w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, check=False)
    if not result_json.exists():
        return {"successful": 0, "failed": num_prompts}
    return json.loads(result_json.read_text())


def serve_one(args, variant: str, backend: str, model_dir: Path, prompts: list[list[int]], port: int,
              eager: bool = False) -> ServerResult:
    result = ServerResult(variant, backend, started=False, eager=eager)
    url = f"http://127.0.0.1:{port}"
    server_log = args.out_logs / f"server-{result.name.replace(':', '-')}.log"
    cmd = evalpipe_cmd("serve", "--model", str(model_dir), "--moe-backend", backend, "--port", str(port),
                       "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
                       *(["--enforce-eager"] if eager else []))
    t = time.perf_counter()
    with open(server_log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        result.started = wait_healthy(url, proc, args.startup_timeout)
        result.startup_s = time.perf_counter() - t
        if not result.started:
            return result
        log.info("%s up in %.0f s", result.name, result.startup_s)
        result.greedy, result.greedy_ids, result.first_token_margins = ask_greedy(url, prompts, args.greedy_tokens)
        levels = sweep_levels(args.sweep, result.name, args.concurrency)
        levels = [0, *levels] if levels else []
        for c in levels:
            warmup = c == 0
            conc = args.warmup_concurrency if warmup else c
            n = conc if warmup else max(args.min_prompts, args.prompts_per_slot * c)
            summary = sweep_level(args, url, conc, n, args.warmup_output_len if warmup else args.output_len,
                                  seed=c, tag=f"{result.name.replace(':', '-')}-c{'warmup' if warmup else c}")
            level = LevelResult(conc, summary, healthy(url), warmup)
            result.levels.append(level)
            log.info("%s concurrency %s: %s ok, %s failed, %.1f out tok/s, median ITL %.1f ms", result.name, level.label, summary.get("successful"), summary.get("failed"),
                     summary.get("output_throughput", float("nan")), summary.get("itl_median", float("nan")))
            if not level.healthy_after:
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        result.http_5xx, result.engine_errors = scan_server_log(server_log.read_text(errors="replace"))
    return result


def render_markdown(env: dict[str, str], args, servers: list[ServerResult], agreement: dict[str, dict], problems: list[str],
                    build_note: str) -> str:
    verdict = "FAIL" if problems else "PASS"
    lines = [f"# Serving check on {env['gpu']}: {verdict}", "",
             f"GPU {env['gpu']}, driver {env['driver']}, torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
             f"Python {env['python']}. `bash scripts/gpu_serving.sh` ({time.strftime('%Y-%m-%d', time.gmtime())}).", "",
             f"Model: `evalpipe model synth-deepseek --preset r1 --layers {args.layers} --dense-layers {args.dense_layers} "
             f"--experts {args.experts}` (hidden 7168, MLA with 128 heads, experts 2048 wide, top-8), and "
             f"`evalpipe quantize --scheme w4afp8` of it. {build_note}", "",
             f"`evalpipe serve --max-model-len {args.max_model_len} --max-num-seqs {args.max_num_seqs}`; bench/serving.py with "
             f"random prompts of {args.input_len} input and {args.output_len} output tokens (ignore_eos), all at once under "
             f"the concurrency limit, {args.prompts_per_slot} requests per slot (at least {args.min_prompts}), after a "
             f"warm-up at concurrency {args.warmup_concurrency}.", "",
             "| server | up (s) | concurrency | ok / failed | output tok/s | median TTFT (ms) | median ITL (ms) | p99 ITL (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for s in servers:
        if not s.levels:
            lines.append(f"| {s.name} | {s.startup_s:.0f} | (greedy check only) | | | | | |")
        for lv in s.levels:
            m = lv.summary
            lines.append(f"| {s.name} | {s.startup_s:.0f} | {lv.label} | {int(m.get('successful', 0))} / "
                         f"{int(m.get('failed', 0))} | {m.get('output_throughput', float('nan')):.1f} | "
                         f"{m.get('ttft_median', float('nan')):.0f} | {m.get('itl_median', float('nan')):.2f} | "
                         f"{m.get('itl_p99', float('nan')):.2f} |")
    lines += ["", f"Greedy completions ({len(servers[0].greedy) if servers else 0} prompts, {args.greedy_tokens} tokens) "
              "against the torch backend on the same checkpoint (reported, not gated; random weights):", "",
              "| server | first token agrees | mean common prefix (tokens) | identical | torch top-2 margin where the "
              "first token differs |", "|---|---|---|---|---|"]
    for name, a in agreement.items():
        margins = ", ".join(f"{m:.3f}" for m in a.get("ref_margins_where_first_differs", [])) or "-"
        lines.append(f"| {name} | {a['first_token']:.0%} | {a['mean_prefix']:.1f} | {a['identical']:.0%} | {margins} |")
    lines += ["", "First-token top-2 logprob margins per prompt (top-1 minus top-2; a flip where the torch margin is "
              "below about 0.2, the cutlass kernel's largest logit difference at R1 widths, is a near-tie of random "
              "weights): " +
              "; ".join(f"{s.name} " + ", ".join(f"{m:.3f}" for m in s.first_token_margins) for s in servers
                        if s.first_token_margins)]
    lines += ["", "5xx responses and engine errors per server: " +
              ", ".join(f"{s.name} {s.http_5xx} / {len(s.engine_errors)}" for s in servers), ""]
    lines += [f"Verdict: {verdict}"] + [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="checkpoints go here (reused when present)")
    p.add_argument("--out", type=Path, default=REPO / "results" / "serving")
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--servers", default="w4afp8:torch,w4afp8:cutlass,w4afp8:triton,fp8:auto",
                   help="variant:moe-backend[:eager], comma-separated; torch first (the greedy reference); "
                   ":eager serves with --enforce-eager (no CUDA graphs)")
    p.add_argument("--sweep", default="all", help="servers that get the load sweep: all, or comma-separated "
                   "SERVER or SERVER=C1/C2 (its own levels), e.g. w4afp8:cutlass,fp8:auto=1/16")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dense-layers", type=int, default=1)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=200)
    p.add_argument("--concurrency", default="1,16,64")
    p.add_argument("--prompts-per-slot", type=int, default=1)
    p.add_argument("--min-prompts", type=int, default=4)
    p.add_argument("--warmup-concurrency", type=int, default=8)
    p.add_argument("--warmup-output-len", type=int, default=16)
    p.add_argument("--greedy-prompts", type=int, default=4)
    p.add_argument("--greedy-tokens", type=int, default=32)
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--port", type=int, default=30100)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out_logs = args.work / "logs"
    args.out_logs.mkdir(exist_ok=True)

    env = environment()
    dirs, build_note = build_checkpoints(args)
    prompts = greedy_prompts(args.tokenizer, args.greedy_prompts, 64)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    gpu = re.sub(r"[^a-z0-9]+", "-", env["gpu"].lower()).strip("-")
    servers: list[ServerResult] = []
    problems: list[str] = []
    for i, spec in enumerate(args.servers.split(",")):
        variant, backend, *mode = spec.split(":")
        if mode not in ([], ["eager"]):
            raise SystemExit(f"--servers: {spec!r} is not variant:backend or variant:backend:eager")
        servers.append(serve_one(args, variant, backend, dirs[variant], prompts, args.port + i, eager=mode == ["eager"]))
        # Written after every server, so that a run cut short keeps what it measured.
        agreement = greedy_agreements(servers, lambda text: tok(text, add_special_tokens=False)["input_ids"])
        problems = [p for s in servers for p in failures(s)]
        (args.out / f"{gpu}.md").write_text(render_markdown(env, args, servers, agreement, problems, build_note))
        (args.out / f"{gpu}.json").write_text(json.dumps(
            {"environment": env, "servers": [asdict(s) for s in servers], "greedy_agreement": agreement,
             "problems": problems}, indent=1))
    print((args.out / f"{gpu}.md").read_text())
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
