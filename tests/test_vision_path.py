"""Every trained part of the vision path gets a gradient at every step, as on every rank of a multi-GPU run:
text-only batches run the image path on a blank image (train/text_only.py), as official LLaVA's zero images
do, and an unfrozen tower trains only the layers LLaVA reads (train/run.py, freeze_unread_tower_parts)."""

import pytest
import torch

from llava_sgg.train.run import build_trainer
from llava_sgg.train.text_only import blank_image_features
from train_fixtures import make_dataset, make_parts, tiny_run


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision-path")
    return root, make_parts(root), make_dataset(root)


def _batch(trainer, ids):
    """The collated samples on the model's device, as Trainer hands them to compute_loss."""
    dataset = trainer.train_dataset
    return trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in ids]))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_text_only_batch_gives_the_connector_a_zero_gradient_and_the_same_loss(assets, tmp_path, mode):
    root, parts, data = assets
    trainer, _ = build_trainer(tiny_run(parts, data, tmp_path, mode))
    model = trainer.model
    model.train()
    batch = _batch(trainer, [4, 5])  # the two text-only samples of make_dataset
    assert "pixel_values" not in batch
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    connector = [p for n, p in model.named_parameters() if "multi_modal_projector" in n and p.requires_grad]
    assert connector and all(p.grad is not None and not p.grad.any() for p in connector)
    trained = [p for n, p in model.named_parameters() if p.requires_grad and "multi_modal_projector" not in n]
    assert any(p.grad is not None and p.grad.any() for p in trained)

    # The loss is the model's own, computed here independently without the hooks' path: the same value.
    model.zero_grad(set_to_none=True)
    inner = (model.get_base_model() if hasattr(model, "get_base_model") else model).model
    with torch.no_grad():  # no_grad: the blank image is not run
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits = plain.logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                     ignore_index=-100)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert blank_image_features(inner, batch["input_ids"].device).shape[0] == 1


def test_image_batches_and_evaluation_do_not_run_the_blank_image(assets, tmp_path, monkeypatch):
    root, parts, data = assets
    trainer, _ = build_trainer(tiny_run(parts, data, tmp_path, "full"))
    model = trainer.model
    calls = []
    import llava_sgg.train.text_only as text_only

    real = text_only.blank_image_features
    monkeypatch.setattr(text_only, "blank_image_features", lambda *a: calls.append(1) or real(*a))
    model.train()
    trainer.compute_loss(model, _batch(trainer, [0, 1]))  # images
    assert calls == []
    model.eval()
    trainer.compute_loss(model, _batch(trainer, [4, 5]))  # text-only, evaluation mode
    assert calls == []
    model.train()
    trainer.compute_loss(model, _batch(trainer, [4, 5]))
    assert calls == [1]


def test_nothing_is_installed_when_neither_tower_nor_connector_trains(assets):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from llava_sgg.model.tiny import tiny_text_config, tiny_vision_config
    from llava_sgg.train.text_only import run_image_path_always

    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=tiny_vision_config(),
                                                      text_config=tiny_text_config(), image_token_id=3))
    model.requires_grad_(False)
    assert not run_image_path_always(model.model)
    model.model.multi_modal_projector.requires_grad_(True)
    assert run_image_path_always(model.model)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_an_unfrozen_tower_trains_the_layers_llava_reads_and_nothing_after(assets, tmp_path, mode):
    """vision_feature_layer -2: the last encoder layer and post_layernorm cannot reach the loss; they stay
    frozen (under DDP with checkpointing a trainable parameter without a gradient stops the run)."""
    root, parts, data = assets
    trainer, _ = build_trainer(tiny_run(parts, data, tmp_path, mode, unfreeze_mm_vision_tower=True))
    model = trainer.model
    tower = dict(model.named_parameters())
    names = [n for n in tower if "vision_tower" in n and (mode == "full" or "modules_to_save" in n)]
    layers = max(int(n.split("encoder.layers.")[1].split(".")[0]) for n in names if "encoder.layers." in n) + 1
    unread = [n for n in names if "post_layernorm" in n or f"encoder.layers.{layers - 1}." in n]
    assert unread and not any(tower[n].requires_grad for n in unread)
    assert all(tower[n].requires_grad for n in names if n not in unread)

    # An independent check of "cannot reach the loss": a training step leaves them without a gradient,
    # and every other tower parameter gets one.
    model.train()
    batch = _batch(trainer, [0, 1])
    trainer.compute_loss(model, batch).backward()
    read = [n for n in names if n not in unread]
    assert all(tower[n].grad is not None for n in read)


def test_bf16_weights_with_an_unfrozen_tower_train_with_the_tower_in_one_dtype(assets, tmp_path):
    """The unread layers, frozen, are still computed: in fp32 like the trained ones around them (a CPU's
    autocast refuses a layer norm whose weights are bf16 on fp32 activations)."""
    root, parts, data = assets
    cfg = tiny_run({**parts, "torch_dtype": "bfloat16"}, data, tmp_path, "full", bf16=True, max_steps=2,
                   per_device_train_batch_size=2, unfreeze_mm_vision_tower=True)
    trainer, _ = build_trainer(cfg)
    tower = trainer.model.model.vision_tower
    assert {p.dtype for p in tower.parameters()} == {torch.float32}
    assert trainer.model.model.language_model.layers[0].mlp.down_proj.weight.dtype == torch.float32  # trained
    trainer.train()
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in trainer.state.log_history if "loss" in row)
