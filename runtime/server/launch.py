"""Wiring: a loaded CausalLM + tokenizer -> engine -> FastAPI app -> uvicorn."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import uvicorn

from runtime.engine.async_engine import AsyncEngine
from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.engine.model_runner import ModelRunner
from runtime.config import CommonConfig
from runtime.errors import CheckpointError, UserError
from runtime.model_api import CausalLM
from runtime.parallel import SINGLE, ParallelContext
from runtime.server.app import create_app
from runtime.server.options import EngineOptions, ServeOptions
from runtime.server.ranks import RankGroup
from runtime.server.reasoning import PARSERS
from runtime.server.serving import ServerState
from runtime.server.tokenizer import eos_token_ids, load_tokenizer

log = logging.getLogger(__name__)

_GIB = 1 << 30
# A loop blocked in a collective with a dead rank never returns; shutting down does not wait for it.
_ENGINE_STOP_TIMEOUT_S = 10.0
# Open streams end once the engine has failed them; a client that keeps its connection does not hold up the exit.
_HTTP_STOP_TIMEOUT_S = 10


def _kv_budget_bytes(options: EngineOptions, device: torch.device) -> int:
    if options.kv_cache_gib is not None:
        return int(options.kv_cache_gib * _GIB)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.8 * free)
    return 2 * _GIB


def kv_cache_blocks(model: CausalLM, options: EngineOptions, device: torch.device) -> int:
    """KV cache blocks the memory budget allows (never more than max_num_seqs full-length sequences need)."""
    bytes_per_block = model.kv_cache_spec().bytes_per_token * options.block_size
    wanted_blocks = options.max_num_seqs * -(-options.max_model_len // options.block_size)
    num_blocks = min(wanted_blocks, _kv_budget_bytes(options, device) // bytes_per_block)
    if num_blocks < 1:
        raise ValueError(f"the KV cache budget holds no block of {bytes_per_block} bytes; raise --kv-cache-gib")
    return num_blocks


def build_engine(model: CausalLM, tokenizer: Any, eos_token_ids: set[int], options: EngineOptions,
                 device: torch.device, vocab_size: int | None = None, *, num_blocks: int | None = None,
                 wrap_runner: Callable[[ModelRunner], Any] | None = None) -> LLMEngine:
    """The engine over a KV cache of `num_blocks` blocks (default: what the memory budget allows).

    wrap_runner: replaces the local ModelRunner by a runner built around it (tensor parallelism).
    """
    if num_blocks is None:
        num_blocks = kv_cache_blocks(model, options, device)
    max_model_len = min(options.max_model_len, num_blocks * options.block_size)
    if max_model_len < options.max_model_len:
        log.warning("KV cache holds %d tokens: max_model_len lowered from %d to %d",
                    num_blocks * options.block_size, options.max_model_len, max_model_len)
    log.info("KV cache: %d blocks x %d tokens, %.2f GiB", num_blocks, options.block_size,
             num_blocks * model.kv_cache_spec().bytes_per_token * options.block_size / _GIB)
    config = EngineConfig(max_model_len=max_model_len, num_blocks=num_blocks, block_size=options.block_size,
                          max_num_seqs=options.max_num_seqs, max_num_batched_tokens=options.max_num_batched_tokens,
                          vocab_size=vocab_size, deterministic=options.deterministic)
    # CUDA graphs on one GPU only: the ranks of tensor parallelism run their steps eagerly.
    graph_batch = 0 if options.enforce_eager or wrap_runner is not None else options.max_num_seqs
    runner = ModelRunner(model, num_blocks, options.block_size, device, batch_invariant=options.deterministic,
                         cuda_graph_batch=graph_batch, max_model_len=max_model_len)
    return LLMEngine(wrap_runner(runner) if wrap_runner else runner, tokenizer, config, eos_token_ids)


def build_state(engine: LLMEngine, model_name: str, api_key: str | None = None,
                reasoning_parser: str | None = None, engine_thread: bool = True) -> ServerState:
    """Bundle what the HTTP layer needs; with `engine_thread` the engine loop starts on its own thread, otherwise
    the caller runs it (`state.engine.run()`)."""
    if reasoning_parser is not None and reasoning_parser not in PARSERS:
        raise ValueError(f"unknown reasoning parser {reasoning_parser!r}; known: {', '.join(PARSERS)}")
    async_engine = AsyncEngine(engine)
    if engine_thread:
        async_engine.start()
    return ServerState(engine=async_engine, tokenizer=engine.tokenizer, model_name=model_name,
                       max_model_len=engine.config.max_model_len, api_key=api_key,
                       reasoning=PARSERS[reasoning_parser] if reasoning_parser else None)


def start_in_thread(server: uvicorn.Server, startup_timeout_s: float | None = None,
                    on_exit: Callable[[], None] | None = None) -> threading.Thread:
    """Run a uvicorn server on a background thread (`on_exit` is called when it ends); returns once it listens.
    SystemExit(1) if it cannot start (uvicorn has logged why: the port is taken, say) or has not started within
    `startup_timeout_s`."""

    def serve() -> None:
        try:
            server.run()
        finally:
            if on_exit is not None:
                on_exit()

    thread = threading.Thread(target=serve, name="http", daemon=True)
    thread.start()
    deadline = None if startup_timeout_s is None else time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or (deadline is not None and time.monotonic() > deadline):
            server.should_exit = True
            raise SystemExit(1)
        time.sleep(0.01)
    return thread


def load_served_model(options: ServeOptions, parallel: ParallelContext, device: torch.device
                      ) -> tuple[CausalLM, CommonConfig]:
    """This rank's shard of the served checkpoint (every rank loads through here)."""
    from runtime.models import load_model  # the model families; imported here to keep `evalpipe --help` fast

    return load_model(options.model_dir, quantization=options.quantization, dtype=options.dtype,
                      moe_backend=options.moe_backend, parallel=parallel, device=device,
                      batch_invariant=options.deterministic)


def run_server(options: ServeOptions) -> None:
    """Load the checkpoint and tokenizer, start the engine (and the other ranks), serve HTTP until interrupted.

    Ctrl-C and SIGTERM stop it the same way: the engine loop, then the other ranks, then the process.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # SystemExit unwinds through the clean-ups
        # Ctrl-C stops the server even when started with SIGINT ignored (a shell's background job), as it did
        # while uvicorn, which installs its own handler, ran on this thread
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        tokenizer = load_tokenizer(options.model_dir)
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())  # transformers' messages span lines; the CLI shows one
        raise CheckpointError(f"{options.model_dir}: cannot load its tokenizer ({reason})") from None
    if options.tp == 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, config = load_served_model(options, SINGLE, device)
        engine = _engine(model, config, tokenizer, options, device)
        _serve(engine, options)
        return
    with RankGroup.launch(options) as ranks:
        model, config = load_served_model(options, ranks.parallel, ranks.device)
        num_blocks = ranks.start_collectives(_local_kv_blocks(model, options, config, ranks.device))
        engine = _engine(model, config, tokenizer, options, ranks.device, num_blocks=num_blocks,
                         wrap_runner=ranks.runner)
        _serve(engine, options, ranks)


def _local_kv_blocks(model: CausalLM, options: ServeOptions, config: CommonConfig, device: torch.device) -> int:
    try:
        return kv_cache_blocks(model, options.engine_options(config), device)
    except ValueError as exc:  # a KV budget that cannot work
        raise UserError(str(exc)) from None


def _engine(model: CausalLM, config: CommonConfig, tokenizer: Any, options: ServeOptions, device: torch.device,
            **build_options) -> LLMEngine:
    eos = eos_token_ids(options.model_dir, tokenizer) | set(config.eos_token_ids)
    try:
        return build_engine(model, tokenizer, eos, options.engine_options(config), device, config.vocab_size,
                            **build_options)
    except ValueError as exc:  # a KV budget or context length that cannot work
        raise UserError(str(exc)) from None


def _serve(engine: LLMEngine, options: ServeOptions, ranks: RankGroup | None = None) -> None:
    """One process: the engine loop on this thread, HTTP on a background one (torch's CPU kernels are faster on
    the main thread). With other ranks the loop keeps its own thread: it can block in a collective with a dead
    rank, and only the main thread receives Ctrl-C and SIGTERM."""
    state = build_state(engine, options.served_model_name or options.model_dir.name, options.api_key,
                        options.reasoning_parser, engine_thread=ranks is not None)
    if ranks is not None:
        ranks.on_failure(state.engine.fail)
    log.info("serving %s as %r on http://%s:%d (max_model_len %d%s%s)", options.model_dir, state.model_name,
             options.host, options.port, state.max_model_len,
             f", tp {options.tp} {options.moe_parallel}" if options.tp > 1 else "",
             ", deterministic" if options.deterministic else "")
    app = create_app(state)
    if ranks is None:
        _serve_engine_on_this_thread(state, app, options)
    else:
        _serve_engine_on_its_thread(state, app, options, ranks)


def _serve_engine_on_this_thread(state: ServerState, app: Any, options: ServeOptions) -> None:
    server = uvicorn.Server(uvicorn.Config(app, host=options.host, port=options.port, log_level="info",
                                           timeout_graceful_shutdown=_HTTP_STOP_TIMEOUT_S))
    http = start_in_thread(server, on_exit=state.engine.shutdown)
    try:
        state.engine.run()  # returns if the engine fails (HTTP stays up to report it) or HTTP has ended
        http.join()
    except KeyboardInterrupt:  # Ctrl-C is how a server is stopped, as SIGTERM is (SystemExit(0))
        log.info("stopping")
    finally:  # the engine has failed the open streams, so HTTP can drain and stop
        server.should_exit = True
        http.join(timeout=_HTTP_STOP_TIMEOUT_S + 5)


def _serve_engine_on_its_thread(state: ServerState, app: Any, options: ServeOptions, ranks: RankGroup) -> None:
    try:
        uvicorn.run(app, host=options.host, port=options.port, log_level="info")
    finally:
        stopped = state.engine.shutdown(timeout=_ENGINE_STOP_TIMEOUT_S)
        # The peers wait for rank 0's next step: tell them to stop, unless the step channel may be mid-step.
        ranks.peers_idle = stopped and state.engine.error is None
