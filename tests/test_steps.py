"""The base optimizers' split steps: Adam's update of a large CPU tensor in parts."""

import pytest
import torch

from llava_sgg.optim import SGG
from llava_sgg.optim import steps


# Parts of 2**12 elements here instead of CPU_PART's 2**20: the same code on a layer a thousandth the size.
PART = 2**12


@pytest.fixture(autouse=True)
def small_parts(monkeypatch):
    monkeypatch.setattr(steps, "CPU_PART", PART)


def _run(assignment: str, n_steps: int = 3, shape=(60, 100)):
    """A 6000-element layer (two parts: 4096 and 1904 elements) and a small one, stepped with fixed gradients."""
    torch.manual_seed(0)
    big, small = torch.nn.Parameter(torch.randn(shape)), torch.nn.Parameter(torch.randn(64, 32))
    opt = SGG(torch.optim.AdamW([big, small], lr=1e-2, weight_decay=0.1), n_clusters=3, recluster_interval=2,
              beta3=0.5, assignment=assignment)
    grads = torch.Generator().manual_seed(1)
    for _ in range(n_steps):
        for p in (big, small):
            p.grad = torch.randn(p.shape, generator=grads)
        opt.step()
    return opt, big, small


@pytest.mark.parametrize("assignment", ["frozen", "dynamic"])
def test_cpu_update_in_parts_equals_the_whole_update_bit_for_bit(monkeypatch, assignment):
    _, big_parts, small_parts = _run(assignment)
    assert len(steps.cpu_parts(big_parts)) == 2 and steps.cpu_parts(small_parts) is None
    monkeypatch.setattr(steps, "CPU_PART", 2**40)  # one part: the whole-tensor update
    assert steps.cpu_parts(big_parts) is None
    _, big_whole, small_whole = _run(assignment)
    assert torch.equal(big_parts, big_whole) and torch.equal(small_parts, small_whole)


@pytest.mark.parametrize("assignment", ["frozen", "dynamic"])
def test_cpu_update_in_parts_is_adamw_with_the_cluster_scale(assignment):
    """The scaled step after a re-clustering, recomputed here in float64 from the state before it."""
    opt, big, _ = _run(assignment, n_steps=2)
    assert len(steps.cpu_parts(big)) == 2
    state = opt.state[big]
    before = big.detach().double().clone()
    m, v = state["exp_avg"].double().clone(), state["exp_avg_sq"].double().clone()
    grad = torch.randn(big.shape, generator=torch.Generator().manual_seed(7))
    big.grad = grad
    opt.step()  # step 3: scaled, no re-clustering

    g = grad.double()
    m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
    statistic = state["exp_avg"] if assignment == "dynamic" else None
    if statistic is None:
        ids = opt.cluster_ids(big)
    else:  # dynamic: ids of the current first moment by the fitted thresholds
        thresholds = opt._layers[big]["thresholds"].double()
        ids = (m.abs().unsqueeze(-1) > thresholds).sum(-1)
    scale = opt.cluster_scales(big).double()[ids]
    assert scale.unique().numel() > 1  # the scales differ between clusters: the test can see a wrong id
    lr, step = 1e-2, 3
    expected = before * (1 - lr * 0.1) - lr / (1 - 0.9**step) * m * scale / (
        (v.sqrt() / (1 - 0.999**step) ** 0.5) + 1e-8)
    torch.testing.assert_close(big.detach().double(), expected, rtol=1e-5, atol=1e-6)
