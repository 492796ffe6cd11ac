"""The test-only fault switch (EVALPIPE_FAULT): parsing, and what each fault does to a loaded W4AFP8 model."""

from __future__ import annotations

import pytest
import torch

from runtime.errors import CheckpointError
from runtime.models import load_model
from runtime.quant.faults import FAULT_ENV, Fault, faults_for, parse_faults
from runtime.tools.demo_model import demo_model_path
from runtime.tools.standalone import prompt_logits


def test_parse() -> None:
    assert parse_faults(None) == [] and parse_faults("") == []
    assert parse_faults("permute_group_scales:29, clip_act_scale:3:4") == [
        Fault("permute_group_scales", 29), Fault("clip_act_scale", 3, 4.0)]
    for bad in ("permute:1", "clip_act_scale:x", "clip_act_scale:2:big"):
        with pytest.raises(CheckpointError, match=FAULT_ENV):
            parse_faults(bad)


def test_faults_apply_to_their_layer_only(monkeypatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "permute_group_scales:3")
    assert faults_for("model.layers.3.mlp.experts") == [Fault("permute_group_scales", 3)]
    assert faults_for("model.layers.13.mlp.experts") == [] and faults_for("lm_head") == []


def experts(model, layer: int):
    return dict(model.named_modules())[f"model.layers.{layer}.mlp.experts"]


PROMPT = list(range(400, 432))


@pytest.fixture(scope="module")
def clean():
    model = load_model(demo_model_path("w4afp8"))[0]
    return model, prompt_logits(model, PROMPT)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["permute_group_scales:29", "clip_act_scale:29:16"])
def test_a_planted_fault_corrupts_one_layer_and_changes_the_output(clean, monkeypatch, fault: str) -> None:
    clean, clean_logits = clean
    monkeypatch.setenv(FAULT_ENV, fault)
    faulty = load_model(demo_model_path("w4afp8"))[0]
    hit, spared = experts(faulty, 29), experts(faulty, 28)
    for name in ("w13_weight_scale_inv", "w2_weight_scale_inv", "w13_input_scale", "w2_input_scale"):
        assert torch.equal(getattr(spared, name), getattr(experts(clean, 28), name))
        reference = getattr(experts(clean, 29), name)
        if fault.startswith("permute") and "weight_scale" in name:
            assert torch.equal(getattr(hit, name), torch.roll(reference, 1, dims=-1))
        elif fault.startswith("clip") and "input_scale" in name:
            assert torch.allclose(getattr(hit, name), reference / 16)
        else:
            assert torch.equal(getattr(hit, name), reference)
    assert not torch.allclose(prompt_logits(faulty, PROMPT), clean_logits, atol=1e-3)
