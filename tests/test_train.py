"""Training LLaVA end to end on tiny parts: every mode with every optimizer, outputs, resume, merge."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from llava_sgg.model.builder import ModelConfig, ModelError, build_llava, load_mm_projector
from llava_sgg.model.loading import load_trained, merge_lora
from llava_sgg.optim import OPTIMIZER_NAMES
from llava_sgg.train.config import ConfigError, build_run_config, load_run_config
from llava_sgg.train.run import build_trainer, save_outputs
from train_fixtures import make_dataset, make_parts, tiny_config_file, tiny_run

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    return make_parts(root), make_dataset(root)


def _optimizer(name: str) -> dict:
    options = {"name": name, "lr": 1e-3}
    if name.endswith("_sgg"):
        options.update(recluster_interval=1, beta3=0.5)  # the scaled path runs from step 1
    return options


def _snapshot(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def _mode_and_optimizer_pairs():
    """Every optimizer in LoRA mode and AdamW, AdamW+SGG in every mode by default; the other pairs in the slow step
    (they differ from these only in which optimizer the factory builds)."""
    for mode in ("full", "lora", "qlora"):
        for name in OPTIMIZER_NAMES:
            quick = mode == "lora" or name in ("adamw", "adamw_sgg")
            yield pytest.param(mode, name, marks=() if quick else pytest.mark.slow)


def _count_in_a_new_thread() -> int:
    counts = []
    thread = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return counts[0]


def test_training_gives_threads_started_after_its_first_step_the_main_thread_s_count(assets, tmp_path):
    parts, data = assets
    trainer, _ = build_trainer(tiny_run(parts, data, tmp_path, "lora"))
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # What the DataLoader's pin-memory thread does on a GPU: 1 thread for itself, and so for new threads.
        pin = threading.Thread(target=torch.set_num_threads, args=(1,))
        pin.start()
        pin.join()
        assert torch.get_num_threads() == 2 and _count_in_a_new_thread() == 1
        trainer.train()
        assert _count_in_a_new_thread() == 2  # autograd's device thread, started at the first backward, gets 2
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("mode, name", _mode_and_optimizer_pairs())
def test_one_training_step_in_every_mode_with_every_optimizer(assets, tmp_path, mode, name):
    parts, data = assets
    trainer, _ = build_trainer(tiny_run(parts, data, tmp_path, mode, _optimizer(name)))
    model = trainer.model
    before = _snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = _snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable, sorted(changed - trainable)[:5]
    assert not any("vision_tower" in n for n in changed)
    assert any("multi_modal_projector" in n for n in changed)
    if mode == "full":
        assert any("language_model" in n for n in changed)
    else:
        assert all("lora_" in n or "multi_modal_projector" in n for n in changed)
        assert any("lora_" in n for n in changed)
    if name.endswith("_sgg"):
        assert trainer.optimizer.optimizer.global_mda is not None


def test_projector_gets_its_own_learning_rate(assets, tmp_path):
    parts, data = assets
    trainer, _ = build_trainer(tiny_run(parts, data, tmp_path, "lora", {"name": "lamb_sgg", "lr": 2e-4},
                                        mm_projector_lr=2e-5))
    optimizer = trainer.create_optimizer()
    by_lr = {}
    names = {p: n for n, p in trainer.model.named_parameters()}
    for group in optimizer.param_groups:
        by_lr.setdefault(group["lr"], set()).update(names[p] for p in group["params"])
    assert set(by_lr) == {2e-4, 2e-5}
    assert all("multi_modal_projector" in n for n in by_lr[2e-5])
    assert all("lora_" in n for n in by_lr[2e-4])


def _logits(model, batch):
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}).logits.cpu()


@pytest.mark.parametrize("mode", [pytest.param("full", marks=pytest.mark.slow), "lora"])
def test_saved_output_loads_back_by_path_with_identical_logits(assets, tmp_path, mode):
    parts, data = assets
    cfg = tiny_run(parts, data, tmp_path / "out", mode, _optimizer("adamw_sgg"), max_steps=2)
    trainer, processor = build_trainer(cfg)
    trainer.train()
    output = save_outputs(trainer, processor, cfg)
    assert (output / "loss_curve.png").is_file()
    assert list(output.glob("*.safetensors")) and not list(output.glob("*.bin"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    loaded, loaded_processor = load_trained(output)
    loaded.to(trainer.model.device)
    torch.testing.assert_close(_logits(loaded, batch), _logits(trainer.model, batch), rtol=0, atol=0)
    assert loaded_processor.tokenizer.convert_tokens_to_ids("<image>") == trainer.model.config.image_token_id
    if mode == "lora":
        merged_folder = merge_lora(output, tmp_path / "merged")
        from transformers import LlavaForConditionalGeneration

        merged = LlavaForConditionalGeneration.from_pretrained(merged_folder).to(trainer.model.device)
        torch.testing.assert_close(_logits(merged, batch), _logits(loaded, batch), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", [pytest.param("full", marks=pytest.mark.slow), "lora"])
def test_resume_from_checkpoint_continues_the_same_run(assets, tmp_path, mode):
    parts, data = assets
    optimizer = {"name": "adamw_sgg", "lr": 1e-3, "recluster_interval": 2, "beta3": 0.5}
    straight = tiny_run(parts, data, tmp_path / "a", mode, optimizer, max_steps=4, save_steps=2,
                        save_total_limit=3, per_device_train_batch_size=1)
    trainer_a, _ = build_trainer(straight)
    trainer_a.train()
    losses_a = [row["loss"] for row in trainer_a.state.log_history if "loss" in row]

    resumed = tiny_run(parts, data, tmp_path / "b", mode, optimizer, max_steps=4, save_steps=2,
                       save_total_limit=3, per_device_train_batch_size=1,
                       resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    trainer_b, _ = build_trainer(resumed)
    trainer_b.train(resume_from_checkpoint=resumed.train.resume_from_checkpoint)
    losses_b = [row["loss"] for row in trainer_b.state.log_history if "loss" in row]
    assert losses_b[-2:] == pytest.approx(losses_a[-2:], rel=1e-6)
    for (n, p), q in zip(trainer_a.model.named_parameters(), trainer_b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)
    sgg_a, sgg_b = trainer_a.optimizer.optimizer, trainer_b.optimizer.optimizer
    assert sgg_a.global_mda == pytest.approx(sgg_b.global_mda)


@pytest.mark.parametrize("rule", ["mda", pytest.param("mean_ratio", marks=pytest.mark.slow)])
def test_each_reclustering_is_logged_and_plotted(assets, tmp_path, rule):
    """The log after each re-clustering carries SGG's summary (what TensorBoard and W&B get), equal to the
    scales and ids recomputed here from the optimizer's public API; the output folder gets the plot."""
    parts, data = assets
    optimizer = {"name": "adamw_sgg", "lr": 1e-3, "recluster_interval": 2, "beta3": 0.5, "rule": rule}
    cfg = tiny_run(parts, data, tmp_path / "out", "full", optimizer, max_steps=4, per_device_train_batch_size=1)
    trainer, processor = build_trainer(cfg)
    trainer.train()
    logged = [row for row in trainer.state.log_history if any(key.startswith("sgg/") for key in row)]
    assert [row["step"] for row in logged] == [2, 4]  # once per re-clustering, at the next log
    sgg = trainer.optimizer.optimizer
    grouped = [p for p in trainer.model.parameters() if sgg.cluster_scales(p) is not None and sgg.cluster_ids(p) is not None]
    scales = torch.stack([sgg.cluster_scales(p) for p in grouped])
    ids = torch.cat([sgg.cluster_ids(p).reshape(-1) for p in grouped])
    last = logged[-1]
    for c in range(3):
        assert last[f"sgg/scale_median/{c}"] == pytest.approx(scales[:, c].median().item())
        assert last[f"sgg/scale_max/{c}"] == pytest.approx(scales[:, c].max().item())
        assert last[f"sgg/share/{c}"] == pytest.approx((ids == c).double().mean().item())
    assert ("sgg/global_mda" in last) == (rule == "mda")
    save_outputs(trainer, processor, cfg)
    assert (tmp_path / "out" / "sgg_scales.png").stat().st_size > 0


def test_stage1_projector_loads_into_the_connector(tmp_path):
    model, _ = build_llava(ModelConfig(vision_tower="tiny", language_model="tiny"))
    projector = model.model.multi_modal_projector
    state = {"model.mm_projector.0.weight": torch.randn_like(projector.linear_1.weight),
             "model.mm_projector.0.bias": torch.randn_like(projector.linear_1.bias),
             "model.mm_projector.2.weight": torch.randn_like(projector.linear_2.weight),
             "model.mm_projector.2.bias": torch.randn_like(projector.linear_2.bias)}
    torch.save(state, tmp_path / "mm_projector.bin")
    load_mm_projector(projector, tmp_path / "mm_projector.bin")
    assert torch.equal(projector.linear_1.weight, state["model.mm_projector.0.weight"])
    assert torch.equal(projector.linear_2.bias, state["model.mm_projector.2.bias"])
    state["model.mm_projector.0.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "bad.bin")
    with pytest.raises(ModelError, match="bad.bin: linear_1.weight has shape"):
        load_mm_projector(projector, tmp_path / "bad.bin")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="language_model '/nowhere/vicuna'"):
        build_llava(ModelConfig(vision_tower="tiny", language_model="/nowhere/vicuna"))
    with pytest.raises(ModelError, match="mm_projector file"):
        build_llava(ModelConfig(vision_tower="tiny", language_model="tiny", mm_projector=str(tmp_path / "x.bin")))


def test_config_files_compose_and_unknown_keys_are_errors(tmp_path):
    cfg = load_run_config([str(ROOT / "configs" / "llava_v1_5_7b_lora.yaml")],
                          optim=str(ROOT / "configs" / "optim" / "lamb_sgg.yaml"),
                          overrides=["optimizer.lr=2e-4", "train.max_steps=3"])
    assert cfg.train.mode == "lora" and cfg.train.lora_r == 128 and cfg.train.mm_projector_lr == 2e-5
    assert cfg.optimizer["name"] == "lamb_sgg" and cfg.optimizer["lr"] == 2e-4 and cfg.optimizer["n_clusters"] == 2
    assert cfg.model.vision_tower == "openai/clip-vit-large-patch14-336" and cfg.train.max_steps == 3
    assert cfg.train.dataloader_num_workers == 4  # official finetune(_lora).sh: --dataloader_num_workers 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 1e-3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key train.learning_rate; valid keys: output_dir"):
        load_run_config([str(bad)])
    with pytest.raises(ConfigError, match="unknown key data.path"):
        load_run_config([str(ROOT / "configs" / "llava_v1_5_7b_full.yaml")], overrides=["data.path=x"])
    with pytest.raises(ConfigError, match="optimizer: unknown option"):
        load_run_config([str(ROOT / "configs" / "llava_v1_5_7b_full.yaml")], overrides=["optimizer.n_clusters=3"])
    with pytest.raises(ConfigError, match="qlora needs model.quantization"):
        build_run_config({"train": {"mode": "qlora"}})
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  mode: [full\n")
    with pytest.raises(ConfigError, match="broken.yaml:3"):
        load_run_config([str(broken)])


SCRIPTS = ["finetune_full.sh", "finetune_lora.sh", "finetune_qlora.sh"]
ONE_OPTIMIZER_EACH = [("finetune_full.sh", "adamw_sgg"), ("finetune_lora.sh", "lamb_sgg"),
                      ("finetune_qlora.sh", "adafactor_sgg")]
EVERY_PAIR = [(s, o) for s in SCRIPTS for o in OPTIMIZER_NAMES if (s, o) not in ONE_OPTIMIZER_EACH]


@pytest.mark.slow  # each script end to end, a training process of its own (25-30 s each on 2 cores)
@pytest.mark.parametrize("script, optim", ONE_OPTIMIZER_EACH + EVERY_PAIR)
def test_finetune_scripts_train_a_tiny_model_end_to_end(assets, tmp_path, script, optim):
    tiny = tiny_config_file(tmp_path, *assets)
    env = {"NGPUS": "0", "GLOBAL_BATCH": "4", "PER_DEVICE": "2", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    if "PYTHONPATH" in os.environ:  # machines where the package runs from a source tree
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    result = subprocess.run(["bash", str(ROOT / "scripts" / script), str(ROOT / "configs" / "optim" / f"{optim}.yaml"),
                             "--config", str(tiny)] + (["--set", "optimizer.recluster_interval=1"]
                                                       if optim.endswith("_sgg") else []),
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = tmp_path / "out"
    assert (output / "llava_sgg_run.yaml").is_file() and (output / "loss_curve.png").is_file()
    model, _ = load_trained(output)
    assert model is not None


@pytest.mark.parametrize("mode, quantization", [("full", None), ("lora", None), ("qlora", "4bit")])
def test_gradient_checkpointing_bf16_and_accumulation(assets, tmp_path, mode, quantization):
    parts, data = assets
    cfg = tiny_run(parts, data, tmp_path, mode, _optimizer("lamb_sgg"), gradient_checkpointing=True, bf16=True,
                   gradient_accumulation_steps=2, max_steps=2)
    if quantization:
        cfg.model.quantization = quantization
    trainer, _ = build_trainer(cfg)
    before = _snapshot(trainer.model)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert trainer.state.global_step == 2
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach().float())]
    assert any("multi_modal_projector" in n for n in changed)
    assert trainer.model.is_gradient_checkpointing


def test_loss_on_trained_positions_only_equals_the_models_loss(assets, tmp_path):
    parts, data = assets
    trainer, _ = build_trainer(tiny_run(parts, data, tmp_path, "full"))
    model = trainer.model.eval()
    batch = {k: v.to(model.device) for k, v in trainer.data_collator([trainer.train_dataset[i]
                                                                       for i in range(4)]).items()}
    with torch.no_grad():
        expected = model(**batch).loss
        got = trainer.compute_loss(model, batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
