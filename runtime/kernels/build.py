"""Build of the SM90 W4AFP8 extension (csrc/w4afp8) against the CUTLASS/CuTe headers of the nvidia-cutlass wheel.

One command on a Hopper machine builds it (about a minute) and checks that it loads:

    python -m runtime.kernels.build

The build is a torch JIT extension cached in $EVALPIPE_KERNEL_BUILD_DIR (default ~/.cache/evalpipe/kernels).
On a CPU machine `compile_kernels_only` still compiles the device code for sm_90a, so kernel edits are checked
without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parents[2] / "csrc" / "w4afp8"
EXTENSION_NAME = "evalpipe_w4afp8"
KERNEL_SOURCE = CSRC / "w4afp8_moe.cu"
BINDING_SOURCE = CSRC / "w4afp8_binding.cpp"
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a"]


def cutlass_include_dir() -> Path:
    """Header folder (cute/, cutlass/) shipped inside the nvidia-cutlass wheel."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-cutlass is not installed (pip install nvidia-cutlass==4.2.0.0): its headers build csrc/")
    include = Path(spec.submodule_search_locations[0]) / "source" / "include"
    if not (include / "cute" / "tensor.hpp").is_file():
        raise RuntimeError(f"nvidia-cutlass at {include.parent} has no cute/ headers")
    return include


def toolchain_missing_reason() -> str | None:
    """Why the device code cannot be compiled here, or None when nvcc and the CUTLASS headers are present."""
    if shutil.which("nvcc") is None:
        return "nvcc is not on PATH"
    try:
        cutlass_include_dir()
    except RuntimeError as err:
        return str(err)
    return None


def cuda_unavailable_reason(device=None) -> str | None:
    """Why the SM90 kernels cannot run on `device` (default: the current GPU), or None when they can."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU (the W4AFP8 CUTLASS kernels need an SM90 GPU)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return f"GPU has compute capability {major}.{minor}; the kernels are built for sm_90a (H100/H200)"
    return toolchain_missing_reason()


def compile_kernels_only(out_dir: Path) -> Path:
    """Compile the device code to an object file (no torch, no GPU needed). Returns the object's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    obj = out_dir / "w4afp8_moe.o"
    cmd = ["nvcc", *NVCC_FLAGS, f"-I{cutlass_include_dir()}", "-c", str(KERNEL_SOURCE), "-o", str(obj)]
    subprocess.run(cmd, check=True)
    return obj


@functools.cache
def load_extension() -> ModuleType:
    """Build (or reuse the cached build of) the extension and import it."""
    reason = cuda_unavailable_reason()
    if reason:
        raise RuntimeError(f"cannot load the W4AFP8 CUTLASS kernels: {reason}")
    from torch.utils.cpp_extension import load

    build_dir = Path(os.environ.get("EVALPIPE_KERNEL_BUILD_DIR", Path.home() / ".cache" / "evalpipe" / "kernels"))
    build_dir.mkdir(parents=True, exist_ok=True)
    logger.info("building %s in %s", EXTENSION_NAME, build_dir)
    return load(
        name=EXTENSION_NAME,
        sources=[str(BINDING_SOURCE), str(KERNEL_SOURCE)],
        extra_include_paths=[str(CSRC), str(cutlass_include_dir())],
        extra_cuda_cflags=NVCC_FLAGS,
        extra_cflags=["-O3"],
        build_directory=str(build_dir),
        verbose=logger.isEnabledFor(logging.DEBUG),
    )


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        ext = load_extension()
    except (RuntimeError, subprocess.CalledProcessError) as err:
        logger.error("%s", err)
        return 1
    logger.info("built and loaded %s from %s", EXTENSION_NAME, ext.__file__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
