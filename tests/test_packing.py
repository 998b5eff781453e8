"""Padding-free batching (``data.packing``): a micro-batch's samples in one row, with the padded batch's loss
and gradients."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from llava_sgg.data import IGNORE_INDEX, DataCollatorForLlava
from llava_sgg.train.config import ConfigError, build_run_config
from llava_sgg.train.run import build_trainer
from train_fixtures import make_parts, tiny_run


def item(ids, trained, image=None):
    labels = [t if k in trained else IGNORE_INDEX for k, t in enumerate(ids)]
    out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "id": f"s{ids[0]}"}
    if image is not None:
        out["pixel_values"] = torch.full((3, 4, 4), float(image))
    return out


def test_a_packed_batch_is_the_samples_in_one_row():
    collate = DataCollatorForLlava(pad_token_id=3, packing=True)
    batch = collate([item([10, 11, 12], {2}, image=1), item([20], {0}), item([30, 31], {1}, image=2)])
    assert set(batch) == {"input_ids", "labels", "position_ids", "pixel_values"}  # no attention_mask, no padding
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 30, 31]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]  # restarting: a new sample
    # Sample 2's one trained token is its first: in a row it would be predicted from sample 1's last token.
    assert batch["labels"].tolist() == [[-100, -100, 12, -100, -100, 31]]
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0]  # images in sample order, as padded
    text_only = collate([item([5, 6], {1}), item([7, 8, 9], {2})])
    assert "pixel_values" not in text_only and text_only["position_ids"].tolist() == [[0, 1, 0, 1, 2]]


def test_the_packed_row_trains_the_tokens_the_padded_rows_train():
    samples = [item([1, 9, 9, 2], {0, 2, 3}), item([1, 8, 2], {1, 2}), item([1, 7], {0, 1})]
    padded = DataCollatorForLlava(pad_token_id=0)(samples)
    packed = DataCollatorForLlava(pad_token_id=0, packing=True)(samples)

    def targets(labels):  # what a causal LM loss predicts: the label at t + 1 from position t
        return [t for t in labels[:, 1:].flatten().tolist() if t != IGNORE_INDEX]

    # A first label is never a target when padded (nothing precedes it), so packing drops it too.
    assert targets(padded["labels"]) == targets(packed["labels"]) == [9, 2, 8, 2, 7]


# ---- against the padded path, on the tiny model

CONVERSATIONS = [  # (turns, has image): 66 to 171 tokens (16 of them an image), single- and multi-turn
    ([("<image>\nWhat digit is shown?", "three")], True),
    ([("What comes after two?", "three"), ("And after three?", "four"), ("How many digits are there?",
      "There are ten digits: zero one two three four five six seven eight nine.")], False),
    ([("How many digits are there?\n<image>", "two"), ("Is there a seven?", "Yes")], True),
    ([("Say yes.", "Yes")], False),
    ([("<image>\nWhat is in the image? " + "Answer with a single word or phrase. " * 3,
       "The digit 3 is left of 7. " * 4)], True),
    ([("Count from zero to nine.", "zero one two three four five six seven eight nine " * 3)], False),
    ([("<image>\nIs there a seven?", "No"), ("What is in the image?", "The digit 3 is left of 7.")], True),
]


def make_varied_dataset(root):
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for i, (turns, has_image) in enumerate(CONVERSATIONS):
        conversation = [{"from": who, "value": text} for human, gpt in turns
                        for who, text in (("human", human), ("gpt", gpt))]
        sample = {"id": f"sample-{i}", "conversations": conversation}
        if has_image:
            Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
            sample["image"] = f"{i}.png"
        samples.append(sample)
    path = root / "train.json"
    path.write_text(json.dumps(samples))
    return {"data_path": str(path), "image_folder": str(images)}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    return make_parts(root), make_varied_dataset(root)


def packing_run(assets, output, mode="full", packing=False, **train):
    parts, data = assets
    cfg = tiny_run(parts, data, output, mode, **train)
    cfg.data.model_max_length, cfg.data.packing = 512, packing
    return cfg


def loss_and_gradients(trainer, batch):
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, trainer._prepare_inputs(batch))  # on the model's device, as Trainer does
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode, attention", [("full", "sdpa"), ("lora", "sdpa"), ("full", "eager")])
def test_a_packed_batch_has_the_padded_batch_loss_and_gradients(assets, tmp_path, mode, attention):
    trainer, _ = build_trainer(packing_run(assets, tmp_path, mode, attn_implementation=attention))
    samples = [trainer.train_dataset[i] for i in (4, 1, 0, 3, 6, 2, 5)]  # images and text-only mixed
    assert len({len(s["input_ids"]) for s in samples}) == len(samples)
    padded = DataCollatorForLlava(0)(samples)
    packed = DataCollatorForLlava(0, packing=True)(samples)
    assert packed["input_ids"].shape[1] == sum(len(s["input_ids"]) for s in samples) < padded["input_ids"].numel()

    loss, grads = loss_and_gradients(trainer, padded)
    packed_loss, packed_grads = loss_and_gradients(trainer, packed)
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=0)
    assert grads.keys() == packed_grads.keys() and len(grads) > 2
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # Trainer's loss normaliser (the trained tokens of the step) is the same count.
    assert trainer._get_num_items_in_batch([padded], "cpu") == trainer._get_num_items_in_batch([packed], "cpu")


@pytest.mark.parametrize("accumulation, checkpointing", [(1, False), (2, True)])
def test_a_training_step_with_packing_gives_the_same_weights(assets, tmp_path, accumulation, checkpointing):
    def trained(packing):
        cfg = packing_run(assets, tmp_path / str(packing), packing=packing,
                          per_device_train_batch_size=7 // accumulation, gradient_accumulation_steps=accumulation,
                          gradient_checkpointing=checkpointing)
        trainer, _ = build_trainer(cfg)
        assert trainer.data_collator.packing is packing
        trainer.train()
        loss = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        return loss, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    loss, weights = trained(False)
    packed_loss, packed_weights = trained(True)
    assert packed_loss == pytest.approx(loss, rel=1e-5)
    for name, weight in weights.items():
        # AdamW's first step is lr * g / (|g| + eps): where |g| is near eps, float32 rounding of g (the two layouts
        # sum in different orders) moves the step by up to ~1e-4 of lr = 1e-3.
        torch.testing.assert_close(packed_weights[name], weight, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_the_packing_keys_are_validated():
    def run(data=None, train=None):
        return build_run_config({"model": {"vision_tower": "tiny", "language_model": "tiny"},
                                 "data": data or {}, "train": train or {}})

    assert run().data.packing is False and run().train.attn_implementation == "sdpa"
    assert run({"packing": True}, {"attn_implementation": "flex_attention"}).data.packing is True
    with pytest.raises(ConfigError, match="data.packing must be true or false, got 'yes'"):
        run({"packing": "yes"})
    with pytest.raises(ConfigError, match="train.attn_implementation must be one of sdpa, eager, flex_attention"):
        run(train={"attn_implementation": "flash"})
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        with pytest.raises(ConfigError, match="train.attn_implementation=flash_attention_2 needs flash-attn"):
            run(train={"attn_implementation": "flash_attention_2"})


@pytest.mark.slow  # flex_attention is compiled (torch.compile) on first use: about 40 s on 2 CPU cores
def test_flex_attention_keeps_the_packed_samples_apart(assets, tmp_path):
    # Forward only: torch has no FlexAttention backward on the CPU (the CUDA test below checks the gradients).
    trainer, _ = build_trainer(packing_run(assets, tmp_path, attn_implementation="flex_attention"))
    samples = [trainer.train_dataset[i] for i in (1, 0, 3, 2)]
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, DataCollatorForLlava(0)(samples))
        packed_loss = trainer.compute_loss(trainer.model, DataCollatorForLlava(0, packing=True)(samples))
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", ["sdpa", "flex_attention", "flash_attention_2"])
def test_on_cuda_each_attention_keeps_the_packed_samples_apart(assets, tmp_path, attention):
    from transformers.utils import is_flash_attn_2_available

    if attention == "flash_attention_2" and not is_flash_attn_2_available():
        pytest.skip("flash-attn is not installed")
    dtype = torch.bfloat16 if attention.startswith("flash") else torch.float32  # flash kernels take no fp32
    trainer, _ = build_trainer(packing_run(assets, tmp_path, attn_implementation=attention))
    trainer.model.to("cuda", dtype)
    samples = [trainer.train_dataset[i] for i in (4, 1, 0, 3, 6, 2, 5)]

    def on_cuda(batch):
        return {k: v.to("cuda", dtype) if v.is_floating_point() else v.to("cuda") for k, v in batch.items()}

    loss, grads = loss_and_gradients(trainer, on_cuda(DataCollatorForLlava(0)(samples)))
    packed_loss, packed_grads = loss_and_gradients(trainer, on_cuda(DataCollatorForLlava(0, packing=True)(samples)))
    tolerance = {"rtol": 2e-2, "atol": 1e-3} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-6}
    torch.testing.assert_close(packed_loss, loss, **tolerance)
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, **tolerance, msg=lambda m: f"{name}: {m}")
