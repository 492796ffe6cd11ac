"""The verdict logic of bench/gpu_serving.py (the GPU serving check): what makes a served variant fail."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("gpu_serving", Path(__file__).resolve().parents[1] / "bench" / "gpu_serving.py")
gpu_serving = importlib.util.module_from_spec(_spec)
sys.modules["gpu_serving"] = gpu_serving  # dataclasses look their module up there
_spec.loader.exec_module(gpu_serving)

LOG = """INFO:     127.0.0.1:40112 - "POST /v1/completions HTTP/1.1" 200 OK
INFO:     127.0.0.1:40113 - "GET /health HTTP/1.1" 503 Service Unavailable
INFO:     127.0.0.1:40114 - "POST /v1/completions HTTP/1.1" 503 Service Unavailable
ERROR engine step failed: RuntimeError: CUDA error: an illegal memory access was encountered
INFO:     127.0.0.1:40115 - "POST /v1/completions HTTP/1.1" 400 Bad Request
"""


def _server(**levels) -> "gpu_serving.ServerResult":
    s = gpu_serving.ServerResult("w4afp8", "cutlass", started=True)
    s.levels = [gpu_serving.LevelResult(c, {"successful": 4, "failed": f}, True) for c, f in levels.items()]
    return s


def test_log_scan_counts_5xx_and_engine_errors_only():
    n_5xx, errors = gpu_serving.scan_server_log(LOG)
    assert n_5xx == 2  # the 400 is a client mistake, not a server failure
    assert len(errors) == 1 and "illegal memory access" in errors[0]


def test_failed_requests_5xx_engine_errors_and_dead_servers_fail():
    clean = _server(c1=0, c16=0)
    assert gpu_serving.failures(clean) == []
    failed = _server(c1=0, c16=2)
    assert gpu_serving.failures(failed) == ["w4afp8:cutlass: 2 failed requests at concurrency c16"]
    clean.http_5xx, clean.engine_errors = gpu_serving.scan_server_log(LOG)
    assert len(gpu_serving.failures(clean)) == 2
    down = gpu_serving.ServerResult("fp8", "auto", started=False)
    assert gpu_serving.failures(down) == ["fp8:auto: the server did not come up"]
    unhealthy = _server(c1=0)
    unhealthy.levels[0].healthy_after = False
    assert "/health not ok" in gpu_serving.failures(unhealthy)[0]


def test_greedy_agreement_against_the_torch_server():
    torch_side = gpu_serving.ServerResult("w4afp8", "torch", started=True, greedy=["1 2 3", "4 5"],
                                          first_token_margins=[0.5, 0.02])
    fast = gpu_serving.ServerResult("w4afp8", "cutlass", started=True, greedy=["1 2 9", "7 5"],
                                    first_token_margins=[0.4, 0.01])
    other = gpu_serving.ServerResult("fp8", "auto", started=True, greedy=["1"])
    agreement = gpu_serving.greedy_agreements([torch_side, fast, other], lambda text: [int(t) for t in text.split()])
    assert set(agreement) == {"w4afp8:cutlass"}  # fp8 has no torch server to compare with
    # the torch server's margin is reported where the first tokens differ (the second prompt)
    assert agreement["w4afp8:cutlass"] == {"first_token": 0.5, "mean_prefix": 1.0, "identical": 0.0,
                                           "ref_margins_where_first_differs": [0.02]}

    # Token ids, where both servers gave them, decide: here the texts agree but the ids do not (two ids of
    # one text, or an id the tokenizer cannot render).
    torch_side.greedy_ids, fast.greedy_ids = [[1, 2, 3], [4, 5]], [[1, 2, 9], [6, 5]]
    fast.greedy = torch_side.greedy
    by_ids = gpu_serving.greedy_agreements([torch_side, fast], lambda text: [int(t) for t in text.split()])
    assert by_ids["w4afp8:cutlass"]["first_token"] == 0.5 and by_ids["w4afp8:cutlass"]["mean_prefix"] == 1.0


def test_top2_margin_of_a_position():
    assert abs(gpu_serving.top2_margin({"a": -0.5, "b": -1.25}) - 0.75) < 1e-12
    assert abs(gpu_serving.top2_margin({"b": -2.0, "a": -0.1}) - 1.9) < 1e-12  # order of the entries does not matter
    assert gpu_serving.top2_margin({"a": -0.1}) != gpu_serving.top2_margin({"a": -0.1})  # NaN: one alternative only
    assert gpu_serving.top2_margin(None) != gpu_serving.top2_margin(None)


def test_sweep_levels_per_server():
    assert gpu_serving.sweep_levels("all", "fp8:auto", [1, 16, 64]) == [1, 16, 64]
    spec = "w4afp8:cutlass,fp8:auto=1/16"
    assert gpu_serving.sweep_levels(spec, "w4afp8:cutlass", [1, 16, 64]) == [1, 16, 64]
    assert gpu_serving.sweep_levels(spec, "fp8:auto", [1, 16, 64]) == [1, 16]
    assert gpu_serving.sweep_levels(spec, "w4afp8:torch", [1, 16, 64]) == []  # greedy check only
