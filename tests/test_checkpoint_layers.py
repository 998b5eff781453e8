"""train.checkpoint_layers: gradient checkpointing for the first N decoder layers only."""

import pytest
import torch

from llava_sgg.train.config import ConfigError
from llava_sgg.train.run import build_trainer, decoder_layers
from train_fixtures import make_dataset, make_parts, tiny_run


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoint-layers")
    return make_parts(root), make_dataset(root)


def train_counting_calls(assets, output, mode="full", **train):
    """One step; how often each decoder layer's query projection ran (a checkpointed layer's runs again in the
    backward)."""
    parts, data = assets
    trainer, _ = build_trainer(tiny_run(parts, data, output, mode, **train))
    layers = decoder_layers(trainer.model)
    calls = [0] * len(layers)
    for index, layer in enumerate(layers):
        # Not the layer: transformers checkpoints the layer's forward, so the layer's own hooks fire once. Nor
        # its MLP: torch's non-reentrant checkpoint may end a recomputation early, and with these versions it
        # ends before the MLP. The attention's first projection runs again whenever the layer is recomputed.
        layer.self_attn.q_proj.register_forward_hook(
            lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    trainer.train()
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return calls, weights


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_only_the_first_layers_are_recomputed_and_the_step_is_unchanged(assets, tmp_path, mode):
    every, weights = train_counting_calls(assets, tmp_path / "all", mode, gradient_checkpointing=True)
    none, _ = train_counting_calls(assets, tmp_path / "off", mode, gradient_checkpointing=False)
    first, first_weights = train_counting_calls(assets, tmp_path / "first", mode, gradient_checkpointing=True,
                                                checkpoint_layers=1)
    assert len(every) == 2 and none == [1, 1] and every == [2, 2]
    assert first == [2, 1]
    assert first_weights.keys() == weights.keys()
    for name, weight in weights.items():
        torch.testing.assert_close(first_weights[name], weight, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_checkpoint_layers_is_validated(assets, tmp_path):
    parts, data = assets
    with pytest.raises(ConfigError, match="train.checkpoint_layers must be an integer >= 0"):
        tiny_run(parts, data, tmp_path, gradient_checkpointing=True, checkpoint_layers=-1)
    with pytest.raises(ConfigError, match="set train.gradient_checkpointing true"):
        tiny_run(parts, data, tmp_path, gradient_checkpointing=False, checkpoint_layers=1)
    with pytest.raises(ConfigError, match=r"train.checkpoint_layers=3, but the decoder .* has 2 layers"):
        build_trainer(tiny_run(parts, data, tmp_path, gradient_checkpointing=True, checkpoint_layers=3))
