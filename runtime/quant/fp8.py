"""DeepSeek's FP8 block format: e4m3 weights with fp32 `weight_scale_inv` per [128, 128] block, activations
quantized dynamically per 1 x 128 group (quant_method "fp8" with weight_block_size in config.json)."""

from __future__ import annotations

import torch

from runtime.backends import select_backend
from runtime.errors import CheckpointError
from runtime.quant import numerics as nx
from runtime.quant.base import LinearMethod, MoEMethod, QuantConfig, new_param, prepare_backend
from runtime.quant.bf16 import Bf16LinearMethod
from runtime.quant.torch_backends import dequantize_fp8_expert


def _blocks(n: int, b: int) -> int:
    return -(-n // b)


class Fp8BlockLinearMethod(LinearMethod):
    def __init__(self, block: tuple[int, int], backend: str, batch_invariant: bool = False):
        self.block = block
        self.backend_name = backend
        self.batch_invariant = batch_invariant

    def create_weights(self, layer, input_size, output_size, dtype, device):
        bn, bk = self.block
        new_param(layer, "weight", (output_size, input_size), nx.FP8_DTYPE, device, output_dim=0, input_dim=1, shard_multiple={0: bn, 1: bk})
        new_param(layer, "weight_scale_inv", (_blocks(output_size, bn), _blocks(input_size, bk)), torch.float32, device, output_dim=0, input_dim=1)

    def process_weights_after_loading(self, layer):
        self.backend = select_backend("linear.fp8_block", self.backend_name, layer.weight.device, self.batch_invariant)
        self.extras = prepare_backend(self.backend, layer, {"weight": "weight", "weight_scale_inv": "weight_scale_inv"}, block=self.block)

    def apply(self, layer, x, bias=None):
        return self.backend.run(x, layer.weight, layer.weight_scale_inv, bias, block=self.block, out_dtype=x.dtype, **self.extras)

    def dequantized_weight(self, layer):
        return nx.dequantize_fp8_block(layer.weight, layer.weight_scale_inv, self.block)


class Fp8MoEMethod(MoEMethod):
    """w13_weight_scale_inv holds ceil(I/bn) rows of gate blocks then as many of up blocks (I need not be a block multiple)."""

    def __init__(self, block: tuple[int, int], backend: str, batch_invariant: bool = False):
        self.block = block
        self.backend_name = backend
        self.batch_invariant = batch_invariant

    def create_weights(self, layer, num_experts, hidden, intermediate, dtype, device):
        bn, bk = self.block
        e = num_experts
        new_param(layer, "w13_weight", (e, 2 * intermediate, hidden), nx.FP8_DTYPE, device, output_dim=1, input_dim=2, expected_loads=2 * e, shard_multiple={1: bn})
        new_param(layer, "w2_weight", (e, hidden, intermediate), nx.FP8_DTYPE, device, output_dim=1, input_dim=2, expected_loads=e, shard_multiple={2: bk})
        new_param(layer, "w13_weight_scale_inv", (e, 2 * _blocks(intermediate, bn), _blocks(hidden, bk)), torch.float32, device, output_dim=1, input_dim=2, expected_loads=2 * e)
        new_param(layer, "w2_weight_scale_inv", (e, _blocks(hidden, bn), _blocks(intermediate, bk)), torch.float32, device, output_dim=1, input_dim=2, expected_loads=e)

    def process_weights_after_loading(self, layer):
        self.backend = select_backend("moe.fp8", self.backend_name, layer.w13_weight.device, self.batch_invariant)
        names = {"w13": "w13_weight", "w2": "w2_weight", "w13_scale": "w13_weight_scale_inv", "w2_scale": "w2_weight_scale_inv"}
        self.extras = prepare_backend(self.backend, layer, names, block=self.block)

    def apply(self, layer, x, topk_ids, topk_weights, routed_scaling_factor):
        return self.backend.run(
            x, layer.w13_weight, layer.w2_weight, layer.w13_weight_scale_inv, layer.w2_weight_scale_inv, topk_ids, topk_weights,
            routed_scaling_factor=routed_scaling_factor, expert_offset=layer.expert_offset, block=self.block, **self.extras,
        )

    def dequantized_expert(self, layer, e):
        return dequantize_fp8_expert(layer.w13_weight[e], layer.w13_weight_scale_inv[e], layer.w2_weight[e], layer.w2_weight_scale_inv[e], self.block)


def _block_from_config(qc: dict) -> tuple[int, int]:
    block = qc.get("weight_block_size")
    if block is None:
        raise CheckpointError("config.json: quantization_config.weight_block_size is missing (only block-wise FP8 is supported)")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"config.json: quantization_config.weight_block_size must be two positive integers, got {block!r}")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise CheckpointError("config.json: quantization_config.activation_scheme must be 'dynamic' for block FP8")
    return block[0], block[1]


class Fp8Config(QuantConfig):
    name = "fp8"

    def __init__(self, block=(nx.FP8_BLOCK, nx.FP8_BLOCK), ignored_layers=(), **options):
        super().__init__(**options)
        self.block = tuple(block)
        self.ignored_layers = tuple(ignored_layers)

    @classmethod
    def from_checkpoint(cls, model_dir, hf_config, reader, **options):
        qc = hf_config["quantization_config"]
        ignored = qc.get("ignored_layers") or qc.get("modules_to_not_convert") or []
        return cls(_block_from_config(qc), ignored, **options)

    def linear_method(self, prefix):
        if any(prefix == p or prefix.startswith(p + ".") for p in self.ignored_layers):
            return Bf16LinearMethod()
        return Fp8BlockLinearMethod(self.block, self.linear_backend, self.batch_invariant)

    def moe_method(self, prefix):
        return Fp8MoEMethod(self.block, self.moe_backend, self.batch_invariant)
