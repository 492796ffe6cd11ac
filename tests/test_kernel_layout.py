"""CPU checks of the SM90 kernel's data layouts: weight packing vs CuTe's wgmma fragments, SwiGLU row order,
and a compile of csrc/ for sm_90a. Needs nvcc and the nvidia-cutlass headers; skips with the reason otherwise."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from runtime.kernels import build
from runtime.kernels.wgmma_layout import pack_wgmma_a_operand, prepare_scales, swiglu_row_order
from runtime.quant.numerics import pack_int4

REPO = Path(__file__).resolve().parents[1]


def _toolchain_or_skip() -> Path:
    reason = build.toolchain_missing_reason()
    if reason:
        pytest.skip(reason)
    return build.cutlass_include_dir()


@pytest.fixture(scope="module")
def cute_layouts(tmp_path_factory) -> dict[str, list[tuple[int, ...]]]:
    include = _toolchain_or_skip()
    exe = tmp_path_factory.mktemp("probe") / "probe"
    src = REPO / "tests" / "cuda" / "wgmma_layout_probe.cu"
    subprocess.run(["nvcc", "-std=c++17", "--expt-relaxed-constexpr", f"-I{include}", str(src), "-o", str(exe)], check=True)
    rows: dict[str, list[tuple[int, ...]]] = {"A": [], "C": [], "CONVERT_BAD": []}
    for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines():
        tag, *vals = line.split()
        rows[tag].append(tuple(int(v) for v in vals))
    return rows


def test_int4_to_e4m3_lookup_is_exact(cute_layouts):
    assert cute_layouts["CONVERT_BAD"] == [(0,)]


def test_packed_weights_follow_the_wgmma_a_fragment(cute_layouts):
    q = torch.randint(-8, 8, (1, 64, 64), dtype=torch.int8)
    prepared = pack_wgmma_a_operand(pack_int4(q))[0, 0, 0]  # [128 threads, 16 bytes]
    assert len(cute_layouts["A"]) == 128 * 2 * 16
    words = prepared.to(torch.int64).reshape(128, 4, 4)
    words = (words << torch.tensor([0, 8, 16, 24])).sum(-1)  # [thread, word], little-endian
    for t, step, v, m, k in cute_layouts["A"]:
        # The kernel's read order: register r = v // 4 of k-step `step` is value a (r even) or b (r odd) of word
        # 2 * step + r // 2; v % 4 is the element i (int4_to_fp8.cuh documents the bit fields).
        r, i = v // 4, v % 4
        word = int(words[t, 2 * step + r // 2])
        index = (word >> (16 * (r % 2) + 4 * i)) & 7
        sign = (word >> (8 * i + (3 if r % 2 else 7))) & 1
        assert index - 8 * sign == int(q[0, m, k]), (t, step, v)


def test_epilogue_coordinates_match_the_accumulator_fragment(cute_layouts):
    # csrc/w4afp8 epilogue: accumulator i of thread t is token 8*(i//4) + 2*(t%4) + i%2 and tile row
    # 16*(t//32) + (t%32)//4 + 8*((i//2)%2).
    assert len(cute_layouts["C"]) == 128 * 8
    for t, i, m, n in cute_layouts["C"]:
        assert n == 8 * (i // 4) + 2 * (t % 4) + i % 2
        assert m == 16 * (t // 32) + (t % 32) // 4 + 8 * ((i // 2) % 2)


@pytest.mark.parametrize("inter", [32, 192, 256])
def test_swiglu_row_order_pairs_gate_and_up_in_one_thread(inter):
    order = swiglu_row_order(inter).reshape(-1, 64)
    assert sorted(order.reshape(-1).tolist()) == list(range(2 * inter))
    for tile, rows in enumerate(order.tolist()):
        for r in range(64):
            if r % 16 < 8:  # this thread's partner row r + 8 must be the up row of the same neuron
                assert rows[r] < inter and rows[r + 8] == rows[r] + inter
                assert rows[r] == 32 * tile + 8 * (r // 16) + r % 8


def test_pack_rejects_unaligned_shapes():
    with pytest.raises(ValueError, match="multiples of 64"):
        pack_wgmma_a_operand(torch.zeros(1, 96, 32, dtype=torch.int8))


def test_prepare_scales_rounds_to_bf16_and_puts_groups_first():
    s = torch.rand(2, 64, 3)
    out = prepare_scales(s)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 64)
    assert torch.equal(out[1, 2], s[1, :, 2].to(torch.bfloat16))


@pytest.mark.slow
def test_kernels_compile_for_sm90a(tmp_path):
    """The CPU CI compiles the device code (no binding, no run) so kernel edits fail fast without a GPU."""
    _toolchain_or_skip()
    obj = build.compile_kernels_only(tmp_path)
    assert obj.stat().st_size > 0
