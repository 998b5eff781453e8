"""train.liger: Liger's RMSNorm and SwiGLU kernels give the unpatched model's loss and gradients."""

import importlib.util

import pytest
import torch
from test_packing import assets, loss_and_gradients, packing_run  # noqa: F401  (assets is a fixture)

from llava_sgg.data import DataCollatorForLlava
from llava_sgg.train.config import ConfigError, build_run_config
from llava_sgg.train.run import build_trainer, use_liger_kernels


def test_liger_must_be_a_boolean():
    with pytest.raises(ConfigError, match="train.liger must be true or false, got 1"):
        build_run_config({"model": {"vision_tower": "v", "language_model": "l"}, "data": {"data_path": "d"},
                          "train": {"liger": 1}})


def test_liger_and_compile_are_refused_together():
    with pytest.raises(ConfigError, match="train.liger and train.compile do not work together"):
        build_run_config({"model": {"vision_tower": "v", "language_model": "l"}, "data": {"data_path": "d"},
                          "train": {"liger": True, "compile": True}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_liger_is_refused_before_the_data_is_read(tmp_path):
    cfg = build_run_config({"model": {"vision_tower": "v", "language_model": "l"},
                            "data": {"data_path": str(tmp_path / "missing.json")},
                            "train": {"output_dir": str(tmp_path / "out"), "liger": True}})
    with pytest.raises(ConfigError, match="train.liger: Liger's kernels are Triton kernels and need a CUDA device"):
        build_trainer(cfg)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                    reason="needs a CUDA device and the liger-kernel package")
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_on_cuda_liger_gives_the_loss_and_gradients_of_the_unpatched_model(assets, tmp_path, mode):  # noqa: F811
    results = {}
    for liger in (False, True):
        trainer, _ = build_trainer(packing_run(assets, tmp_path / str(liger), mode, attn_implementation="sdpa",
                                               liger=liger))
        base = trainer.model.get_base_model() if mode == "lora" else trainer.model
        decoder = base.model.language_model
        # Patched on the instance: every norm's and MLP's forward is bound to the module itself, Liger's or not.
        patched = [m for m in decoder.modules() if "forward" in vars(m)]
        assert len(patched) == (3 * len(decoder.layers) + 1 if liger else 0)
        trainer.model.to("cuda")
        samples = [trainer.train_dataset[i] for i in (4, 1, 0, 3)]
        batch = {k: v.to("cuda") for k, v in DataCollatorForLlava(0, packing=True)(samples).items()}
        results[liger] = loss_and_gradients(trainer, batch)
    (loss, grads), (liger_loss, liger_grads) = results[False], results[True]
    torch.testing.assert_close(liger_loss, loss, rtol=1e-5, atol=0)
    assert grads.keys() == liger_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(liger_grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_liger_refuses_a_decoder_that_is_not_swiglu(assets, tmp_path):  # noqa: F811
    from llava_sgg.model.builder import ModelError

    trainer, _ = build_trainer(packing_run(assets, tmp_path, "full", liger=False))
    trainer.model.model.language_model.config.hidden_act = "gelu"
    with pytest.raises(ModelError, match="this decoder's activation is 'gelu'"):
        use_liger_kernels(trainer.model)
