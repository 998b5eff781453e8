"""On a CUDA device SGG gives what it gives on the CPU (skipped where there is no GPU, as in CI)."""

import pytest
import torch

from conftest import batches, loss_fn, make_net
from llava_sgg.optim import build_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", ["adamw_sgg", "adafactor_sgg", "lamb_sgg"])
@pytest.mark.parametrize("assignment", ["frozen", "dynamic"])
def test_cuda_matches_cpu(name, assignment):
    runs = {}
    for device in ("cpu", "cuda"):
        model = make_net().to(device)
        opt = build_optimizer(model, name, lr=1e-2, recluster_interval=3, beta3=0.8, assignment=assignment)
        for x, y in batches(7):
            opt.zero_grad()
            loss_fn(model, (x.to(device), y.to(device))).backward()
            opt.step()
        runs[device] = (model, opt)
    (cpu_model, cpu_opt), (gpu_model, gpu_opt) = runs["cpu"], runs["cuda"]
    for p, q in zip(cpu_model.parameters(), gpu_model.parameters()):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-4, atol=1e-5)
        if p.ndim >= 2:
            agreement = (cpu_opt.cluster_ids(p) == gpu_opt.cluster_ids(q).cpu()).float().mean()
            assert agreement > 0.99
            torch.testing.assert_close(cpu_opt.cluster_scales(p), gpu_opt.cluster_scales(q).cpu(), rtol=1e-3, atol=0)
            assert gpu_opt.cluster_ids(q).device.type == "cuda"
    assert gpu_opt.global_mda == pytest.approx(cpu_opt.global_mda, rel=1e-4)


def test_bf16_on_cuda_with_a_large_sampled_layer():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16) * 0.02)
    opt = build_optimizer([p], "adamw_sgg", lr=1e-3, recluster_interval=2, exact_limit=2**20, sample_size=2**18)
    for _ in range(4):
        p.grad = torch.randn_like(p) * 1e-3
        opt.step()
    assert torch.isfinite(p).all() and torch.isfinite(opt.cluster_scales(p)).all()
    assert opt.cluster_ids(p).shape == p.shape
