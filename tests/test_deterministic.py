"""Deterministic mode: a request's tokens and logprobs are bit-identical whether it runs alone or inside a busy,
changing batch (other requests joining and leaving, prompts prefilled in chunks next to decodes), for greedy and
seeded sampling, on an unquantized Mixtral and a W4AFP8 DeepSeek (MLA, routed experts). Without the mode the same
scenario does change the numbers, so the comparison is sensitive."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runtime.batch_invariant import batch_invariant_mode
from runtime.models import load_model
from runtime.testing.batch_invariance import NUM_TARGETS, alone_and_busy
from runtime.tools.quantize import quantize_checkpoint
from runtime.tools.synthetic import write_synthetic_deepseek_fp8


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    fp8 = write_synthetic_deepseek_fp8(tmp_path_factory.mktemp("det") / "fp8")
    w4 = quantize_checkpoint(fp8, fp8.parent / "w4afp8", "w4afp8", calib_samples=2, calib_max_len=32)
    return {
        "mixtral-bf16": (load_model(tiny_model_dir, dtype="bfloat16", batch_invariant=True)[0], 256),
        "deepseek-w4afp8": (load_model(w4, dtype="bfloat16", batch_invariant=True)[0], 512),
    }


@pytest.mark.slow
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
@pytest.mark.parametrize("name", ["mixtral-bf16", "deepseek-w4afp8"])
def test_outputs_do_not_depend_on_the_batch(models, tokenizer, name, sampled):
    model, vocab = models[name]
    alone, busy = alone_and_busy(model, tokenizer, vocab, sampled, deterministic=True)
    assert len(alone) == len(busy) == NUM_TARGETS
    assert busy == alone  # tokens and logprobs, bit for bit


@pytest.mark.slow
def test_without_the_mode_the_batch_changes_the_numbers(models, tokenizer):
    model, vocab = models["mixtral-bf16"]
    alone, busy = alone_and_busy(model, tokenizer, vocab, sampled=False, deterministic=False)
    assert any(alone[k][1] != busy[k][1] for k in alone)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_matmuls_and_reductions_are_row_invariant_inside_the_mode(device):
    """A row's result is the same whatever the other rows and however many there are (3 GEMM algorithm classes
    on this project's CPUs without the mode: 1, 2-3 and 4+ rows; on CUDA a single row's cumsum is a different
    scan than a batch's, which moved seeded samples)."""
    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(576, 576, generator=g).to(device), torch.randn(576, generator=g).to(device)
    x = torch.randn(1, 576, generator=g).to(device)
    ops = {
        "linear": lambda t: F.linear(t, w, bias),
        "bmm": lambda t: torch.bmm(t[None], w.t()[None])[0],
        "einsum": lambda t: torch.einsum("mk,nk->mn", t, w),
        "mean": lambda t: t.repeat(1, 100).mean(-1),  # 57600 wide: split across threads when rows are few
        "log_softmax": lambda t: torch.log_softmax(t.repeat(1, 100), -1),
        "cumsum": lambda t: torch.softmax(t.repeat(1, 100), -1).cumsum(-1),  # the sampler's CDF
    }
    with torch.inference_mode(), batch_invariant_mode(8):
        for name, op in ops.items():
            alone = op(x)[0]
            for rows in (2, 3, 8, 9, 40):
                for position in (0, rows - 1):
                    batch = torch.randn(rows, 576, generator=g).to(device)
                    batch[position] = x[0]
                    assert torch.equal(op(batch)[position], alone), (name, rows, position)
