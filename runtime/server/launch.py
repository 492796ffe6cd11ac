"""Wiring: a loaded CausalLM + tokenizer -> engine -> FastAPI app -> uvicorn."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import uvicorn

from evalpipe.errors import UserError
from runtime.engine.async_engine import AsyncEngine
from runtime.engine.engine import EngineConfig, LLMEngine
from runtime.engine.model_runner import ModelRunner
from runtime.errors import CheckpointError
from runtime.model_api import CausalLM
from runtime.server.app import create_app
from runtime.server.reasoning import PARSERS
from runtime.server.serving import ServerState
from runtime.server.tokenizer import eos_token_ids, load_tokenizer

log = logging.getLogger(__name__)

_GIB = 1 << 30


@dataclass(frozen=True)
class EngineOptions:
    max_model_len: int  # longest prompt + output; lowered to the KV capacity when that is smaller
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_gib: float | None = None  # None: 2 GiB on CPU, 80% of free memory on a GPU


def _kv_budget_bytes(options: EngineOptions, device: torch.device) -> int:
    if options.kv_cache_gib is not None:
        return int(options.kv_cache_gib * _GIB)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.8 * free)
    return 2 * _GIB


def build_engine(model: CausalLM, tokenizer: Any, eos_token_ids: set[int], options: EngineOptions,
                 device: torch.device, vocab_size: int | None = None) -> LLMEngine:
    """Size the KV cache from the memory budget (never more than max_num_seqs full-length sequences need)."""
    spec = model.kv_cache_spec()
    bytes_per_block = spec.bytes_per_token * options.block_size
    wanted_blocks = options.max_num_seqs * -(-options.max_model_len // options.block_size)
    num_blocks = min(wanted_blocks, _kv_budget_bytes(options, device) // bytes_per_block)
    if num_blocks < 1:
        raise ValueError(f"the KV cache budget holds no block of {bytes_per_block} bytes; raise --kv-cache-gib")
    max_model_len = min(options.max_model_len, num_blocks * options.block_size)
    if max_model_len < options.max_model_len:
        log.warning("KV cache holds %d tokens: max_model_len lowered from %d to %d",
                    num_blocks * options.block_size, options.max_model_len, max_model_len)
    log.info("KV cache: %d blocks x %d tokens, %.2f GiB", num_blocks, options.block_size,
             num_blocks * bytes_per_block / _GIB)
    config = EngineConfig(max_model_len=max_model_len, num_blocks=num_blocks, block_size=options.block_size,
                          max_num_seqs=options.max_num_seqs, max_num_batched_tokens=options.max_num_batched_tokens,
                          vocab_size=vocab_size)
    return LLMEngine(ModelRunner(model, num_blocks, options.block_size, device), tokenizer, config, eos_token_ids)


def build_state(engine: LLMEngine, model_name: str, api_key: str | None = None,
                reasoning_parser: str | None = None) -> ServerState:
    """Start the engine thread and bundle what the HTTP layer needs."""
    if reasoning_parser is not None and reasoning_parser not in PARSERS:
        raise ValueError(f"unknown reasoning parser {reasoning_parser!r}; known: {', '.join(PARSERS)}")
    async_engine = AsyncEngine(engine)
    async_engine.start()
    return ServerState(engine=async_engine, tokenizer=engine.tokenizer, model_name=model_name,
                       max_model_len=engine.config.max_model_len, api_key=api_key,
                       reasoning=PARSERS[reasoning_parser] if reasoning_parser else None)


@dataclass(frozen=True)
class ServeOptions:
    """Everything `evalpipe serve` takes."""

    model_dir: Path
    quantization: str = "auto"
    moe_backend: str = "auto"
    dtype: str = "bfloat16"
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    served_model_name: str | None = None  # default: the model directory's name
    max_model_len: int | None = None  # default: max_position_embeddings of config.json
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    kv_cache_gib: float | None = None
    reasoning_parser: str | None = None


def run_server(options: ServeOptions) -> None:
    """Load the checkpoint and tokenizer, start the engine, serve HTTP until interrupted."""
    from runtime.models import load_model  # the model families; imported here to keep `evalpipe --help` fast

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = load_tokenizer(options.model_dir)
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())  # transformers' messages span lines; the CLI shows one
        raise CheckpointError(f"{options.model_dir}: cannot load its tokenizer ({reason})") from None
    model, config = load_model(options.model_dir, quantization=options.quantization, dtype=options.dtype,
                               moe_backend=options.moe_backend, device=device)
    engine_options = EngineOptions(
        max_model_len=options.max_model_len or config.max_position_embeddings,
        max_num_seqs=options.max_num_seqs,
        max_num_batched_tokens=options.max_num_batched_tokens,
        kv_cache_gib=options.kv_cache_gib,
    )
    eos = eos_token_ids(options.model_dir, tokenizer) | set(config.eos_token_ids)
    try:
        engine = build_engine(model, tokenizer, eos, engine_options, device, config.vocab_size)
    except ValueError as exc:  # a KV budget or context length that cannot work
        raise UserError(str(exc)) from None
    state = build_state(engine, options.served_model_name or options.model_dir.name, options.api_key,
                        options.reasoning_parser)
    log.info("serving %s as %r on http://%s:%d (max_model_len %d)", options.model_dir, state.model_name,
             options.host, options.port, state.max_model_len)
    try:
        uvicorn.run(create_app(state), host=options.host, port=options.port, log_level="info")
    finally:
        state.engine.shutdown()
