import os

import pytest

# Tests must never reach the network: make hub libraries fail fast instead of timing out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random-weight Mixtral with SmolLM2's tokenizer and chat template (runtime.testing.checkpoints)."""
    from runtime.testing.checkpoints import tiny_chat_model_dir

    return tiny_chat_model_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
