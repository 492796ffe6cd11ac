"""Plain fp32 references for the quantized layers, written independently of runtime.quant.numerics and read
straight from checkpoint tensors (shared by the CPU and GPU tests)."""

import torch

from runtime.loader import CheckpointReader

FP8 = torch.float8_e4m3fn
TOL = dict(rtol=1e-2, atol=0.1)


def fp8_round(v: torch.Tensor) -> torch.Tensor:
    return v.clamp(-448, 448).to(FP8).float()


def ref_dynamic_act(x: torch.Tensor, group: int = 128) -> torch.Tensor:
    """Per token and 128-wide group: scale = amax/448, e4m3 round trip."""
    xf = x.float()
    out = torch.empty_like(xf)
    for s in range(0, xf.shape[1], group):
        g = xf[:, s : s + group]
        scale = g.abs().amax(dim=1, keepdim=True).clamp_min(1e-10) / 448
        out[:, s : s + group] = fp8_round(g / scale) * scale
    return out


def ref_block_dequant(w: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    out = w.float().clone()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * block : (i + 1) * block, j * block : (j + 1) * block] *= s[i, j]
    return out


def ref_unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    b = packed.view(torch.uint8).to(torch.int32)
    lo, hi = b & 0xF, b >> 4
    lo, hi = torch.where(lo > 7, lo - 16, lo), torch.where(hi > 7, hi - 16, hi)
    return torch.stack((lo, hi), dim=-1).flatten(-2).float()


class Ckpt:
    def __init__(self, path):
        self.reader = CheckpointReader(path)

    def __getitem__(self, name):
        return self.reader.get(name).read()


def routing(tokens: int, experts: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, k, generator=g), dim=-1)
    return ids, weights


def w4afp8_reference(ckpt, prefix: str, num_experts: int, x, ids, weights, rsf):
    """Section 2.4 of w4afp8-sglang.md with fp32 dequantized weights (int4 * bf16-rounded group scale)."""
    bf = lambda v: v.to(torch.bfloat16).float()  # noqa: E731
    a1 = max(bf(ckpt[f"{prefix}.{e}.{w}.input_scale"]).item() for e in range(num_experts) for w in ("w1", "w3"))
    a2 = max(bf(ckpt[f"{prefix}.{e}.w2.input_scale"]).item() for e in range(num_experts))

    def deq(name):
        q, s = ref_unpack_int4(ckpt[f"{name}.weight"]), bf(ckpt[f"{name}.weight_scale_inv"])
        return q * s.repeat_interleave(q.shape[1] // s.shape[1], dim=1)

    out = torch.zeros(x.shape[0], x.shape[1])
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            p = f"{prefix}.{int(ids[t, k])}"
            xq = fp8_round(x[t : t + 1].float() / a1)
            g, u = (bf(a1 * (xq @ deq(f"{p}.gate_proj").t())), bf(a1 * (xq @ deq(f"{p}.up_proj").t())))
            yq = fp8_round(torch.nn.functional.silu(g) * u / a2)
            z = bf(a2 * (yq @ deq(f"{p}.down_proj").t()))
            out[t] += rsf * weights[t, k] * z[0]
    return out.bfloat16()
