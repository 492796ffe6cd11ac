"""`evalpipe baseline calibrate-divergence`: measure the divergence probe's null once and store it with a registry
baseline (evalpipe.divergence.DivergenceNull; the limit it implies is used by configs that name it under
`divergence.null`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evalpipe.cli.results import RegistryDir
from evalpipe.console import stdout, user_errors
from evalpipe.divergence import NULL_QUANTILE
from evalpipe.divergence_probe import calibrate_from_runs
from evalpipe.registry import DEFAULT_REGISTRY_DIR, save_divergence_null


@user_errors
def calibrate_divergence(
    run_dirs: Annotated[list[Path], typer.Argument(help="finished A/A runs with a divergence probe (the baseline "
                                                        "model on both sides, e.g. configs/quickstart_null.yaml)")],
    name: Annotated[str, typer.Option("--name", help="the registry baseline to store the null with")],
    tolerance: Annotated[float, typer.Option(help="nats of mean KL accepted beyond the null's quantile")],
    quantile: Annotated[float, typer.Option(help="upper quantile of the null's mean KL")] = NULL_QUANTILE,
    answers: Annotated[int | None, typer.Option(min=1, help="probe size the quantile is for (default: the runs' "
                                                            "divergence limit)")] = None,
    registry_dir: RegistryDir = DEFAULT_REGISTRY_DIR,
    force: Annotated[bool, typer.Option("--force", help="replace a stored null")] = False,
) -> None:
    """Store the divergence null of A/A runs with a registry baseline; print its quantile and the max_kld it implies."""
    null = calibrate_from_runs(run_dirs, tolerance, quantile, answers)
    path = save_divergence_null(null, name, registry_dir, force)
    per_run = "; ".join(f"{run['answers']} answers, mean {run['mean_kld']:.4g}" for run in null.runs)
    stdout.print(f"null of {len(null.per_answer_kld)} answers from {len(null.runs)} A/A runs ({per_run}): "
                 f"{null.quantile:g} quantile of the mean KL at {null.answers} answers {null.null_kld:.4g} nats; "
                 f"max_kld {null.max_kld:.4g} = that + tolerance {null.tolerance:g}; saved to {path}",
                 highlight=False, soft_wrap=True)


def register(baseline_app: typer.Typer) -> None:
    baseline_app.command("calibrate-divergence")(calibrate_divergence)
