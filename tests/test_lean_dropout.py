import pytest
import torch
from torch import nn

from llava_sgg.train.lean_dropout import DropoutLinearFunction, DropoutLoraA, use_lean_lora_dropout

P = 0.25


def test_dropout_linear_is_dropout_then_linear_with_its_gradients():
    # A weight whose first rows are the identity shows the dropped input, so the expected result and
    # gradients can be computed by plain autograd from the mask that was drawn.
    torch.manual_seed(0)
    d, extra = 16, 8
    x = (torch.rand(3, 5, d) + 0.5).requires_grad_()  # no zeros: a 0 out means dropped
    weight = torch.cat([torch.eye(d), torch.randn(extra, d)]).requires_grad_()
    out = DropoutLinearFunction.apply(x, weight, P)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    dropped = out[..., :d].detach()
    keep = (dropped != 0).float()
    assert 0.6 < keep.mean() < 0.9  # kept with probability 0.75
    torch.testing.assert_close(dropped, x.detach() * keep / (1 - P))
    x_ref, w_ref = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    expected = (x_ref * keep / (1 - P)) @ w_ref.T
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(weight.grad, w_ref.grad)


def test_in_bf16_with_fp32_adapter_weights_it_matches_autocast_with_the_same_mask():
    # bf16 activations, an fp32 master weight and autocast, as a LoRA run on a GPU: against peft's arithmetic
    # (nn.Dropout on the input, then an autocast Linear), given the mask drawn; 1 / 0.95 is not a bf16 number.
    torch.manual_seed(4)
    d, extra, p = 32, 16, 0.05
    x = (torch.rand(4, 7, d) + 0.5).to(torch.bfloat16).requires_grad_()
    weight = torch.cat([torch.eye(d), torch.randn(extra, d) / d**0.5]).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = DropoutLinearFunction.apply(x, weight, p)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    keep = (out[..., :d].detach() != 0).to(torch.bfloat16)
    x_ref, w_ref = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.nn.functional.linear(x_ref * keep * (1 / (1 - p)), w_ref)
    expected.backward(grad_out)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(weight.grad, w_ref.grad, rtol=1e-5, atol=1e-6)


def test_the_backward_pass_leaves_the_random_stream_as_it_found_it():
    torch.manual_seed(1)
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(3, 8, requires_grad=True)
    out = DropoutLinearFunction.apply(x, w, P)
    state = torch.get_rng_state()
    out.sum().backward()  # redraws the forward's mask from the state saved before it
    assert torch.equal(torch.get_rng_state(), state)


def test_under_bf16_autocast_it_computes_as_autocast_would():
    torch.manual_seed(2)
    x = torch.randn(6, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, 32, requires_grad=True)  # an fp32 adapter master
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = DropoutLinearFunction.apply(x, w, 0.0 + 1e-9)  # keeps (nearly) every element
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(x.detach(), w.detach())
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def _tiny_peft_llama(seed: int, dropout: float = P):
    """A 2-layer, 64-wide Llama with LoRA (r=4) on all seven decoder Linears, its weights drawn from ``seed``."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=128)
    model = LlamaForCausalLM(cfg)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))


def _saved_bytes(model, ids) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(storages.values())


def test_peft_model_keeps_its_adapter_keys_and_saves_less_for_backward():
    from peft import get_peft_model_state_dict

    ids = torch.randint(0, 128, (2, 24))
    model = _tiny_peft_llama(0).train()
    keys = set(get_peft_model_state_dict(model))
    before = _saved_bytes(model, ids)
    assert use_lean_lora_dropout(model) == 14  # 7 Linears in each of 2 layers
    assert set(get_peft_model_state_dict(model)) == keys
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.lora_A["default"], DropoutLoraA) and isinstance(q.lora_dropout["default"], nn.Identity)
    after = _saved_bytes(model, ids)
    assert after < 0.8 * before, (after, before)
    # Evaluation: no dropout, and the same result as peft's own layers.
    reference = _tiny_peft_llama(0).eval()
    reference.load_state_dict(model.state_dict())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_a_recomputed_layer_draws_the_masks_of_its_first_forward():
    # With gradient checkpointing the layers run their forward twice; the gradients equal those of a run
    # without it only if both forwards dropped the same elements.
    ids = torch.randint(0, 128, (2, 24))
    grads = []
    for checkpointing in (False, True):
        model = _tiny_peft_llama(3).train()
        use_lean_lora_dropout(model)
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable({"use_reentrant": False})
            model.enable_input_require_grads()
        torch.manual_seed(7)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_layers_without_dropout_are_left_to_peft():
    model = _tiny_peft_llama(0, dropout=0.0)
    assert use_lean_lora_dropout(model) == 0


@pytest.mark.parametrize("train, message", [({"mode": "full"}, "has none"), ({"mode": "qlora"}, "has none"),
                                            ({"mode": "lora", "compile": True}, "train.compile"),
                                            ({"mode": "lora", "lora_dropout": 0.0}, "none to change"),
                                            ({"mode": "lora", "lean_lora_dropout": "yes"}, "true or false")])
def test_config_refuses_lean_dropout_where_it_cannot_apply(tmp_path, train, message):
    from llava_sgg.train.config import ConfigError, build_run_config

    quantized = {"quantization": "4bit"} if train["mode"] == "qlora" else {}
    raw = {"model": {"vision_tower": "v", "language_model": "l", **quantized},
           "data": {"data_path": str(tmp_path / "d.json"), "image_folder": str(tmp_path)},
           "train": {"output_dir": str(tmp_path / "out"), "lean_lora_dropout": True, **train},
           "optimizer": {"name": "adamw", "lr": 1e-4}}
    with pytest.raises(ConfigError, match=message):
        build_run_config(raw, origin="test")


@pytest.mark.slow  # builds and trains the tiny LLaVA parts
def test_a_lora_run_with_lean_dropout_trains_saves_and_loads_back(tmp_path):
    from llava_sgg.model.loading import load_trained
    from llava_sgg.train.run import build_trainer, save_outputs
    from train_fixtures import make_dataset, make_parts, tiny_run

    cfg = tiny_run(make_parts(tmp_path), make_dataset(tmp_path), tmp_path / "out", "lora", {"name": "adamw", "lr": 1e-3},
                   max_steps=2, lora_dropout=0.1, lean_lora_dropout=True, gradient_checkpointing=True)
    trainer, processor = build_trainer(cfg)
    assert any(isinstance(m, DropoutLoraA) for m in trainer.model.modules())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A" in n}
    trainer.train()
    assert all(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if "lora_A" in n)
    output = save_outputs(trainer, processor, cfg)
    loaded, _ = load_trained(output)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trainer.model.eval()
    loaded.to(trainer.model.device).eval()
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        torch.testing.assert_close(loaded(**inputs).logits, trainer.model(**inputs).logits, rtol=0, atol=0)
