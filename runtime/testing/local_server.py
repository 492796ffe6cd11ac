"""A complete server (engine thread + FastAPI app + uvicorn) inside the test process, on 127.0.0.1 and an
ephemeral port."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import uvicorn

from runtime.model_api import CausalLM
from runtime.server.app import create_app
from runtime.server.launch import build_engine, build_state, start_in_thread
from runtime.server.options import EngineOptions


@contextmanager
def serve_in_thread(app, startup_timeout_s: float = 20.0) -> Iterator[str]:
    """Run an ASGI app on a background thread; yields the base URL (http://127.0.0.1:PORT)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    try:
        thread = start_in_thread(server, startup_timeout_s)
    except SystemExit:
        raise RuntimeError("test server did not start") from None
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def local_server(model: CausalLM, tokenizer: Any, name: str, options: EngineOptions, **state_options) -> Iterator[str]:
    """Serve `model` on CPU under the API name `name`; yields the base URL. `state_options` go to build_state
    (api_key, reasoning_parser)."""
    engine = build_engine(model, tokenizer, {tokenizer.eos_token_id}, options, torch.device("cpu"), len(tokenizer))
    state = build_state(engine, name, **state_options)
    try:
        with serve_in_thread(create_app(state)) as url:
            yield url
    finally:
        state.engine.shutdown()
