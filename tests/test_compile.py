"""train.compile: every decoder layer compiled in place gives the eager run's losses and weights."""

import pytest
import torch
from train_fixtures import make_dataset, make_parts, tiny_run

from llava_sgg.train.config import ConfigError, build_run_config
from llava_sgg.train.run import build_trainer


def test_compile_must_be_a_boolean():
    with pytest.raises(ConfigError, match="train.compile must be true or false, got 'yes'"):
        build_run_config({"model": {"vision_tower": "v", "language_model": "l"}, "data": {"data_path": "d"},
                          "train": {"compile": "yes"}})


@pytest.mark.slow  # torch.compile on a CPU: tens of seconds
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_compiled_decoder_layers_train_as_the_eager_ones(tmp_path, mode):
    parts, data = make_parts(tmp_path), make_dataset(tmp_path)
    runs = {}
    for compiled in (False, True):
        cfg = tiny_run(parts, data, tmp_path / f"out-{compiled}", mode, max_steps=3, per_device_train_batch_size=2,
                       compile=compiled, gradient_checkpointing=True)
        trainer, _ = build_trainer(cfg)
        layers = trainer.model.get_base_model() if mode == "lora" else trainer.model
        assert all((layer._compiled_call_impl is not None) == compiled
                   for layer in layers.model.language_model.layers)
        trainer.train()
        runs[compiled] = ([row["loss"] for row in trainer.state.log_history if "loss" in row],
                          {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for name, eager in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], eager, rtol=1e-4, atol=1e-6, msg=name)
