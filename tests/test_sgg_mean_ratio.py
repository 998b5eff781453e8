"""SGG's rule="mean_ratio": the scaling rule of the authors' published code, against a re-computation of it.

Westlake-AI/OpenToMe ``opentome/optimizer/sgg/adamw_sgg.py`` ("version 2"), read and re-computed here
in the test's own words: Adam moments of the gradient with weight decay added to it; every
``recluster_interval`` steps each parameter's |exp_avg| is clustered by a scikit-learn
MiniBatchKMeans (random_state 42, batch_size 128) that is kept and ``partial_fit`` again, its labels
predicted; each cluster's mean |exp_avg| (the layer's mean for an empty cluster) enters an EMA that
starts at 1; the target scale is the layer's mean |exp_avg| over that EMA (floored at eps); the
scale is an EMA of the target, starting at 1 and clamped to [0.1, 10]; every parameter's step is
multiplied by its element's cluster scale. torch's Adam with ``weight_decay`` adds the decay to the
gradient as that code does; it puts eps after the bias correction of the second moment, the
authors' code before it (a difference below float rounding at these gradients: eps is 1e-12 here).
"""

import math

import numpy as np
import pytest
import torch
from sklearn.cluster import MiniBatchKMeans

from llava_sgg.optim import SGG, build_optimizer


class AuthorsAdamWSGG:
    """The authors' update, one parameter at a time (the test's independent re-computation)."""

    def __init__(self, params, lr, betas, eps, weight_decay, n_clusters, recluster_interval, mean_decay, scale_decay):
        self.params = list(params)
        self.lr, (self.beta1, self.beta2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.k, self.t_interval, self.mean_decay, self.scale_decay = n_clusters, recluster_interval, mean_decay, scale_decay
        self.state = {}

    @torch.no_grad()
    def step(self):
        for p in self.params:
            if p.grad is None:
                continue
            grad = p.grad + self.wd * p if self.wd else p.grad.clone()
            s = self.state.get(p)
            if s is None:
                s = self.state[p] = {"step": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p),
                                     "scale": torch.ones(self.k), "ids": torch.zeros(p.numel(), dtype=torch.long),
                                     "means": torch.ones(self.k),
                                     "km": MiniBatchKMeans(n_clusters=self.k, random_state=42, batch_size=128)}
            s["step"] += 1
            s["m"].mul_(self.beta1).add_(grad, alpha=1 - self.beta1)
            s["v"].mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            step_size = self.lr * math.sqrt(1 - self.beta2 ** s["step"]) / (1 - self.beta1 ** s["step"])
            update = -step_size * s["m"] / (s["v"].sqrt() + self.eps)
            if s["step"] % self.t_interval == 0:
                magnitude = s["m"].reshape(-1).abs()
                features = magnitude.float().numpy().reshape(-1, 1)
                s["km"].partial_fit(features)
                s["ids"] = torch.from_numpy(s["km"].predict(features)).long()
                layer_mean = magnitude.mean().item()
                for c in range(self.k):
                    members = magnitude[s["ids"] == c]
                    current = members.mean() if len(members) else torch.tensor(layer_mean)
                    s["means"][c] = s["means"][c] * self.mean_decay + current * (1 - self.mean_decay)
                target = layer_mean / s["means"].clamp(min=self.eps)
                s["scale"] = (s["scale"] * self.scale_decay + target * (1 - self.scale_decay)).clamp(0.1, 10.0)
            p.add_(update * s["scale"][s["ids"]].view_as(p))


def model_and_batches(seed=0, steps=12):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    batches = [(torch.randn(32, 6), torch.randn(32, 3)) for _ in range(steps)]
    return model, batches


def train(model, opt, batches):
    for x, y in batches:
        for p in model.parameters():
            p.grad = None
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


SETTINGS = {"lr": 3e-2, "betas": (0.9, 0.999), "eps": 1e-12, "weight_decay": 0.01}


@pytest.mark.parametrize("k, mean_decay, scale_decay", [(3, 0.95, 0.9), (3, 0.5, 0.0), (1, 0.95, 0.9)])
def test_the_authors_rule_with_their_clustering_follows_their_code(k, mean_decay, scale_decay):
    """One cluster too: the authors' rule then still scales each layer, by its mean over the EMA of it."""
    model, batches = model_and_batches()
    reference = model_and_batches()[0]
    ours = SGG(torch.optim.Adam(model.parameters(), **SETTINGS), n_clusters=k, recluster_interval=4, beta3=scale_decay,
               rule="mean_ratio", mean_decay=mean_decay, backend="sklearn")
    theirs = AuthorsAdamWSGG(reference.parameters(), SETTINGS["lr"], SETTINGS["betas"], SETTINGS["eps"],
                             SETTINGS["weight_decay"], k, 4, mean_decay, scale_decay)
    train(model, ours, batches)
    train(reference, theirs, batches)
    for p, q in zip(model.parameters(), reference.parameters()):
        # Vectors (biases) are scaled too: every parameter with a gradient and at least K elements.
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
        assert torch.equal(ours.cluster_ids(p).reshape(-1), theirs.state[q]["ids"])
        torch.testing.assert_close(ours.cluster_scales(p), theirs.state[q]["scale"], rtol=1e-6, atol=0)
    assert any((theirs.state[q]["scale"] != 1).any() for q in reference.parameters())


@pytest.mark.parametrize("exact_limit", [2**22, 40])  # every layer whole; the larger ones fitted on a sample
def test_its_scales_follow_the_rule_from_the_ids_the_on_device_kmeans_chose(exact_limit):
    """The default backend clusters on the parameter's device (ids ordered by centre); given its ids,
    the scales are the authors' EMAs of the layer mean over the cluster means of the whole layer."""
    model, batches = model_and_batches(steps=8)
    opt = SGG(torch.optim.Adam(model.parameters(), lr=1e-2), n_clusters=3, recluster_interval=4, beta3=0.9,
              rule="mean_ratio", mean_decay=0.95, exact_limit=exact_limit, sample_size=32)
    means = {p: torch.ones(3) for p in model.parameters()}
    scales = {p: torch.ones(3) for p in model.parameters()}
    for step, (x, y) in enumerate(batches, start=1):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if step % 4:
            continue
        for p in model.parameters():
            magnitude = opt.state[p]["exp_avg"].reshape(-1).abs()
            ids = opt.cluster_ids(p).reshape(-1)
            layer = magnitude.mean()
            current = torch.stack([magnitude[ids == c].mean() if (ids == c).any() else layer for c in range(3)])
            means[p] = 0.95 * means[p] + 0.05 * current
            scales[p] = (0.9 * scales[p] + 0.1 * layer / means[p].clamp(min=1e-8)).clamp(0.1, 10)
            torch.testing.assert_close(opt.cluster_scales(p), scales[p], rtol=1e-5, atol=0)
            # 1-D k-means groups are intervals of |m|, ordered by centre.
            upper = [magnitude[ids == c].max() for c in range(3) if (ids == c).any()]
            assert upper == sorted(upper)


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_a_resumed_run_equals_an_uninterrupted_one(backend):
    def build(model):
        return SGG(torch.optim.Adam(model.parameters(), lr=1e-2), n_clusters=3, recluster_interval=3, beta3=0.5,
                   rule="mean_ratio", mean_decay=0.8, backend=backend)

    model, batches = model_and_batches(steps=14)
    whole = build(model)
    train(model, whole, batches)

    first, _ = model_and_batches(steps=14)
    opt = build(first)
    train(first, opt, batches[:7])
    saved = opt.state_dict()
    torch.save(saved, buffer := __import__("io").BytesIO())
    buffer.seek(0)
    resumed_model = model_and_batches()[0]
    resumed_model.load_state_dict(first.state_dict())
    resumed = build(resumed_model)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    train(resumed_model, resumed, batches[7:])
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(whole.cluster_scales(p), resumed.cluster_scales(q))


def test_options_are_checked_and_the_names_build():
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    for kwargs, message in [({"rule": "median"}, "rule must be one of mda, mean_ratio"),
                            ({"rule": "mean_ratio", "mean_decay": 1.0}, r"mean_decay must be a number in \[0, 1\)"),
                            ({"rule": "mean_ratio", "cluster_on": "signed"}, "clusters |m|"),
                            ({"rule": "mean_ratio", "assignment": "dynamic"}, "frozen")]:
        with pytest.raises(ValueError, match=message):
            SGG(torch.optim.AdamW(params), **kwargs)
    opt = build_optimizer(params, "lamb_sgg", lr=1e-3, rule="mean_ratio", mean_decay=0.95, beta3=0.9)
    assert opt.rule == "mean_ratio" and opt.mean_decay == 0.95
    assert SGG(torch.optim.AdamW(params)).rule == "mda"  # the paper's rule stays the default


def test_before_the_first_reclustering_it_is_the_base_optimizer():
    model, batches = model_and_batches(steps=4)
    base_model = model_and_batches()[0]
    train(model, SGG(torch.optim.Adam(model.parameters(), lr=1e-2), recluster_interval=5, rule="mean_ratio"), batches)
    train(base_model, torch.optim.Adam(base_model.parameters(), lr=1e-2), batches)
    for p, q in zip(model.parameters(), base_model.parameters()):
        assert torch.equal(p, q)


def test_every_optimizer_preset_builds():
    """configs/optim/*.yaml, the paper's presets and the authors' (rule: mean_ratio), as a run loads them."""
    from pathlib import Path

    import yaml

    presets = sorted((Path(__file__).parent.parent / "configs" / "optim").glob("*.yaml"))
    assert {"adamw_sgg_mean_ratio.yaml", "adafactor_sgg_mean_ratio.yaml", "lamb_sgg_mean_ratio.yaml"} <= {
        p.name for p in presets}
    model = torch.nn.Linear(8, 8)
    for path in presets:
        options = dict(yaml.safe_load(path.read_text())["optimizer"])
        opt = build_optimizer(model, options.pop("name"), **options)
        if "mean_ratio" in path.name:
            assert opt.rule == "mean_ratio", path
