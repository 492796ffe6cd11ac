"""The runtime on a CUDA GPU: quantized layers against the fp32 references, whole models against the CPU run."""

import pytest
import torch
from quant_reference import TOL, Ckpt, routing, w4afp8_reference

from runtime.models import load_model
from runtime.tools.quantize import quantize_checkpoint
from runtime.tools.standalone import greedy_generate, prompt_logits
from runtime.tools.synthetic import write_synthetic_deepseek_fp8, write_tiny_hf_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    fp8 = write_synthetic_deepseek_fp8(root / "fp8")
    return {
        "bf16": write_tiny_hf_model(root / "bf16", "DeepseekV3ForCausalLM"),
        "fp8": fp8,
        "w4afp8": quantize_checkpoint(fp8, root / "w4", "w4afp8", calib_samples=2, calib_max_len=32, device="cuda"),
    }


def test_w4afp8_moe_layer_on_gpu_matches_reference(checkpoints):
    path = checkpoints["w4afp8"]
    model, cfg = load_model(path, device="cuda")
    moe = model.model.layers[1].mlp.experts
    assert moe.quant_method.backend.name != "cached"  # the CPU-only backend is not picked on a GPU
    x = (2 * torch.randn(9, 256, generator=torch.Generator().manual_seed(3))).to(torch.bfloat16)
    ids, weights = routing(9, 16, 4, seed=3)
    out = moe(x.cuda(), ids.cuda(), weights.cuda(), cfg.routed_scaling_factor).cpu()
    ref = w4afp8_reference(Ckpt(path), "model.layers.1.mlp.experts", 16, x, ids, weights, cfg.routed_scaling_factor)
    torch.testing.assert_close(out.float(), ref.float(), **TOL)


@pytest.mark.parametrize("name", ["bf16", "fp8", "w4afp8"])
def test_models_on_gpu_agree_with_cpu(checkpoints, name):
    ids = list(range(11, 51))
    # The torch paths on both devices: the fast GPU backends have tests of their own (test_gpu_kernels).
    torch_path = dict(dtype="float32", moe_backend="torch", linear_backend="torch")
    cpu, _ = load_model(checkpoints[name], **torch_path)
    gpu, _ = load_model(checkpoints[name], device="cuda", **torch_path)
    a, b = prompt_logits(cpu, ids), prompt_logits(gpu, ids, device="cuda").cpu()
    if name == "bf16":
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
        assert greedy_generate(gpu, ids, 8, device="cuda") == greedy_generate(cpu, ids, 8)
    else:  # random quantized models are chaotic under last-bit differences (see test_parallel_sim)
        assert (a - b).abs().mean() < 0.05 * a.abs().mean()


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_deterministic_mode_on_gpu_does_not_depend_on_the_batch(tmp_path, sampled):
    from runtime.testing.batch_invariance import NUM_TARGETS, TokenIdText, alone_and_busy

    path = write_tiny_hf_model(tmp_path / "mixtral", "MixtralForCausalLM", vocab_size=4096)
    model, _ = load_model(path, dtype="bfloat16", device="cuda", batch_invariant=True)
    alone, busy = alone_and_busy(model, TokenIdText(), 4096, sampled, deterministic=True, device="cuda")
    assert len(alone) == len(busy) == NUM_TARGETS
    assert busy == alone  # tokens and logprobs, bit for bit


@pytest.mark.parametrize("moe_backend", ["triton", "cutlass", "torch"])
def test_decode_graphs_replay_the_eager_step(checkpoints, moe_backend):
    """Decode steps replayed from CUDA graphs (batch 3 padded to bucket 4) give the eager step's logits; a backend
    that reads sizes back to the host (the torch reference) is not captured and runs eagerly."""
    from runtime.engine.model_runner import ModelRunner
    from runtime.kernels import build
    from runtime.testing.decode_steps import decode_step_input

    if moe_backend == "cutlass" and (reason := build.cuda_unavailable_reason()):
        pytest.skip(reason)
    model, cfg = load_model(checkpoints["w4afp8"], device="cuda", moe_backend=moe_backend)
    cuda, num_blocks = torch.device("cuda"), 64
    eager = ModelRunner(model, num_blocks, 16, cuda)
    graphed = ModelRunner(model, num_blocks, 16, cuda, cuda_graph_batch=8, max_model_len=256)
    assert graphed.decode_graphs.captured == (moe_backend != "torch")
    gen = torch.Generator().manual_seed(0)
    for ours, theirs in zip(graphed.kv_caches, eager.kv_caches, strict=True):
        theirs.copy_(torch.randn(theirs.shape, generator=gen))
        ours[: theirs.shape[0]].copy_(theirs)
    for batch in (1, 3, 8, 8):
        step = decode_step_input(batch, 40, num_blocks, 16, gen, cfg.vocab_size)
        a, b = eager.execute(step).logits, graphed.execute(step).logits
        assert b.shape == a.shape and torch.isfinite(b).all()
        assert (a - b).abs().mean() < 0.02 * a.abs().mean(), f"batch {batch}"
