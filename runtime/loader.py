"""Reading safetensors checkpoints (single file or sharded with an index) straight into a model's parameters.

Tensors are streamed one at a time from memory-mapped files and copied into parameters that were created at
their final size, so the weights are never held twice; a rank reads only the slice it keeps.

Loading follows the files, as SGLang does (it reads the contents of the files the index names): an index entry
whose file does not exist, or whose file does not hold that tensor, has no data. NVIDIA's
quantize_mixed_precision_moe.py writes such indexes for DeepSeek-R1: it quantizes layers below
num_hidden_layers only, yet lists every tensor of the multi-token-prediction layer 61, and with `--parts 1`
names a file for it that it never creates. Entries without data are skipped, with one warning, when they belong
to tensors the model does not serve (`checkpoint_name` None: MTP layers, layers >= num_hidden_layers); one of a
served tensor is a CheckpointError naming the tensor and the file.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from runtime.errors import CheckpointError

log = logging.getLogger(__name__)

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
        try:
            self._slice = handle.get_slice(name)
        except SafetensorError as e:  # CheckpointReader checks names against the file headers; this is a last guard
            raise CheckpointError(f"{file}: cannot read tensor {name} ({e})") from None
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
    """The tensors of a model directory: `model.safetensors.index.json` if present, else every *.safetensors file.

    With an index, `file_of` holds the entries whose file holds the tensor, and `absent` (name -> the file the
    index names) the others: a missing file, or a file without that tensor. `check_absent` decides whether the
    model needs any of them. Tensors a file holds but the index does not list are not read.
    """

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / INDEX_FILE
        self._handles: dict[Path, object] = {}
        self.file_of: dict[str, Path] = {}
        self.absent: dict[str, Path] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                listed: dict[Path, list[str]] = {}
                for name, file in weight_map.items():
                    listed.setdefault(self.model_dir / file, []).append(name)
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index with a weight_map of tensor -> file ({e})") from None
            for file, names in sorted(listed.items()):
                held = set(self._handle(file).keys()) if file.is_file() else set()
                for name in names:
                    if name in held:
                        self.file_of[name] = file
                    else:
                        self.absent[name] = file
        else:
            files = sorted(self.model_dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.model_dir}: no *.safetensors files and no {INDEX_FILE}")
            self.file_of = {name: f for f in files for name in self._handle(f).keys()}

    def describe_absent(self, name: str) -> str:
        """Where the index says `name` is, and why it is not there (for one-line errors)."""
        file = self.absent[name]
        why = "which does not exist" if not file.is_file() else "which does not hold it"
        return f"{INDEX_FILE} lists tensor {name} in {file.name}, {why}"

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
        if name in self.absent:
            raise CheckpointError(f"{self.model_dir}: {self.describe_absent(name)}")
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


def check_absent(reader: CheckpointReader, checkpoint_name: Callable[[str], str | None]) -> None:
    """Index entries without data: a CheckpointError naming the first the model serves (`checkpoint_name` not
    None), else one warning counting the skipped ones (SGLang never sees them, since it reads the files)."""
    served = sorted(name for name in reader.absent if checkpoint_name(name) is not None)
    if served:
        more = f" (and {len(served) - 1} more tensors the model needs)" if len(served) > 1 else ""
        raise CheckpointError(f"{reader.model_dir}: {reader.describe_absent(served[0])}{more}")
    if reader.absent:
        missing_files = sorted({f.name for f in reader.absent.values() if not f.is_file()})
        log.warning(
            "%s: skipped %d index entries with no data, all of tensors the runtime does not serve (multi-token "
            "prediction layers, layers >= num_hidden_layers)%s",
            reader.model_dir, len(reader.absent),
            f"; missing files: {', '.join(missing_files)}" if missing_files else "",
        )


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
    """Fill every parameter of `model` from `reader`; unknown or missing tensors are errors (index entries
    without data only where the model serves them, see `check_absent`).

    The model maps checkpoint names with `checkpoint_name(name) -> name | None` (None = not used, e.g. MTP
    layers). Routed-expert tensors go to the FusedMoE module at `<...>.experts` via `load_expert`; every other
    tensor to the parameter of the same dotted name, through its module's `weight_loader` if it has one.
    """
    check_absent(reader, model.checkpoint_name)
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
    # SGLang leaves a missing input_scale at its initial 1.0, which then becomes the layer's static FP8 scale (the
    # max over experts) and silently coarsens every expert's activations: refuse instead, naming the experts.
    no_scale = [
        f"{path}.{tensor}" for path, m in model.named_modules() if hasattr(m, "unloaded_expert_scalars")
        for tensor in m.unloaded_expert_scalars()
    ]
    if no_scale:
        more = f" (+{len(no_scale) - 4} more)" if len(no_scale) > 4 else ""
        raise CheckpointError(
            f"{reader.model_dir}: routed experts without their activation scale: {', '.join(no_scale[:4])}{more} "
            "(SGLang would use 1.0 for them; the runtime refuses, see runtime/README.md)"
        )
    missing = [
        f"{n} ({getattr(p, 'loads', 0)}/{getattr(p, 'expected_loads', 1)} loaded)"
        for n, p in model.named_parameters()
        if getattr(p, "loads", 0) != getattr(p, "expected_loads", 1)
    ]
    if missing:
        more = f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        raise CheckpointError(f"{reader.model_dir}: tensors missing for {', '.join(missing[:8])}{more}")
