"""Mixed precision as official LLaVA's DeepSpeed bf16 mode: fp32 master weights and optimizer states, bf16
compute, final weights saved in the loaded dtype; and the memory floor checked before a run starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llava_sgg.train.config import ConfigError
from llava_sgg.train.memory import DoesNotFitError, check_fits, memory_plan
from llava_sgg.train.run import build_trainer, train
from train_fixtures import make_dataset, make_parts, tiny_run


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    return make_parts(root), make_dataset(root)


def _dtypes(path: Path) -> dict[str, torch.dtype]:
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key).dtype for key in f.keys()}


def _moves(assets, tmp_path, name, steps=4, **model):
    """Per trained tensor, how far `steps` full-mode AdamW steps at LLaVA's lr 2e-5 move it."""
    parts, data = assets
    bf16 = model.get("torch_dtype") == "bfloat16"
    cfg = tiny_run({**parts, **model}, data, tmp_path / name, "full", {"name": "adamw", "lr": 2e-5},
                   max_steps=steps, bf16=bf16)
    trainer, _ = build_trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    return trainer, {n: (after[n].detach().float() - b.float()) for n, b in before.items()}


def test_a_bf16_model_trains_its_fp32_masters_as_an_fp32_run_does(assets, tmp_path):
    reference_trainer, reference = _moves(assets, tmp_path, "fp32", torch_dtype="float32")
    trainer, moved = _moves(assets, tmp_path, "bf16", torch_dtype="bfloat16")
    model = trainer.model
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert all(p.dtype == torch.bfloat16 for p in model.model.vision_tower.parameters())  # frozen: as loaded
    total = sum(m.abs().sum() for m in moved.values())
    total_reference = sum(m.abs().sum() for m in reference.values())
    assert abs(total / total_reference - 1) < 0.05
    for name, m in moved.items():
        assert abs(m.abs().sum() / reference[name].abs().sum() - 1) < 0.05, name
    norms = [n for n in moved if n.endswith("norm.weight")]
    assert norms and all(moved[n].abs().min() > 0 for n in norms)  # every element of every norm moved
    # The same steps applied to bf16 weights, as the optimizer held them before: most of each update
    # rounds away (bf16 spacing is 1.2e-4 at 0.02 and 0.0078 at 1.0; a step is at most 2e-5).
    initial = {n: p.detach() - reference[n] for n, p in reference_trainer.model.named_parameters() if n in reference}
    error = bf16_error = 0.0
    for name, start in initial.items():
        weights = start.bfloat16()
        for _ in range(4):
            weights = (weights.float() + reference[name] / 4).bfloat16()
        bf16_error += (weights.float() - start.bfloat16().float() - reference[name]).abs().sum()
        error += (moved[name] - reference[name]).abs().sum()
        if name.endswith("norm.weight"):
            assert torch.equal(weights, start.bfloat16()), name  # pure bf16: the norms never move
    assert error < 0.05 * total_reference  # element by element within 5% (0.8% when written)
    assert bf16_error > 0.25 * total_reference  # 40% when written


def test_the_final_model_is_saved_in_the_loaded_dtype_and_checkpoints_keep_the_masters(assets, tmp_path):
    parts, data = assets
    cfg = tiny_run({**parts, "torch_dtype": "bfloat16"}, data, tmp_path / "out", "full",
                   {"name": "adamw_sgg", "lr": 2e-5, "recluster_interval": 1}, max_steps=2, save_steps=2, bf16=True)
    output = train(cfg)
    final = _dtypes(output / "model.safetensors")
    assert set(final.values()) == {torch.bfloat16}
    assert json.loads((output / "config.json").read_text())["text_config"]["dtype"] == "bfloat16"
    checkpoint = _dtypes(output / "checkpoint-2" / "model.safetensors")
    decoder = {k: v for k, v in checkpoint.items() if "vision" not in k}
    assert set(decoder.values()) == {torch.float32}
    from llava_sgg.model.loading import load_trained

    model, _ = load_trained(output)
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["lora", "qlora", "pretrain"])
def test_lora_qlora_and_pretrain_train_fp32_adapters_and_connector_and_save_them_in_bf16(assets, tmp_path, mode):
    parts, data = assets
    cfg = tiny_run({**parts, "torch_dtype": "bfloat16"}, data, tmp_path / mode, mode, {"name": "adamw", "lr": 1e-3},
                   max_steps=1, bf16=True)
    trainer, _ = build_trainer(cfg)
    trained = {n: p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32}
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    # QLoRA: 8-bit decoder weights, and peft's prepare_model_for_kbit_training holds the rest in fp32.
    assert frozen == ({torch.int8, torch.float32} if mode == "qlora" else {torch.bfloat16})
    output = train(cfg)
    saved = output / ("mm_projector.safetensors" if mode == "pretrain" else "adapter_model.safetensors")
    assert set(_dtypes(saved).values()) == {torch.bfloat16}


def test_a_low_precision_model_needs_bf16_compute(assets, tmp_path):
    parts, data = assets
    with pytest.raises(ConfigError, match="torch_dtype=bfloat16 needs train.bf16=true"):
        tiny_run({**parts, "torch_dtype": "bfloat16"}, data, tmp_path, "full", bf16=False)


# ---------------------------------------------------------------------------------------- memory floor
VICUNA_7B = dict(vocab_size=32001, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32)
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)


def _llava_7b_on_meta():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(vision_config=CLIPVisionConfig(**CLIP_L_336).to_dict(),
                         text_config=LlamaConfig(**VICUNA_7B).to_dict(), projector_hidden_act="gelu",
                         vision_feature_layer=-2, image_token_id=32000)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.to(torch.bfloat16).requires_grad_(False)
    return model


def test_memory_plan_of_llava_7b_full_fine_tuning_and_the_fit_check():
    model = _llava_7b_on_meta()
    # Vicuna-7B by hand: embeddings and LM head, 32 layers of 4 attention and 3 MLP matrices and
    # 2 norms, the final norm; the mlp2x_gelu connector 1024 -> 4096 -> 4096 with biases.
    h, f, v = 4096, 11008, 32001
    decoder = 2 * v * h + 32 * (4 * h * h + 3 * h * f + 2 * h) + h
    connector = 1024 * h + h + h * h + h
    vectors = 32 * 2 * h + h + 2 * h  # norms and the connector's biases: no SGG ids
    trainable = decoder + connector
    tower = sum(p.numel() for p in model.model.vision_tower.parameters())
    adamw = memory_plan(model, {"name": "adamw"})
    assert adamw.trainable_params == trainable
    assert (adamw.master_bytes, adamw.grad_bytes, adamw.state_bytes) == (4 * trainable, 4 * trainable, 8 * trainable)
    assert adamw.frozen_bytes == 2 * tower and adamw.sgg_bytes == 0
    sgg = memory_plan(model, {"name": "adamw_sgg"})
    assert sgg.sgg_bytes == trainable - vectors
    assert memory_plan(model, {"name": "adamw_sgg", "assignment": "dynamic"}).sgg_bytes == 0
    h100 = 80 * 10**9  # 74.5 GiB
    with pytest.raises(DoesNotFitError, match=r"need at least 10[67]\.\d GiB per GPU .*train.distributed=fsdp2"):
        check_fits(sgg, h100, shards=1, mode="full")
    check_fits(sgg, h100, shards=8, mode="full")  # 13.4 GiB a GPU under FSDP2 on 8 GPUs
    assert sgg.per_gpu(8) == pytest.approx((16 * trainable + trainable - vectors + 2 * tower) / 8, abs=1)


def test_adafactor_states_are_factored():
    from torch import nn

    model = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32))
    plan = memory_plan(model, {"name": "adafactor_sgg"})
    # weight 32x64: row + column vectors; bias and the norm's two vectors: full second moments.
    assert plan.state_bytes == 4 * ((32 + 64) + 32 + 32 + 32)
    assert plan.sgg_bytes == 32 * 64
