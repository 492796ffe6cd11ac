"""Client-side overhead of `evalpipe run`: MMLU requests through the whole pipeline (plan, preflight, streaming
client, scoring, journal, summary) against an instant local fake server running in its own process.

Prints requests per second and client CPU milliseconds per request (user + system time of this process only;
the server's CPU is printed separately).

    python bench/orchestrator_overhead.py [--requests 2000] [--concurrency 64] [--no-stream]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evalpipe.config import parse_config  # noqa: E402
from evalpipe.runner import execute_run, plan_from_config  # noqa: E402


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--no-stream", action="store_true")
    parser.add_argument("--reasoning-words", type=int, default=24,
                        help="reasoning length per answer; streamed one word per chunk when above 24")
    parser.add_argument("--data-dir", default=os.environ.get("EVALPIPE_DATA_DIR", str(REPO.parent / "shared/datasets")))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        raw = {
            "name": "bench", "output_dir": f"{tmp}/runs", "data_dir": args.data_dir, "concurrency": args.concurrency,
            "candidate": {"label": "bench", "model": "fake-model", "base_url": "${EVALPIPE_BASE_URL}"},
            "tasks": [{"task": "mmlu", "samples": 1, "max_tokens": args.reasoning_words + 512, "limit": args.requests}],
            "client": {"stream": not args.no_stream},
        }
        config_path = Path(tmp) / "bench.yaml"
        config_path.write_text(yaml.safe_dump(raw))
        port_file = Path(tmp) / "port"
        os.environ["EVALPIPE_BASE_URL"] = "http://127.0.0.1:1/v1"  # placeholder while the key is built
        server = subprocess.Popen(
            [sys.executable, "-m", "evalpipe.testing.fake_server", "--answer-key-for", str(config_path),
             "--port-file", str(port_file), "--accuracy", "0.8", "--reasoning-words", str(args.reasoning_words),
             "--chunk-words", "1" if args.reasoning_words > 24 else "8"],
            stdout=subprocess.DEVNULL, cwd=REPO,
        )
        try:
            while not port_file.is_file() or not port_file.read_text():
                if server.poll() is not None:
                    raise SystemExit("fake server failed to start")
                time.sleep(0.05)
            os.environ["EVALPIPE_BASE_URL"] = f"http://127.0.0.1:{port_file.read_text()}/v1"
            config = parse_config(yaml.safe_load(config_path.read_text()), str(config_path))
            started = time.perf_counter()
            config, plans = plan_from_config(config)
            plan_s = time.perf_counter() - started
            server_cpu0 = process_cpu_seconds(server.pid)
            t0, cpu1 = time.perf_counter(), cpu_seconds()
            result = asyncio.run(execute_run(config, plans, str(config_path), None, show_progress=False))
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu1
            server_cpu = process_cpu_seconds(server.pid) - server_cpu0
        finally:
            server.terminate()
            server.wait()
        n = sum(len(p.requests) for p in plans)
        assert result.exit_code == 0, f"run failed with exit code {result.exit_code}"
        print(f"machine: {machine()}")
        print(f"requests: {n} MMLU samples (+ pilot inside), concurrency {args.concurrency}, "
              f"streaming {'off' if args.no_stream else 'on'}")
        print(f"plan + data load: {plan_s:.2f} s")
        print(f"run wall time: {wall:.2f} s -> {n / wall:,.0f} requests/s")
        print(f"client CPU: {1000 * cpu / n:.2f} ms/request (user+sys of this process during the run)")
        print(f"fake server CPU: {1000 * server_cpu / n:.2f} ms/request (its own process)")
        if args.reasoning_words > 24:
            chunks = n * (args.reasoning_words + 8)
            print(f"streamed chunks: {chunks:,} -> client CPU {1e6 * cpu / chunks:.1f} us/chunk (upper bound)")


if __name__ == "__main__":
    main()
