"""build_optimizer: names, defaults, parameter groups and errors."""

import pytest
import torch
from transformers.optimization import Adafactor

from conftest import make_net
from llava_sgg.optim import OPTIMIZER_NAMES, SGG, Lamb, build_optimizer


def test_build_an_sgg_optimizer_from_a_model_by_name():
    model = make_net()
    opt = build_optimizer(model, "lamb_sgg", lr=2e-5, n_clusters=2, recluster_interval=1000, beta3=0.9)
    assert isinstance(opt, SGG) and isinstance(opt.optimizer, Lamb)
    assert (opt.n_clusters, opt.recluster_interval, opt.beta3) == (2, 1000, 0.9)
    assert opt.param_groups[0]["lr"] == 2e-5 and opt.param_groups[0]["eps"] == 1e-6
    assert opt.param_groups[0]["clamp_value"] == 10.0


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adafactor", Adafactor), ("lamb", Lamb)])
def test_every_name_builds_its_base_and_its_sgg_version(name, cls):
    model = make_net()
    base = build_optimizer(model, name, lr=1e-3)
    wrapped = build_optimizer(model, f"{name}_sgg", lr=1e-3)
    assert type(base) is cls and type(wrapped.optimizer) is cls
    assert set(OPTIMIZER_NAMES) == {"adamw", "adafactor", "lamb", "adamw_sgg", "adafactor_sgg", "lamb_sgg"}


def test_paper_defaults():
    model = make_net()
    adamw = build_optimizer(model, "adamw", lr=2e-5).param_groups[0]
    assert adamw["betas"] == (0.9, 0.999) and adamw["eps"] == 1e-8 and adamw["weight_decay"] == 0.0
    adafactor = build_optimizer(model, "adafactor", lr=2e-5).param_groups[0]
    assert adafactor["beta1"] is None and adafactor["clip_threshold"] == 1.0
    assert adafactor["eps"] == (1e-30, 1e-3) and not adafactor["relative_step"] and not adafactor["scale_parameter"]
    sgg = build_optimizer(model, "adamw_sgg", lr=2e-5)
    assert (sgg.n_clusters, sgg.recluster_interval, sgg.beta3, sgg.scale_bounds, sgg.eps) == (
        3, 500, 0.99, (0.1, 10.0), 1e-8)


def test_model_weight_decay_skips_biases_and_norms():
    model = make_net()
    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model.fc1.weight), id(model.fc2.weight)}
    assert {id(p) for p in plain["params"]} == {id(model.fc1.bias), id(model.norm.weight), id(model.norm.bias)}


def test_frozen_parameters_are_left_out():
    model = make_net()
    model.fc1.requires_grad_(False)
    opt = build_optimizer(model, "adamw_sgg", lr=1e-3)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert all(p.requires_grad for p in params) and len(params) == 3


def test_param_groups_with_their_own_lr_pass_through():
    model = make_net()
    groups = [{"params": model.fc1.parameters(), "lr": 2e-5}, {"params": model.fc2.parameters()}]
    opt = build_optimizer(groups, "adafactor_sgg", lr=2e-4)
    assert [g["lr"] for g in opt.param_groups] == [2e-5, 2e-4]


@pytest.mark.parametrize("name, kwargs, message", [
    ("sgd", {}, "unknown optimizer 'sgd'; choose one of: adamw, adafactor, lamb, adamw_sgg"),
    ("adamw", {"n_clusters": 3}, "SGG options need a \\*_sgg optimizer name"),
    ("adamw_sgg", {"betas2": 0.9}, "valid options: lr, "),
    ("adamw_sgg", {"lr": -1.0}, "lr must be a number >= 0"),
    ("adamw_sgg", {"lr": 1e-3, "n_clusters": 0}, "n_clusters"),
    ("lamb_sgg", {"lr": 1e-3, "scale_bounds": (2.0, 1.0)}, "scale_bounds"),
    ("adafactor", {}, "adafactor needs lr"),
])
def test_errors_name_the_problem_and_the_valid_choices(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(make_net(), name, **kwargs)


def _recipe(name):
    import yaml
    from pathlib import Path

    path = Path(__file__).parent.parent / "configs" / "optim" / f"{name}.yaml"
    return yaml.safe_load(path.read_text())["optimizer"]


@pytest.mark.parametrize("name", sorted(OPTIMIZER_NAMES))
def test_paper_recipe_configs_build(name):
    recipe = _recipe(name)
    assert recipe["name"] == name and recipe["lr"] == 2e-5
    opt = build_optimizer(make_net(), **recipe)
    if name.endswith("_sgg"):
        assert opt.recluster_interval == 1000 and opt.beta3 == 0.9
        assert opt.n_clusters == (2 if name == "lamb_sgg" else 3)
    group = opt.param_groups[0]
    assert group["weight_decay"] == 0.0
    if name.startswith("lamb"):
        assert (group["eps"], group["clamp_value"]) == (1e-6, 10.0)


def test_plain_adamw_keeps_torchs_default_step_off_cuda():
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer(model, "adamw", lr=1e-3)
    assert optimizer.defaults["fused"] is None and optimizer.defaults["foreach"] is None
    groups = [{"params": iter([model.weight]), "lr": 1e-2}, {"params": model.bias}]
    assert [len(g["params"]) for g in build_optimizer(groups, "adamw", lr=1e-3).param_groups] == [1, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_plain_adamw_takes_the_fused_step_unless_told_otherwise():
    model = torch.nn.Linear(4, 4).cuda()
    assert build_optimizer(model, "adamw", lr=1e-3).defaults["fused"] is True
    told = build_optimizer(model, "adamw", lr=1e-3, foreach=True).defaults
    assert told["foreach"] is True and told["fused"] is None
    # the same update as torch's own fused AdamW with the same settings
    reference = torch.nn.Linear(4, 4).cuda()
    reference.load_state_dict(model.state_dict())
    ours = build_optimizer(model, "adamw", lr=1e-3)
    theirs = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    for _ in range(3):
        for m in (model, reference):
            m.weight.grad, m.bias.grad = torch.ones_like(m.weight), torch.ones_like(m.bias)
        ours.step()
        theirs.step()
    torch.testing.assert_close(model.weight, reference.weight, rtol=0, atol=0)
