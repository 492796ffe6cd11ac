"""The Triton paged MLA decode kernel (runtime.kernels.mla_decode) against a float64 reference, and MLA's decode
path through it against runtime.layers.attention. On CPU through Triton's interpreter at small shapes; on a GPU
(tests run there by scripts/gpu_kernels.sh) natively. Skips when Triton is not installed."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="Triton is not installed (pip install triton==3.6.0 to run these)")

from runtime.kernels.mla_decode import mla_decode  # noqa: E402
from runtime.layers.attention import AttentionMetadata  # noqa: E402
from runtime.model_api import ForwardBatch  # noqa: E402
from runtime.models.deepseek_v3 import MLAttention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LATENT, ROPE, HEADS, BLOCK = 64, 16, 20, 16  # 20 heads: one full and one partial block of 16


def _paged_case(lens: list[int], dtype: torch.dtype, seed: int):
    """A cache whose sequences own shuffled blocks, and one query per sequence."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(n / BLOCK) for n in lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=gen)
    table = torch.full((len(lens), max(blocks_per_seq)), -1, dtype=torch.long)
    used = 0
    for b, nb in enumerate(blocks_per_seq):
        table[b, :nb] = order[used : used + nb]
        used += nb
    kv = torch.randn(num_blocks * BLOCK, LATENT + ROPE, generator=gen)
    q = torch.randn(len(lens), HEADS, LATENT + ROPE, generator=gen)
    return q.to(dtype).to(DEVICE), kv.to(dtype).to(DEVICE), table.to(DEVICE)


def _reference(q, kv, slot_table, lens, scale):
    out = []
    for b, n in enumerate(lens):
        k = kv[slot_table[b, :n]].double()
        p = torch.softmax(q[b].double() @ k.T * scale, dim=-1)
        out.append(p @ k[:, :LATENT])
    return torch.stack(out)


@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_decode_matches_reference(dtype, splits):
    lens = [1, 37, 100]
    q, kv, table = _paged_case(lens, dtype, seed=len(lens) + (splits or 0))
    slot_table = (table.clamp(min=0)[:, :, None] * BLOCK + torch.arange(BLOCK, device=DEVICE)).flatten(1)
    lens_t = torch.tensor(lens, device=DEVICE)
    scale = 0.11
    out = mla_decode(q, kv, slot_table, lens_t, LATENT, scale, splits=splits)
    ref = _reference(q, kv, slot_table, lens, scale)
    assert out.dtype == dtype and out.shape == (len(lens), HEADS, LATENT)
    err = (out.double() - ref).norm() / ref.norm()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), f"relative error {err:.2e}"


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_mla_decode_path_matches_torch_attention(batch_invariant):
    """A step with a prompt chunk and three decoding sequences: decode rows through the kernel (as a group, or one
    sequence at a time in batch-invariant mode), the prompt through runtime.layers.attention; every row must
    match the torch path."""
    query_lens, context_lens = [1, 5, 1, 1], [40, 5, 17, 70]
    q, kv, table = _paged_case(context_lens, torch.float32, seed=5)
    slot_mapping = torch.cat([table[b, (pos := torch.arange(c - n, c, device=DEVICE)) // BLOCK] * BLOCK + pos % BLOCK
                              for b, (n, c) in enumerate(zip(query_lens, context_lens))])
    batch = ForwardBatch(input_ids=torch.zeros(sum(query_lens), dtype=torch.long), positions=torch.zeros(0),
                         query_lens=query_lens, context_lens=context_lens, block_tables=table, slot_mapping=slot_mapping,
                         kv_caches=[kv], block_size=BLOCK, batch_invariant=batch_invariant)
    meta = AttentionMetadata.from_batch(batch)
    assert (meta.decode is None) == batch_invariant
    rows = torch.randn(sum(query_lens), HEADS, LATENT + ROPE, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    attn = SimpleNamespace(kv_lora=LATENT, scale=0.09, decode_kernel=mla_decode)
    fast = MLAttention._attend(attn, rows, kv, meta)
    attn.decode_kernel = None
    torch.testing.assert_close(fast, MLAttention._attend(attn, rows, kv, meta), rtol=1e-4, atol=1e-5)


def test_captured_decode_metadata_matches_the_eager_one():
    """The CUDA-graph runner's metadata (device context lengths, block tables wider than any sequence, padded with
    some block) through the kernel gives the eager step's attention."""
    context_lens = [40, 17, 70]
    q, kv, table = _paged_case(context_lens, torch.float32, seed=7)
    slot_mapping = torch.stack([table[b, (c - 1) // BLOCK] * BLOCK + (c - 1) % BLOCK for b, c in enumerate(context_lens)])
    common = dict(input_ids=torch.zeros(3, dtype=torch.long), positions=torch.zeros(0), query_lens=[1, 1, 1],
                  context_lens=context_lens, slot_mapping=slot_mapping, kv_caches=[kv], block_size=BLOCK)
    eager = AttentionMetadata.from_batch(ForwardBatch(block_tables=table, **common))
    wide = torch.cat((table.clamp(min=0), torch.zeros(3, 4, dtype=torch.long, device=DEVICE)), dim=1)
    captured = AttentionMetadata.from_batch(ForwardBatch(
        block_tables=wide, decode_context_lens=torch.tensor(context_lens, device=DEVICE), **common))
    assert captured.spans == [] and captured.decode.blocks.shape[1] == table.shape[1] + 4
    rows = torch.randn(3, HEADS, LATENT + ROPE, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    attn = SimpleNamespace(kv_lora=LATENT, scale=0.09, decode_kernel=mla_decode)
    fast = MLAttention._attend(attn, rows, kv, captured)
    attn.decode_kernel = None
    torch.testing.assert_close(fast, MLAttention._attend(attn, rows, kv, eager), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(MLAttention._attend(attn, rows, kv, captured), MLAttention._attend(attn, rows, kv, eager),
                               rtol=1e-5, atol=1e-6)


def test_mla_decode_names_bad_widths():
    q, kv, table = _paged_case([4], torch.float32, seed=0)
    with pytest.raises(ValueError, match="powers of two >= 16"):
        mla_decode(q[..., :-1], kv[..., :-1], table, torch.tensor([4]), 48, 0.1)
