"""LAMB against timm's independent implementation, and the weight-norm clamp by hand."""

import pytest
import torch
from timm.optim.lamb import Lamb as TimmLamb

from conftest import batches, loss_fn, make_net
from llava_sgg.optim import Lamb


def test_lamb_matches_timm_when_the_clamp_is_off():
    model, reference = make_net(), make_net()
    ours = Lamb(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01, clamp_value=None)
    # timm: no global grad clipping, trust ratio on every tensor, no trust clip.
    theirs = TimmLamb(reference.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01,
                      max_grad_norm=None, always_adapt=True, trust_clip=False)
    for batch in batches(15):
        for m, opt in ((model, ours), (reference, theirs)):
            opt.zero_grad()
            loss_fn(m, batch).backward()
            opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_weight_norm_is_clamped_at_clamp_value():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(20, 20) * 5)  # ||w|| ~ 100 > 10
    opt = Lamb([w], lr=0.1)
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    for step in range(1, 4):
        g = torch.randn_like(w)
        w.grad = g.clone()
        w0 = w.detach().clone()
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        r = (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-6)
        expected = w0 - 0.1 * (min(w0.norm().item(), 10.0) / r.norm()) * r
        torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"lr": -1.0}, {"eps": 0.0}, {"betas": (1.0, 0.9)}, {"weight_decay": -1.0},
                                    {"clamp_value": 0.0}])
def test_lamb_rejects_bad_hyper_parameters(kwargs):
    with pytest.raises(ValueError):
        Lamb([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)
