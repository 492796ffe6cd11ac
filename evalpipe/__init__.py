"""evalpipe: an accuracy gate for quantized MoE models.

Python API (the same work as the command line):
    outcome = evalpipe.run("configs/smoke.yaml")    # a whole run, as `evalpipe run`; see evalpipe.pipeline
    tables = evalpipe.load_run(outcome.run_dir)       # a finished run as pandas DataFrames; see evalpipe.tables
"""

from evalpipe.version import __version__

__all__ = ["RunOutcome", "RunTables", "__version__", "load_run", "run"]

# Loaded on first use, so that importing a small part of evalpipe (its errors, say) loads no pipeline.
_API = {"run": "evalpipe.pipeline", "RunOutcome": "evalpipe.pipeline", "load_run": "evalpipe.tables",
        "RunTables": "evalpipe.tables"}


def __getattr__(name: str) -> object:
    if name not in _API:
        raise AttributeError(f"module 'evalpipe' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_API[name]), name)
