"""CLI commands of the runtime's model side: `evalpipe quantize` and `evalpipe model ...`.

Heavy imports happen inside the commands so `evalpipe --help` stays fast. A user mistake (bad directory,
unsupported checkpoint, invalid option) raises CheckpointError, a UserError: one line on stderr, exit code 2.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from runtime.errors import CheckpointError


class Scheme(str, Enum):
    fp8 = "fp8"
    w4afp8 = "w4afp8"


class Preset(str, Enum):
    tiny = "tiny"
    r1 = "r1"


def _setup_logging() -> None:
    from evalpipe.console import setup_logging

    setup_logging(verbose=False)


def quantize_command(
    in_dir: Path = typer.Argument(..., help="Checkpoint to quantize (bf16; or fp8 for --scheme w4afp8)."),
    out_dir: Path = typer.Argument(..., help="Where to write the quantized checkpoint (must not exist or be empty)."),
    scheme: Scheme = typer.Option(..., "--scheme", help="fp8: DeepSeek FP8 block; w4afp8: SGLang's DeepSeek-R1-W4AFP8 format."),
    group_size: int = typer.Option(128, "--group-size", help="W4 group size along K (128, or 64 for narrow models)."),
    calib_samples: int = typer.Option(32, "--calib-samples", help="Calibration prompts for the W4AFP8 activation scales."),
    device: str = typer.Option("cpu", "--device", help="Device that runs the calibration forward passes."),
) -> None:
    """Quantize a checkpoint into DeepSeek's FP8 block format or SGLang's W4AFP8 format."""
    from rich.progress import Progress

    from runtime.quantize import quantize_checkpoint

    if not in_dir.is_dir():
        raise CheckpointError(f"IN_DIR {in_dir} is not a directory")
    _setup_logging()
    with Progress(transient=True) as progress:
        task = progress.add_task("writing tensors", total=None)
        quantize_checkpoint(
            in_dir, out_dir, scheme.value, group_size=group_size, calib_samples=calib_samples, device=device,
            on_tensor=lambda i, n: progress.update(task, completed=i + 1, total=n),
        )
    typer.echo(str(out_dir))


def build_command(
    name: str = typer.Argument(..., help="Model to build: smollm2-moe."),
    out: Path | None = typer.Option(None, "--out", help="Directory for the variants (default: $EVALPIPE_CACHE/models)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the cache is current."),
) -> None:
    """Build the demo MoE (bf16, fp8 and w4afp8 variants) from SmolLM2-135M-Instruct; prints one directory per variant."""
    from runtime.demo_model import DEMO_NAME, build_demo_models

    if name != DEMO_NAME:
        raise CheckpointError(f"unknown model {name!r} (available: {DEMO_NAME})")
    _setup_logging()
    paths = build_demo_models(out, force=force)
    for variant, path in paths.items():
        typer.echo(f"{variant}\t{path}")


def _tokenizer_size(tokenizer_dir: Path) -> int:
    if not tokenizer_dir.is_dir():
        raise CheckpointError(f"--tokenizer-from {tokenizer_dir} is not a directory")
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(tokenizer_dir))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--tokenizer-from {tokenizer_dir}: cannot load a tokenizer ({e})") from None


def synth_command(
    out_dir: Path = typer.Argument(..., help="Where to write the checkpoint."),
    preset: Preset = typer.Option(Preset.tiny, "--preset", help="tiny (CPU tests) or r1 (DeepSeek-R1 widths)."),
    layers: int | None = typer.Option(None, "--layers", help="Decoder layers (default: the preset's)."),
    dense_layers: int | None = typer.Option(None, "--dense-layers", help="Leading dense layers (first_k_dense_replace)."),
    experts: int | None = typer.Option(None, "--experts", help="Routed experts per layer."),
    vocab_size: int | None = typer.Option(None, "--vocab-size", min=1, help="Vocabulary (default: the preset's; at least the --tokenizer-from tokenizer's size)."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device", help="Device that draws the random weights."),
    tokenizer_from: Path | None = typer.Option(None, "--tokenizer-from", help="Copy tokenizer files from this directory."),
) -> None:
    """Write a random DeepSeek-V3/R1-shaped checkpoint in DeepSeek's FP8 block format (for tests and kernels)."""
    from dataclasses import replace

    from runtime.synthetic import R1_SHAPE, DeepseekShape, write_synthetic_deepseek_fp8

    shape = R1_SHAPE if preset is Preset.r1 else DeepseekShape()
    overrides = {"num_hidden_layers": layers, "first_k_dense_replace": dense_layers, "n_routed_experts": experts,
                 "vocab_size": vocab_size}
    shape = replace(shape, **{k: v for k, v in overrides.items() if v is not None})
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir} already exists and is not empty")
    if tokenizer_from is not None:
        tokens = _tokenizer_size(tokenizer_from)
        if tokens > shape.vocab_size:  # its ids would index past the embedding (calibration, serving)
            raise CheckpointError(
                f"--tokenizer-from {tokenizer_from}: the tokenizer has {tokens} tokens but vocab_size is "
                f"{shape.vocab_size}; pass --vocab-size {tokens}"
            )
    _setup_logging()
    write_synthetic_deepseek_fp8(out_dir, shape, seed=seed, device=device, tokenizer_from=tokenizer_from)
    typer.echo(str(out_dir))


def register(app: typer.Typer) -> None:
    from evalpipe.console import user_errors

    model_app = typer.Typer(help="Build the models evalpipe ships and synthetic test checkpoints.", no_args_is_help=True)
    app.command("quantize")(user_errors(quantize_command))
    model_app.command("build")(user_errors(build_command))
    model_app.command("synth-deepseek")(user_errors(synth_command))
    app.add_typer(model_app, name="model")
