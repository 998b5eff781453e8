"""train.checkpoint_layers: gradient checkpointing for the first N decoder layers only."""

import pytest
import torch

from llava_sgg.train.auto_checkpoint import CheckpointFromMemory, StepMemory, layers_to_keep, saved_bytes
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


def _saved_by_graph(output: torch.Tensor, params: set[int]) -> int:
    """Bytes of the tensors autograd's graph behind ``output`` keeps (its nodes' ``_saved_*``), parameters left
    out, each storage once: a count independent of saved-tensor hooks. 0-d tensors are left out too: they are
    Python numbers (a scaling factor) that autograd keeps on the host, past the hooks."""
    seen, stack, found = set(), [output.grad_fn], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                for t in value if isinstance(value, (tuple, list)) else [value]:
                    if isinstance(t, torch.Tensor) and t.dim() and t.untyped_storage().data_ptr() not in params:
                        found[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(f for f, _ in node.next_functions)
    return sum(found.values())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_saved_bytes_are_what_the_layers_autograd_graph_keeps(attn):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=1)
    cfg._attn_implementation = attn
    layer, rope = LlamaDecoderLayer(cfg, 0), LlamaRotaryEmbedding(cfg)
    x = torch.randn(2, 10, 32, requires_grad=True)
    positions = torch.arange(10)[None].expand(2, -1)
    out, saved = saved_bytes(layer, lambda: layer(x, position_embeddings=rope(x, positions), position_ids=positions))
    out = out[0] if isinstance(out, tuple) else out
    expected = _saved_by_graph(out, {p.untyped_storage().data_ptr() for p in layer.parameters()})
    assert saved == expected > 2 * 10 * 64 * 4  # at least the MLP's intermediate activations


def true_peak(held, grads, a, b, tokens, kept):
    """A memory model with known parts: a step's peak is held + gradients + (a + kept * b) * tokens."""
    return held + grads + (a + kept * b) * tokens


MODELS = [  # held, gradients, a, b (bytes per token), measured tokens, budget
    (10e9, 0, 2e5, 1.7e5, 9000, 75e9), (10e9, 3e9, 2e5, 1.7e5, 9000, 75e9), (60e9, 0, 2e5, 1.7e5, 14000, 75e9),
    (70e9, 0, 4e5, 1.7e5, 14000, 75e9), (1e9, 0, 1e4, 1e3, 100, 75e9), (18e9, 1.3e9, 5e5, 2e5, 14016, 75.8e9),
]


def measured_step(held, grads, a, b, tokens):
    """What the two measured steps give: the peak with one layer kept, and that layer's bytes."""
    return StepMemory(held=int(held), peak=int(true_peak(held, grads, a, b, tokens, 1)), tokens=tokens,
                      layer_bytes=int(b * tokens))


@pytest.mark.parametrize("model", MODELS)
def test_layers_to_keep_never_exceeds_the_budget_and_is_exact_without_fixed_costs(model):
    held, grads, a, b, measured, budget = model
    step, layers = measured_step(held, grads, a, b, measured), 32
    for tokens in (measured // 4, measured // 2, measured, 2 * measured, 5 * measured):
        keep = layers_to_keep(step, layers, int(budget), tokens)
        fits = [k for k in range(layers + 1) if true_peak(held, grads, a, b, tokens, k) <= budget]
        assert keep == 0 or true_peak(held, grads, a, b, tokens, keep) <= budget, tokens
        if grads == 0 and tokens >= measured:  # the prediction is the truth, up to the byte rounding
            assert abs(keep - (max(fits) if fits else 0)) <= 1, tokens
        else:  # gradients counted as if they grew with tokens: fewer kept, never more
            assert keep <= (max(fits) if fits else 0), tokens


def test_each_batch_recomputes_the_first_layers_its_tokens_need():
    held, grads, a, b, measured, budget = MODELS[-1]
    layers = [torch.nn.Module() for _ in range(32)]
    callback = CheckpointFromMemory(torch.nn.Module(), layers)
    callback.measured, callback.budget = measured_step(held, grads, a, b, measured), int(budget)
    for tokens in (20000, 3000, measured):
        recompute = callback.choose_for(tokens)
        expected = 32 - max(k for k in range(33) if true_peak(held, grads, a, b, tokens, k) <= budget)
        assert recompute >= expected and recompute - expected <= 2, tokens  # the gradients, counted high
        assert [layer.gradient_checkpointing for layer in layers] == [i < recompute for i in range(32)]
    assert sum(callback.recomputed.values()) == 3 and min(callback.recomputed) < max(callback.recomputed)
    assert callback.predicted_peak <= budget


@pytest.mark.skipif(torch.cuda.is_available(), reason="the path without CUDA")
def test_auto_without_cuda_recomputes_every_layer_after_measuring_and_trains_the_same(assets, tmp_path, caplog):
    every, weights = train_counting_calls(assets, tmp_path / "all", gradient_checkpointing=True, max_steps=3)
    with caplog.at_level("INFO", logger="llava_sgg.train.auto_checkpoint"):
        auto, auto_weights = train_counting_calls(assets, tmp_path / "auto", gradient_checkpointing=True,
                                                  checkpoint_layers="auto", max_steps=3)
    # The two measured steps keep the last layer (it runs once a step); the third recomputes it (twice).
    assert every == [6, 6] and auto == [6, 1 + 1 + 2]
    assert "recomputing every decoder layer (no CUDA allocator to measure)" in caplog.text
    for name, weight in weights.items():
        torch.testing.assert_close(auto_weights[name], weight, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_auto_is_validated(assets, tmp_path):
    parts, data = assets
    with pytest.raises(ConfigError, match="or null"):
        tiny_run(parts, data, tmp_path, gradient_checkpointing=True, checkpoint_layers="most")
    with pytest.raises(ConfigError, match="with train.compile give the number"):
        tiny_run(parts, data, tmp_path, gradient_checkpointing=True, checkpoint_layers="auto", compile=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_keeps_every_layer_of_a_small_model_and_measures_the_probe(assets, tmp_path):
    parts, data = assets
    trainer, _ = build_trainer(tiny_run(parts, data, tmp_path, gradient_checkpointing=True,
                                        checkpoint_layers="auto", max_steps=4))
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, CheckpointFromMemory))
    trainer.train()
    measured = callback.measured
    assert dict(callback.recomputed) == {0: 2}  # steps 3 and 4, with room for every layer
    assert [layer.gradient_checkpointing for layer in decoder_layers(trainer.model)] == [False, False]
    assert measured.peak > measured.held > 0 and measured.tokens > 0 and measured.layer_bytes > 0
    assert callback.peak_after <= callback.predicted_peak <= callback.budget
    assert "forward" not in vars(decoder_layers(trainer.model)[-1])
