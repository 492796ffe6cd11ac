"""Reading YAML input and validating it with pydantic, turning every problem into a one-line UserError that
names the file and the field path (e.g. `run.yaml: tasks.0.samples: Input should be greater than 0`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from evalpipe.errors import UserError

Model = TypeVar("Model", bound=BaseModel)


def _dispatch_tag(part: object) -> bool:
    """A union member's Tag written as <name> only routes validation; it is left out of field paths."""
    return isinstance(part, str) and part.startswith("<") and part.endswith(">")


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"] if not _dispatch_tag(p)) or "(top level)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None


def validated(model: type[Model], raw: Any, source: str) -> Model:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{source}: {format_validation_error(exc)}") from None
