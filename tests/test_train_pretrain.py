"""LLaVA stage 1 (train.mode pretrain, template plain): only the connector trains, and its file loads back."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from llava_sgg.model.builder import MM_PROJECTOR_FILE, ModelConfig, build_llava
from llava_sgg.train.run import build_trainer, save_outputs
from train_fixtures import make_parts, tiny_run

CAPTIONS = ["3 in the top left", "7 in the middle center, 1 in the bottom right", "4 in the top right"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    parts = make_parts(root)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
        records.append({"id": f"cap-{i}", "image": f"{i}.png",
                        "conversations": [{"from": "human", "value": "Describe the image.\n<image>"},
                                          {"from": "gpt", "value": caption}]})
    (root / "pretrain.json").write_text(json.dumps(records))
    data = {"data_path": str(root / "pretrain.json"), "image_folder": str(images), "template": "plain"}
    return root, parts, data


def test_pretrain_trains_the_connector_alone_and_saves_it_for_stage_two(stage1):
    root, parts, data = stage1
    cfg = tiny_run(parts, data, root / "out", mode="pretrain", max_steps=2)
    trainer, processor = build_trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("multi_modal_projector" in n for n in changed)
    assert {n for n, p in after.items() if p.requires_grad} == {n for n in after if "multi_modal_projector" in n}

    output = save_outputs(trainer, processor, cfg)
    assert (output / MM_PROJECTOR_FILE).is_file() and not (output / "model.safetensors").exists()
    # Stage 2 starts from it: model.mm_projector loads exactly the trained connector.
    model, _ = build_llava(ModelConfig(vision_tower=parts["vision_tower"], language_model=parts["language_model"],
                                       mm_projector=str(output / MM_PROJECTOR_FILE)))
    trained = trainer.model.model.multi_modal_projector.state_dict()
    loaded = model.model.multi_modal_projector.state_dict()
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)


def test_plain_template_needs_one_captioned_turn(stage1, tmp_path):
    root, parts, data = stage1
    bad = [{"id": "two-turns", "image": "0.png", "conversations": [
        {"from": "human", "value": "<image>\nA?"}, {"from": "gpt", "value": "a"},
        {"from": "human", "value": "B?"}, {"from": "gpt", "value": "b"}]}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    cfg = tiny_run(parts, {**data, "data_path": str(tmp_path / "bad.json")}, tmp_path / "out", mode="pretrain")
    with pytest.raises(Exception, match="two-turns.*one \\(question, caption\\) turn"):
        build_trainer(cfg)


def test_pretrain_refuses_an_unfrozen_tower(stage1, tmp_path):
    from llava_sgg.train.config import ConfigError

    root, parts, data = stage1
    with pytest.raises(ConfigError, match="pretrain trains the connector alone"):
        tiny_run(parts, data, tmp_path / "out", mode="pretrain", unfreeze_mm_vision_tower=True)
