"""Rotary position embedding with the scalings checkpoints configure (default, linear, llama3, yarn).

Two layouts: "neox" rotates the two halves of the head (Llama, Mixtral, Qwen); "interleaved" rotates adjacent
pairs (DeepSeek, GPT-J style). Angles and the rotation are computed in fp32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from runtime.config import RopeConfig
from runtime.kernels import triton_available


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    base, factor = rope.theta, rope.factor
    orig = rope.original_max_position_embeddings
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    if rope.attention_factor is not None:
        attention = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention = yarn_mscale(factor)
    return inv_freq, attention


def _llama3_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    orig = rope.original_max_position_embeddings
    low_wavelen, high_wavelen = orig / rope.low_freq_factor, orig / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (orig / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def inverse_frequencies(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2], factor applied to cos and sin) for a rotary dimension `dim`."""
    if rope.rope_type == "yarn":
        return _yarn_inv_freq(rope, dim)
    if rope.rope_type == "llama3":
        return _llama3_inv_freq(rope, dim), 1.0
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    return inv_freq, 1.0


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, rope: RopeConfig, interleaved: bool, device: torch.device):
        super().__init__()
        self.dim = dim
        self.interleaved = interleaved
        inv_freq, self.attention_factor = inverse_frequencies(rope, dim)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.kernel = None  # one fused kernel for bf16 on a GPU (runtime/kernels/rotary.py), same operations
        if triton_available(torch.device(device)):
            from runtime.kernels.rotary import rotate

            self.kernel = rotate

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, dim] (or [T, dim]) rotated at the positions cos/sin [T, dim/2] were made for."""
        if self.kernel is not None and x.dtype == torch.bfloat16 and x.is_cuda:
            return self.kernel(x, cos, sin, self.interleaved)
        squeeze = x.dim() == 2
        xf = x.float().unsqueeze(1) if squeeze else x.float()
        c, s = cos[:, None, :], sin[:, None, :]
        if self.interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
        else:
            x1, x2 = xf.chunk(2, dim=-1)
            out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        out = out.to(x.dtype)
        return out.squeeze(1) if squeeze else out
