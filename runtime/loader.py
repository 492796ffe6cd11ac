"""Reading safetensors checkpoints (single file or sharded with an index) straight into a model's parameters.

Tensors are streamed one at a time from memory-mapped files and copied into parameters that were created at
their final size, so the weights are never held twice; a rank reads only the slice it keeps.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from runtime.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# Routed-expert tensors in the names every supported family uses (DeepSeek/Qwen *_proj, Mixtral w1/w2/w3).
EXPERT_NAME = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.(?P<suffix>\w+)$")
EXPERT_SHARD = {"gate_proj": "w1", "w1": "w1", "up_proj": "w3", "w3": "w3", "down_proj": "w2", "w2": "w2"}


class CheckpointTensor:
    """A tensor in a checkpoint file, read lazily (whole or one shard along a dimension)."""

    def __init__(self, name: str, handle, file: Path):
        self.name = name
        self.file = file
        self._handle = handle
        self._slice = handle.get_slice(name)
        self.shape = tuple(self._slice.get_shape())
        self.dtype = _SAFETENSORS_DTYPES.get(self._slice.get_dtype())
        if self.dtype is None:
            raise CheckpointError(f"{file.name}: tensor {name} has unsupported dtype {self._slice.get_dtype()}")

    def read(self) -> torch.Tensor:
        return self._handle.get_tensor(self.name)

    def read_range(self, dim: int, start: int, stop: int) -> torch.Tensor:
        """Only elements [start, stop) along `dim`."""
        index_expr = [slice(None)] * len(self.shape)
        index_expr[dim] = slice(start, stop)
        return self._slice[tuple(index_expr)]

    def read_shard(self, dim: int | None, index: int, count: int, multiple: int = 1) -> torch.Tensor:
        """Part `index` of `count` equal parts along `dim` (the whole tensor when count == 1 or dim is None).

        `multiple`: each part must be a multiple of it (a quantization block or group must not be split).
        """
        if dim is None or count == 1:
            return self.read()
        size = self.shape[dim]
        if size % count or (size // count) % multiple:
            raise CheckpointError(
                f"tensor {self.name}: dimension {dim} of size {size} cannot be split into {count} equal shards"
                + (f" that are multiples of the quantization block {multiple}" if multiple > 1 else "")
            )
        part = size // count
        return self.read_range(dim, index * part, (index + 1) * part)


class CheckpointReader:
    """The tensors of a model directory: `model.safetensors.index.json` if present, else every *.safetensors file."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / INDEX_FILE
        self._handles: dict[Path, object] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({e})") from None
            self.file_of = {name: self.model_dir / file for name, file in weight_map.items()}
        else:
            files = sorted(self.model_dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.model_dir}: no *.safetensors files and no {INDEX_FILE}")
            self.file_of = {name: f for f in files for name in self._handle(f).keys()}
        for f in sorted(set(self.file_of.values())):
            if not f.exists():
                raise CheckpointError(f"{index}: refers to missing file {f.name}")

    def _handle(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{file}: cannot open as safetensors ({e})") from None
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def get(self, name: str) -> CheckpointTensor:
        if name not in self.file_of:
            raise CheckpointError(f"{self.model_dir}: tensor {name} not found")
        file = self.file_of[name]
        return CheckpointTensor(name, self._handle(file), file)

    def __iter__(self) -> Iterator[CheckpointTensor]:
        """Every tensor, file by file (sequential reads of each file)."""
        by_file: dict[Path, list[str]] = {}
        for name, file in self.file_of.items():
            by_file.setdefault(file, []).append(name)
        for file in sorted(by_file):
            handle = self._handle(file)
            for name in sorted(by_file[file]):
                yield CheckpointTensor(name, handle, file)
            self._handles.pop(file, None)  # release the mapping once the file is consumed


def copy_into(param: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    """Copy a checkpoint tensor into (a view of) a parameter, counting the write; dtype changes only among floats."""
    if tuple(src.shape) != tuple(dst.shape):
        # A [1] scale can land in a 0-d slot (per-expert input scales).
        if not (src.numel() == dst.numel() == 1):
            raise CheckpointError(f"tensor {name}: shape {tuple(src.shape)} does not match the expected {tuple(dst.shape)}")
        src = src.reshape(dst.shape)
    if src.dtype != dst.dtype and not (src.dtype in _FLOAT_DTYPES and dst.dtype in _FLOAT_DTYPES):
        raise CheckpointError(
            f"tensor {name}: dtype {src.dtype} where the layer expects {dst.dtype} (is the quantization config right?)"
        )
    dst.copy_(src)
    param.loads += 1


def default_weight_loader(param: nn.Parameter, src: CheckpointTensor) -> None:
    copy_into(param, param.data, src.read(), src.name)


def load_checkpoint(model: nn.Module, reader: CheckpointReader) -> None:
    """Fill every parameter of `model` from `reader`; unknown or missing tensors are errors.

    The model maps checkpoint names with `checkpoint_name(name) -> name | None` (None = not used, e.g. MTP
    layers). Routed-expert tensors go to the FusedMoE module at `<...>.experts` via `load_expert`; every other
    tensor to the parameter of the same dotted name, through its module's `weight_loader` if it has one.
    """
    unexpected: list[str] = []
    for tensor in reader:
        name = model.checkpoint_name(tensor.name)
        if name is None:
            continue
        expert = EXPERT_NAME.match(name)
        try:
            if expert:
                module = model.get_submodule(expert["prefix"])
                module.load_expert(expert["suffix"], tensor, int(expert["expert"]), EXPERT_SHARD[expert["proj"]])
                continue
            module_path, _, param_name = name.rpartition(".")
            module = model.get_submodule(module_path)
            param = module._parameters[param_name]
        except (AttributeError, KeyError):
            unexpected.append(tensor.name)
            continue
        getattr(module, "weight_loader", default_weight_loader)(param, tensor)
    if unexpected:
        more = f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else ""
        raise CheckpointError(f"{reader.model_dir}: tensors not used by {type(model).__name__}: {', '.join(unexpected[:8])}{more}")
    missing = [
        f"{n} ({getattr(p, 'loads', 0)}/{getattr(p, 'expected_loads', 1)} loaded)"
        for n, p in model.named_parameters()
        if getattr(p, "loads", 0) != getattr(p, "expected_loads", 1)
    ]
    if missing:
        more = f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        raise CheckpointError(f"{reader.model_dir}: tensors missing for {', '.join(missing[:8])}{more}")
