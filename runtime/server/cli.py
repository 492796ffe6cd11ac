"""`evalpipe serve`: load a checkpoint and serve it over the OpenAI API."""

from __future__ import annotations

import enum
from pathlib import Path

import typer

from runtime.console import setup_logging, user_errors


class Quantization(str, enum.Enum):
    auto = "auto"
    bf16 = "bf16"
    fp8 = "fp8"
    w4afp8 = "w4afp8"


class Dtype(str, enum.Enum):
    bfloat16 = "bfloat16"
    float32 = "float32"


class ReasoningParser(str, enum.Enum):
    deepseek_r1 = "deepseek-r1"


class MoeParallel(str, enum.Enum):
    tp = "tp"
    ep = "ep"


def serve(
    model: Path = typer.Option(..., "--model", help="Model directory (config.json, safetensors, tokenizer).",
                               exists=True, file_okay=False),
    quantization: Quantization = typer.Option(Quantization.auto, help="Weight format; auto detects it."),
    moe_backend: str = typer.Option("auto", help="MoE implementation: auto, torch (the reference) or another "
                                                 "registered backend (checked when the model loads)."),
    dtype: Dtype = typer.Option(Dtype.bfloat16, help="Activation and unquantized-weight dtype."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback unless told otherwise)."),
    port: int = typer.Option(30000, min=1, max=65535),
    api_key: str | None = typer.Option(None, help="Require 'Authorization: Bearer KEY' on /v1 routes."),
    served_model_name: str | None = typer.Option(None, help="Model id in the API (default: directory name)."),
    max_model_len: int | None = typer.Option(None, min=2, help="Prompt + output limit (default: from config.json)."),
    max_num_seqs: int = typer.Option(64, min=1, help="Most sequences in the running batch."),
    max_num_batched_tokens: int = typer.Option(2048, min=1, help="Most tokens per step (prefill chunk size)."),
    kv_cache_gib: float | None = typer.Option(None, min=0.0, help="KV cache memory (default: 2 on CPU, 80% free GPU)."),
    reasoning_parser: ReasoningParser | None = typer.Option(None, help="Split reasoning into reasoning_content."),
    tp: int = typer.Option(1, "--tp", min=1, help="Tensor-parallel ranks, one process each (GPUs: one per rank)."),
    moe_parallel: MoeParallel = typer.Option(MoeParallel.tp, help="Routed experts across ranks: tp (every rank "
                                             "holds all experts, intermediate dimension sharded) or ep (experts "
                                             "partitioned)."),
    deterministic: bool = typer.Option(False, "--deterministic", help="Batch-invariant numerics: a request's "
                                       "output does not depend on the other requests in the batch (slower)."),
    enforce_eager: bool = typer.Option(False, "--enforce-eager", help="Run decode steps eagerly, without the "
                                       "CUDA graphs captured per batch size at start-up (GPU only)."),
) -> None:
    """Serve a model with an OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions)."""
    from runtime.server.launch import run_server  # heavy imports only when serving
    from runtime.server.options import ServeOptions

    setup_logging(verbose=False)
    run_server(ServeOptions(
        model_dir=model, quantization=quantization.value, moe_backend=moe_backend, dtype=dtype.value,
        host=host, port=port, api_key=api_key, served_model_name=served_model_name, max_model_len=max_model_len,
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, kv_cache_gib=kv_cache_gib,
        reasoning_parser=reasoning_parser.value if reasoning_parser else None, tp=tp,
        moe_parallel=moe_parallel.value, deterministic=deterministic, enforce_eager=enforce_eager,
    ))


def register(app: typer.Typer) -> None:
    # A checkpoint or option the runtime cannot use is a UserError: one line on stderr, exit code 2.
    app.command("serve")(user_errors(serve))
