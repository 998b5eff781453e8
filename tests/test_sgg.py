"""The SGG wrapper: public API, equality with the base optimizer, and the spec's math at re-clustering."""

import copy

import numpy as np
import pytest
import torch
from transformers.optimization import Adafactor

from conftest import batches, loss_fn, make_net, twin
from llava_sgg.optim import SGG, Lamb, build_optimizer
from reference import sgg_recluster


def test_wrap_any_optimizer_in_a_training_loop():
    model = make_net()
    opt = SGG(torch.optim.AdamW(model.parameters(), lr=1e-2), n_clusters=3, recluster_interval=4, beta3=0.9)
    losses = []
    for batch in batches(12):
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert opt.cluster_ids(model.fc1.weight).shape == model.fc1.weight.shape
    assert opt.cluster_ids(model.fc1.weight).dtype == torch.long
    assert opt.cluster_scales(model.fc2.weight).shape == (3,)
    assert opt.cluster_ids(model.fc1.bias) is None and opt.cluster_scales(model.norm.weight) is None
    assert isinstance(opt.global_mda, float) and opt.global_mda > 0
    assert set(opt.state[model.fc1.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.param_groups is opt.optimizer.param_groups


BASES = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1),
    "adamw_amsgrad": lambda params: torch.optim.AdamW(params, lr=3e-3, amsgrad=True),
    "adam_l2": lambda params: torch.optim.Adam(params, lr=3e-3, weight_decay=0.05),
    "adafactor": lambda params: Adafactor(params, lr=3e-3, scale_parameter=False, relative_step=False),
    "adafactor_beta1_wd": lambda params: Adafactor(params, lr=3e-3, beta1=0.9, weight_decay=0.01,
                                                   scale_parameter=True, relative_step=False),
    "lamb": lambda params: Lamb(params, lr=3e-3, weight_decay=0.01),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=3e-2, momentum=0.9),
}


def _run(model, opt, data):
    for batch in data:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()


def _assert_same(model_a, model_b):
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("base", sorted(BASES))
def test_first_steps_before_reclustering_equal_the_base_bit_for_bit(base):
    model, reference = make_net(), make_net()
    sgg = SGG(BASES[base](model.parameters()), n_clusters=3, recluster_interval=6)
    plain = BASES[base](reference.parameters())
    for batch in batches(5):  # steps 1..T-1
        _run(model, sgg, [batch])
        _run(reference, plain, [batch])
        _assert_same(model, reference)
    assert sgg.global_mda is None and sgg.cluster_ids(model.fc1.weight) is None


@pytest.mark.parametrize("base", sorted(BASES))
def test_one_cluster_equals_the_base_at_every_step(base):
    model, reference = make_net(), make_net()
    sgg = SGG(BASES[base](model.parameters()), n_clusters=1, recluster_interval=2)
    plain = BASES[base](reference.parameters())
    for batch in batches(9):
        _run(model, sgg, [batch])
        _run(reference, plain, [batch])
        _assert_same(model, reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("base", [b for b in sorted(BASES) if b != "sgd_momentum"])
def test_scaled_step_with_unit_scales_is_the_base_step_bit_for_bit(base, dtype):
    # scale_bounds (1, 1) pins every scale at 1 after each re-clustering, so the
    # scaled path runs on every step and must reproduce the base optimizer.
    model, reference = make_net(dtype=dtype), make_net(dtype=dtype)
    sgg = SGG(BASES[base](model.parameters()), n_clusters=3, recluster_interval=2, scale_bounds=(1.0, 1.0))
    plain = BASES[base](reference.parameters())
    for batch in batches(8, dtype=dtype):
        _run(model, sgg, [batch])
        _run(reference, plain, [batch])
        _assert_same(model, reference)
    assert sgg.global_mda is not None
    assert torch.equal(sgg.cluster_scales(model.fc1.weight), torch.ones(3))


def _grads(model):
    return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


def _eligible(model):
    return [p for p in model.parameters() if p.ndim >= 2]


def _two_lr_groups(model):
    # LLaVA trains the projector at its own lr: fc1 stands in for it here.
    return [{"params": list(model.fc1.parameters()), "lr": 5e-3, "weight_decay": 0.0},
            {"params": list(model.norm.parameters()) + list(model.fc2.parameters()), "lr": 2e-3,
             "weight_decay": 0.5}]


def _adamw_update(p_prev, m, v, step, lr, weight_decay, scale, betas=(0.9, 0.999), eps=1e-8):
    m_hat = m / (1 - betas[0] ** step)
    v_hat = v / (1 - betas[1] ** step)
    # The decoupled weight decay is not scaled by SGG.
    return p_prev * (1 - lr * weight_decay) - lr * scale * m_hat / (np.sqrt(v_hat) + eps)


def test_adamw_reclustering_matches_the_spec_recomputed_independently():
    """Ids, scales and the update at re-clustering steps 3 and 6, frozen ids in between."""
    T, K, beta3 = 3, 3, 0.8
    model = make_net()
    opt = SGG(torch.optim.AdamW(_two_lr_groups(model)), n_clusters=K, recluster_interval=T, beta3=beta3)
    lrs = {p: g["lr"] for g in opt.param_groups for p in g["params"]}
    decays = {p: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    eligible = _eligible(model)
    m = {p: np.zeros(p.shape) for p in model.parameters()}
    v = {p: np.zeros(p.shape) for p in model.parameters()}
    scales = [np.ones(K) for _ in eligible]
    ids = None
    for step, batch in enumerate(batches(7), start=1):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        before = {p: p.detach().double().numpy().copy() for p in model.parameters()}
        for p in model.parameters():
            g = p.grad.double().numpy()
            m[p] = 0.9 * m[p] + 0.1 * g
            v[p] = 0.999 * v[p] + 0.001 * g * g
        if step % T == 0:
            ids, scales, global_mda = sgg_recluster([m[p] for p in eligible], K, scales, beta3)
        opt.step()
        for p in model.parameters():
            scale = 1.0
            if ids is not None and p.ndim >= 2:
                i = next(j for j, q in enumerate(eligible) if q is p)
                scale = scales[i][ids[i]]
            expected = _adamw_update(before[p], m[p], v[p], step, lrs[p], decays[p], scale)
            np.testing.assert_allclose(p.detach().double().numpy(), expected, rtol=1e-5, atol=1e-7)
        if step >= T:
            for i, p in enumerate(eligible):
                np.testing.assert_array_equal(opt.cluster_ids(p).numpy(), ids[i])  # frozen until step 6
                np.testing.assert_allclose(opt.cluster_scales(p).numpy(), scales[i], rtol=1e-5)
        if step % T == 0:
            assert opt.global_mda == pytest.approx(global_mda, rel=1e-5)
    assert not np.allclose(scales[0], 1.0)


def _base_delta_reference(make_base, T=3, K=3, beta3=0.8, statistic=None, steps=7):
    """For bases whose own step is taken from a twin: p_sgg = p + S[C] * (p_twin_after - p)."""
    model = make_net()
    sgg = SGG(make_base(model.parameters()), n_clusters=K, recluster_interval=T, beta3=beta3)
    twin_model = twin(model)
    plain = make_base(twin_model.parameters())
    eligible, twin_eligible = _eligible(model), _eligible(twin_model)
    scales = [np.ones(K) for _ in eligible]
    ids = None
    for step, batch in enumerate(batches(steps), start=1):
        sgg.zero_grad()
        loss_fn(model, batch).backward()
        before = [p.detach().clone() for p in model.parameters()]
        # The twin takes the plain base step from the SGG model's current point.
        with torch.no_grad():
            for q, p in zip(twin_model.parameters(), model.parameters()):
                q.copy_(p)
                q.grad = p.grad.clone()
        plain.step()
        sgg.step()
        if step % T == 0:
            stats = [statistic(plain, q, before_q, q_after).numpy() for q, before_q, q_after in
                     zip(twin_eligible, [b for b, p in zip(before, model.parameters()) if p.ndim >= 2],
                         twin_eligible)]
            ids, scales, _ = sgg_recluster(stats, K, scales, beta3)
        for p, q, b in zip(model.parameters(), twin_model.parameters(), before):
            scale = 1.0
            if ids is not None and p.ndim >= 2:
                i = next(j for j, q in enumerate(eligible) if q is p)
                scale = torch.from_numpy(scales[i][ids[i]]).float()
            expected = b + scale * (q.detach() - b)
            torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
        # Keep the twin's state in lock-step with SGG's (same moments, same step count).
        # (a deep copy: load_state_dict would otherwise share the moment tensors)
        plain.load_state_dict(copy.deepcopy({k: v for k, v in sgg.state_dict().items() if k != "sgg"}))
    if ids is not None:
        for i, p in enumerate(eligible):
            np.testing.assert_array_equal(sgg.cluster_ids(p).numpy(), ids[i])
    return scales


def test_adafactor_reclustering_uses_the_normalized_update_without_first_moment():
    lr = 3e-3

    def normalized_update(plain, q, before, after):  # spec: g / sqrt(v_hat) after clipping = -(step) / lr
        return (before - after.detach()) / lr

    scales = _base_delta_reference(
        lambda ps: Adafactor(ps, lr=lr, scale_parameter=False, relative_step=False), statistic=normalized_update)
    assert not np.allclose(scales[0], 1.0)


def test_lamb_reclustering_scales_after_the_trust_ratio():
    def exp_avg(plain, q, before, after):
        return plain.state[q]["exp_avg"].clone()

    _base_delta_reference(lambda ps: Lamb(ps, lr=3e-3), statistic=exp_avg)


def test_generic_optimizer_reclustering_on_its_momentum_buffer():
    def momentum(plain, q, before, after):
        return plain.state[q]["momentum_buffer"].clone()

    _base_delta_reference(lambda ps: torch.optim.SGD(ps, lr=3e-2, momentum=0.9), statistic=momentum)


def test_lamb_trust_ratio_is_computed_from_the_unscaled_update():
    model = make_net()
    opt = SGG(Lamb(model.parameters(), lr=1e-2), n_clusters=2, recluster_interval=2, beta3=0.5)
    _run(model, opt, batches(2))  # re-clusters at step 2; step 3 is recomputed by hand
    p = model.fc1.weight
    opt.zero_grad()
    loss_fn(model, batches(1, seed=10)[0]).backward()
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
    p0, g = p.detach().clone(), p.grad.clone()
    scale = opt.cluster_scales(p)[opt.cluster_ids(p)]
    opt.step()
    step = float(state["step"]) + 1
    m = 0.9 * state["exp_avg"] + 0.1 * g
    v = 0.999 * state["exp_avg_sq"] + 0.001 * g * g
    r = (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-6)
    trust = p0.norm().clamp(max=10.0) / r.norm()
    torch.testing.assert_close(p.detach(), p0 - 1e-2 * trust * scale * r, rtol=1e-5, atol=1e-7)


def test_dynamic_assignment_keeps_only_thresholds_and_follows_the_current_statistic():
    model = make_net()
    opt = SGG(torch.optim.AdamW(model.parameters(), lr=1e-2), n_clusters=3, recluster_interval=3,
              assignment="dynamic")
    _run(model, opt, batches(4))
    layer = opt.state_dict()["sgg"]["layers"]
    assert all(set(entry) == {"cluster_scales", "thresholds"} for entry in layer.values())
    assert all(entry["thresholds"].shape == (2,) for entry in layer.values())
    p = model.fc1.weight
    thresholds = next(iter(layer.values()))["thresholds"]
    expected = (opt.state[p]["exp_avg"].abs()[..., None] > thresholds).sum(-1)
    assert torch.equal(opt.cluster_ids(p), expected)


def test_frozen_ids_take_one_byte_per_element():
    model = make_net()
    opt = SGG(torch.optim.AdamW(model.parameters(), lr=1e-2), n_clusters=3, recluster_interval=2)
    _run(model, opt, batches(3))
    for entry in opt.state_dict()["sgg"]["layers"].values():
        assert entry["cluster_ids"].dtype == torch.uint8


def _train_with_checkpoint(tmp_path, name, **options):
    data = batches(10)
    model_a = make_net()
    opt_a = build_optimizer(model_a, name, lr=1e-2, **options)
    _run(model_a, opt_a, data)

    model_b = make_net()
    opt_b = build_optimizer(model_b, name, lr=1e-2, **options)
    _run(model_b, opt_b, data[:5])
    torch.save({"model": model_b.state_dict(), "optimizer": opt_b.state_dict()}, tmp_path / "ckpt.pt")
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model_c = make_net(seed=123)
    model_c.load_state_dict(checkpoint["model"])
    opt_c = build_optimizer(model_c, name, lr=1e-2, **options)
    opt_c.load_state_dict(checkpoint["optimizer"])
    _run(model_c, opt_c, data[5:])
    return model_a, opt_a, model_c, opt_c


@pytest.mark.parametrize("name", ["adamw_sgg", "adafactor_sgg", "lamb_sgg"])
@pytest.mark.parametrize("assignment", ["frozen", "dynamic"])
def test_state_dict_round_trip_resumes_identically(tmp_path, name, assignment):
    model_a, opt_a, model_c, opt_c = _train_with_checkpoint(
        tmp_path, name, n_clusters=3, recluster_interval=3, beta3=0.8, assignment=assignment)
    _assert_same(model_a, model_c)
    assert opt_c.global_mda == opt_a.global_mda
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        if p.ndim >= 2:
            assert torch.equal(opt_a.cluster_scales(p), opt_c.cluster_scales(q))
            assert torch.equal(opt_a.cluster_ids(p), opt_c.cluster_ids(q))


def test_loading_a_state_dict_with_other_cluster_count_is_an_error():
    model = make_net()
    opt = build_optimizer(model, "adamw_sgg", lr=1e-2, n_clusters=3, recluster_interval=2)
    _run(model, opt, batches(2))
    other = build_optimizer(model, "adamw_sgg", lr=1e-2, n_clusters=2)
    with pytest.raises(ValueError, match="n_clusters=3"):
        other.load_state_dict(opt.state_dict())


def test_lr_schedulers_drive_the_wrapped_optimizer():
    from transformers import get_cosine_schedule_with_warmup

    model, reference = make_net(), make_net()
    sgg = build_optimizer(model, "adamw_sgg", lr=1e-2, recluster_interval=100)
    plain = build_optimizer(reference, "adamw", lr=1e-2)
    scheduler = get_cosine_schedule_with_warmup(sgg, num_warmup_steps=2, num_training_steps=8)
    plain_scheduler = get_cosine_schedule_with_warmup(plain, num_warmup_steps=2, num_training_steps=8)
    seen = []
    for batch in batches(8):
        _run(model, sgg, [batch])
        _run(reference, plain, [batch])
        scheduler.step()
        plain_scheduler.step()
        seen.append(sgg.param_groups[0]["lr"])
        assert sgg.optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0]
    _assert_same(model, reference)
    assert seen[:3] == pytest.approx([5e-3, 1e-2, 1e-2 * 0.5 * (1 + np.cos(np.pi / 6))])

    model = make_net()
    opt = build_optimizer(model, "lamb_sgg", lr=1e-2)
    step_lr = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _run(model, opt, batches(1))
    step_lr.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)


@pytest.mark.parametrize("base", ["adamw", "adafactor", "lamb"])
def test_bf16_parameters_train_and_stay_finite(base):
    model = make_net(dtype=torch.bfloat16)
    opt = build_optimizer(model, f"{base}_sgg", lr=1e-2, recluster_interval=2, beta3=0.5)
    _run(model, opt, batches(6, dtype=torch.bfloat16))
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
    assert torch.isfinite(opt.cluster_scales(model.fc1.weight)).all()


def test_step_under_no_grad_and_with_closure():
    model = make_net()
    opt = build_optimizer(model, "adamw_sgg", lr=1e-2, recluster_interval=1)
    data = batches(2)
    loss_fn(model, data[0]).backward()
    with torch.no_grad():
        opt.step()

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, data[1])
        loss.backward()
        return loss

    assert torch.isfinite(opt.step(closure))
    assert opt.global_mda is not None


@pytest.mark.parametrize("base", ["adamw", "adafactor", "lamb", "sgd"])
def test_zero_and_constant_statistics_keep_scales_finite(base):
    torch.manual_seed(0)
    zero = torch.nn.Parameter(torch.randn(6, 5))      # gets an all-zero gradient
    constant = torch.nn.Parameter(torch.randn(4, 7))  # gets the same gradient everywhere
    normal = torch.nn.Parameter(torch.randn(8, 3))
    params = [zero, constant, normal]
    make = {"adamw": lambda: torch.optim.AdamW(params, lr=1e-2),
            "adafactor": lambda: Adafactor(params, lr=1e-2, scale_parameter=False, relative_step=False),
            "lamb": lambda: Lamb(params, lr=1e-2),
            "sgd": lambda: torch.optim.SGD(params, lr=1e-2, momentum=0.9)}[base]
    opt = SGG(make(), n_clusters=3, recluster_interval=1)
    for _ in range(3):
        zero.grad = torch.zeros_like(zero)
        constant.grad = torch.full_like(constant, 0.5)
        normal.grad = torch.randn_like(normal)
        opt.step()
    for p in params:
        assert torch.isfinite(p).all()
        scales = opt.cluster_scales(p)
        assert torch.isfinite(scales).all() and (scales > 0).all()


def test_all_zero_statistics_everywhere_give_lower_bound_targets():
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt = SGG(torch.optim.AdamW([p], lr=1e-2, weight_decay=0.0), n_clusters=2, recluster_interval=1, beta3=0.5)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.global_mda == 0.0
    # target r = clamp(0 / (0 + eps)) = lower bound 0.1 for the one non-empty group; the empty one keeps 1
    assert torch.allclose(opt.cluster_scales(p), torch.tensor([0.5 * 1 + 0.5 * 0.1, 1.0]))
    assert torch.equal(p, torch.ones(4, 4))


def test_sklearn_backend_keeps_no_sklearn_object_and_agrees_with_the_default():
    results = {}
    for backend in ("torch", "sklearn"):
        model = make_net()
        opt = build_optimizer(model, "adamw_sgg", lr=1e-2, recluster_interval=3, backend=backend)
        _run(model, opt, batches(3))
        results[backend] = opt.cluster_ids(model.fc2.weight)

        def leaves(obj):
            if isinstance(obj, dict):
                for value in obj.values():
                    yield from leaves(value)
            elif isinstance(obj, (list, tuple)):
                for value in obj:
                    yield from leaves(value)
            else:
                yield obj

        for leaf in leaves(opt.state_dict()):
            assert leaf is None or isinstance(leaf, (torch.Tensor, int, float, str, bool)), type(leaf)
    agreement = (results["torch"] == results["sklearn"]).float().mean()
    assert agreement > 0.9


def test_large_layers_are_clustered_from_a_sample():
    torch.manual_seed(0)
    big = torch.nn.Parameter(torch.randn(64, 64))
    small = torch.nn.Parameter(torch.randn(8, 8))
    grads = [(torch.randn(64, 64) * torch.linspace(0.1, 3, 64), torch.randn(8, 8)) for _ in range(2)]
    scales = {}
    for limit in (2**22, 1000):
        p, q = big.detach().clone().requires_grad_(), small.detach().clone().requires_grad_()
        opt = SGG(torch.optim.AdamW([p, q], lr=1e-2), n_clusters=3, recluster_interval=2, beta3=0.0,
                  exact_limit=limit, sample_size=2048)
        for gp, gq in grads:
            p.grad, q.grad = gp.clone(), gq.clone()
            opt.step()
        scales[limit] = opt.cluster_scales(p)
        assert opt.cluster_ids(p).shape == (64, 64)
    torch.testing.assert_close(scales[1000], scales[2**22], rtol=0.1, atol=0.0)


def test_a_batch_of_work_rows_holds_whole_layers_and_seeded_samples_of_large_ones():
    # A layer of exactly sample_size values is clustered whole, in the same batch as the samples.
    whole, large = torch.randn(600), torch.randn(2000)
    opt = SGG(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]), exact_limit=1000, sample_size=600, seed=3)
    opt._sgg_step = 500
    rows = opt._work_rows([whole, large], [0, 1], 600)
    assert torch.equal(rows[0], whole)
    generator = torch.Generator().manual_seed(3 * 1_000_003 + 500 * 7919 + 1)  # seed, step and layer index
    assert torch.equal(rows[1], large[torch.randint(2000, (600,), generator=generator)])


def test_sorted_rows_of_whole_layers_are_their_values_sorted_and_samples_are_sorted_work_rows():
    g = torch.Generator().manual_seed(4)
    opt = SGG(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]), exact_limit=1000, sample_size=600, seed=3)
    opt._sgg_step = 500
    whole = [torch.randn(600, generator=g) ** 3 for _ in range(3)]
    assert torch.equal(opt._sorted_rows(whole, [0, 1, 2], 600), torch.stack(whole).sort(dim=1).values)
    mixed = [whole[0], torch.randn(2000, generator=g)]
    assert torch.equal(opt._sorted_rows(mixed, [0, 1], 600), opt._work_rows(mixed, [0, 1], 600).sort(dim=1).values)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_clusters": 0}, "n_clusters"),
    ({"n_clusters": 2.5}, "n_clusters"),
    ({"recluster_interval": 0}, "recluster_interval"),
    ({"beta3": 1.0}, "beta3"),
    ({"beta3": -0.1}, "beta3"),
    ({"scale_bounds": (10.0, 0.1)}, "scale_bounds"),
    ({"scale_bounds": (0.0, 1.0)}, "scale_bounds"),
    ({"scale_bounds": 3}, "scale_bounds"),
    ({"eps": 0}, "eps"),
    ({"cluster_on": "sign"}, "abs, signed"),
    ({"assignment": "lazy"}, "frozen, dynamic"),
    ({"backend": "faiss"}, "torch, sklearn"),
    ({"sample_size": 0}, "sample_size"),
])
def test_bad_hyper_parameters_raise_value_error(kwargs, message):
    p = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=message):
        SGG(torch.optim.AdamW([p]), **kwargs)


def test_unsupported_base_settings_are_rejected():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="capturable"):
        SGG(torch.optim.AdamW([p], capturable=True))
    with pytest.raises(TypeError):
        SGG(SGG(torch.optim.AdamW([p])))


def test_scales_of_all_layers_updated_together_equal_each_layers_own_eq6_and_eq7():
    """The re-clustering updates every layer's scales in one batch; recompute each layer on its own."""
    g = torch.Generator().manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((30, 20), (64, 8), (5, 5))]
    K, beta3, bounds, eps = 3, 0.7, (0.1, 10.0), 1e-8
    opt = SGG(torch.optim.AdamW(params, lr=1e-2), n_clusters=K, recluster_interval=2, beta3=beta3)
    previous = [torch.ones(K) for _ in params]
    for step in range(1, 7):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=g) ** 3 * (1 + i)
        opt.step()
        if step % 2:
            continue
        stats = [opt.state[p]["exp_avg"] for p in params]
        devs = [(x - x.mean()).abs() for x in stats]
        pooled = torch.cat([d.flatten() for d in devs]).sort().values
        global_mda = pooled[(pooled.numel() - 1) // 2]
        assert opt.global_mda == float(global_mda)
        for i, (p, dev) in enumerate(zip(params, devs)):
            ids = opt.cluster_ids(p)
            expected = previous[i].clone()
            for c in range(K):
                members = dev[ids == c].flatten().sort().values
                if members.numel():  # an empty cluster keeps its scale
                    mda = members[(members.numel() - 1) // 2]
                    target = float((global_mda / (mda + eps)).clamp(*bounds))
                    expected[c] = beta3 * previous[i][c] + (1 - beta3) * target
            torch.testing.assert_close(opt.cluster_scales(p), expected, rtol=1e-6, atol=0)
            previous[i] = opt.cluster_scales(p)
    assert not torch.allclose(previous[0], torch.ones(K))
