"""Contract tests for the pure-torch heads, diffusion prior, loss and baselines."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from embedstore.models.baselines import RidgeRegression
from embedstore.models.errors import ModelError
from embedstore.models.heads import (
    HEAD_KINDS,
    HeadConfig,
    LinearHead,
    MLPHead,
    ModelConfigError,
    create_head,
)
from embedstore.models.losses import freeze, prior_loss
from embedstore.models.prior import (
    EMA,
    PREDICTION_TYPES,
    PRIOR_ARCHS,
    SCHEDULER_KINDS,
    DiffusionPrior,
    PriorConfig,
)
from safetensors.torch import load_file, save_file

DX, DC = 12, 10


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: OpenMP threads only spin on the shared 2-core machines
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _prior(**kw) -> DiffusionPrior:
    torch.manual_seed(0)
    base = dict(cond_dim=DX, target_dim=DC, hidden=32, depth=2, time_embed_dim=16, heads=4, dropout=0.0)
    return DiffusionPrior(PriorConfig(**{**base, **kw}))


def _teacher(dim: int = DC) -> LinearHead:
    torch.manual_seed(1)
    head = LinearHead(dim)
    torch.nn.init.normal_(head.fc.weight, std=1.0)
    return freeze(head)


# ------------------------------------------------------------------------------ heads
@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_head_config_json_round_trip_and_create(kind):
    cfg = HeadConfig(dim=7, kind=kind, hidden=5, dropout=0.2)
    again = HeadConfig.from_json(cfg.to_json())
    assert again == cfg
    head = create_head(again)
    assert head.config == cfg
    assert head(torch.randn(3, 7)).shape == (3,)


def test_head_config_refuses_bad_values_by_name():
    with pytest.raises(ModelConfigError, match="'svm'"):
        HeadConfig(dim=4, kind="svm")  # type: ignore[arg-type]
    with pytest.raises(ModelConfigError, match="extra"):
        HeadConfig.from_dict({"dim": 4, "extra": 1})
    with pytest.raises(ValueError):  # ModelConfigError is also a ValueError
        HeadConfig(dim=0)
    assert issubclass(ModelConfigError, ModelError)


def test_head_standardizer_is_stored_and_used():
    x = torch.randn(50, 6) * 5 + 3
    head = MLPHead(6, hidden=8, dropout=0.0).eval()
    head.set_standardizer(x)
    torch.testing.assert_close(head.mean, x.mean(0))
    torch.testing.assert_close(head.std, x.std(0))
    # standardisation makes the head invariant to an affine change of units once refitted
    out = head(x)
    head.set_standardizer(x * 2 + 1)
    torch.testing.assert_close(head(x * 2 + 1), out, rtol=1e-4, atol=1e-4)
    with pytest.raises(ModelConfigError, match=r"\(B, 6\)"):
        head(torch.randn(2, 5))


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_head_safetensors_round_trip(tmp_path, kind):
    head = create_head(HeadConfig(dim=6, kind=kind, hidden=8)).eval()
    head.set_standardizer(torch.randn(20, 6) + 4)
    save_file(head.state_dict(), tmp_path / "w.safetensors")
    clone = create_head(HeadConfig.from_json(head.config.to_json())).eval()
    clone.load_state_dict(load_file(tmp_path / "w.safetensors"))
    x = torch.randn(4, 6)
    assert torch.equal(clone(x), head(x))


# ------------------------------------------------------------------------------ prior config
def test_prior_config_json_round_trip_and_validation():
    cfg = PriorConfig(cond_dim=3, target_dim=4, arch="transformer", hidden=16, heads=4, prediction="v_prediction")
    assert PriorConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ModelConfigError, match="'x0'"):
        PriorConfig(cond_dim=3, target_dim=4, prediction="x0")  # type: ignore[arg-type]
    with pytest.raises(ModelConfigError, match="divisible"):
        PriorConfig(cond_dim=3, target_dim=4, arch="transformer", hidden=10, heads=4)
    with pytest.raises(ModelConfigError, match="ema_decay"):
        PriorConfig(cond_dim=3, target_dim=4, ema_decay=1.0)


# ------------------------------------------------------------------------------ schedulers
@pytest.mark.parametrize("prediction", PREDICTION_TYPES)
def test_schedulers_never_clip_or_threshold(prediction):
    prior = _prior(prediction=prediction)
    ddpm, ddim = prior.make_scheduler("ddpm"), prior.make_scheduler("ddim")
    assert isinstance(ddpm, DDPMScheduler) and isinstance(ddim, DDIMScheduler)
    for s in (ddpm, ddim):
        assert s.config.clip_sample is False
        assert s.config.thresholding is False
        assert s.config.prediction_type == prediction
        assert s.config.timestep_spacing == "trailing"
    assert ddim.config.set_alpha_to_one is True
    with pytest.raises(ModelConfigError, match="'euler'"):
        prior.make_scheduler("euler")


@pytest.mark.parametrize("scheduler", SCHEDULER_KINDS)
def test_sampling_keeps_values_outside_unit_interval(scheduler):
    # a denoiser that always predicts x0 = 3 (standardised units): the sampler must end at 3,
    # where clip_sample=True would have clipped every step's x0 to 1
    prior = _prior(prediction="sample")
    for net in (prior.denoiser, prior.ema.module):
        with torch.no_grad():
            net.out.bias.fill_(3.0)
    out = prior.sample(torch.randn(4, DX), num_samples=3, steps=10, scheduler=scheduler,
                       generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, DC)
    torch.testing.assert_close(out, torch.full_like(out, 3.0), atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------ conversions
def test_x0_eps_v_conversions_for_known_noise():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, DC, generator=g) * 2  # beyond [-1, 1] on purpose
    noise = torch.randn(6, DC, generator=g)
    t = torch.tensor([0, 10, 250, 500, 750, 900])
    sched = _prior().make_scheduler("ddpm")
    x_t = sched.add_noise(x0, noise, t)
    assert _prior(prediction="sample").to_x0(x0, x_t, t) is x0
    torch.testing.assert_close(_prior(prediction="epsilon").to_x0(noise, x_t, t), x0, atol=1e-3, rtol=1e-3)
    v = sched.get_velocity(x0, noise, t)
    torch.testing.assert_close(_prior(prediction="v_prediction").to_x0(v, x_t, t), x0, atol=1e-4, rtol=1e-4)
    # and a wrong noise gives a wrong x0 (the check can fail)
    assert not torch.allclose(_prior(prediction="epsilon").to_x0(noise * 0, x_t, t), x0, atol=1e-2)


def test_epsilon_loss_weight_is_min_snr_and_bounded():
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(_prior(prediction="sample").loss_weight(t), torch.ones(3))
    w = _prior(prediction="epsilon").loss_weight(t)
    assert w[0] == 1.0 and 0 < w[2] < 1e-6 and w[1] < 1.0


# ------------------------------------------------------------------------------ loss
def _loss_grads(lam: float, teacher: torch.nn.Module):
    prior = _prior()
    prior.train()
    x0, cond = torch.randn(16, DC), torch.randn(16, DX)
    x0_hat, _ = prior.training_prediction(x0, cond, torch.Generator().manual_seed(3))
    loss, parts = prior_loss(x0_hat, x0, teacher, lam)
    loss.backward()
    return {n: p.grad.clone() for n, p in prior.denoiser.named_parameters() if p.grad is not None}, parts


def test_teacher_term_changes_prior_gradients_and_teacher_gets_none():
    teacher = _teacher()
    # with zero-initialised output layers only `out` would get gradient; give it weights
    g0, p0 = _loss_grads(0.0, teacher)
    g1, p1 = _loss_grads(1.0, teacher)
    assert "teacher_bce" in p1 and "teacher_bce" not in p0
    assert p0["mse"] == p1["mse"]  # same noise, same prediction: only the teacher term differs
    diff = max(float((g0[k] - g1[k]).abs().max()) for k in g0)
    assert diff > 1e-6, "the teacher term did not reach the prior's parameters"
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())


def test_teacher_under_no_grad_would_not_train_the_prior():
    # the published bug, reproduced: a teacher evaluated under no_grad leaves gradients unchanged
    teacher = _teacher()

    def no_grad_teacher(z):
        with torch.no_grad():
            return teacher(z)

    g0, _ = _loss_grads(0.0, teacher)
    g_bug, parts = _loss_grads(1.0, no_grad_teacher)
    assert parts["teacher_bce"] > 0  # the term is computed and logged ...
    assert all(torch.equal(g0[k], g_bug[k]) for k in g0)  # ... but adds nothing to the gradient


def test_prior_loss_label_term_and_errors():
    teacher = _teacher()
    x0 = torch.randn(8, DC)
    x0_hat = (x0 + 0.1 * torch.randn(8, DC)).requires_grad_(True)
    labels = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0.0])
    mask = torch.tensor([True, True, False, False, False, False, False, False])
    loss, parts = prior_loss(x0_hat, x0, teacher, 0.5, labels=labels, label_mask=mask, mu=2.0)
    expected_label = torch.nn.functional.binary_cross_entropy_with_logits(teacher(x0_hat[:2]), labels[:2]).detach()
    assert abs(parts["label_bce"] - float(expected_label)) < 1e-5
    assert abs(parts["loss"] - (parts["mse"] + 0.5 * parts["teacher_bce"] + 2.0 * parts["label_bce"])) < 1e-5
    _, parts_none = prior_loss(x0_hat, x0, teacher, 0.0, labels=labels, label_mask=mask & False, mu=1.0)
    assert parts_none["label_bce"] == 0.0
    with pytest.raises(ModelConfigError, match="mu > 0"):
        prior_loss(x0_hat, x0, teacher, 0.0, mu=1.0)
    with pytest.raises(ModelConfigError, match="same"):
        prior_loss(x0_hat[:3], x0, teacher, 1.0)


# ------------------------------------------------------------------------------ prior
@pytest.mark.parametrize("arch", PRIOR_ARCHS)
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_sample_shape_and_raw_units(arch, guidance):
    prior = _prior(arch=arch)
    prior.set_standardizers(torch.randn(30, DX), torch.randn(30, DC) * 4 + 100)
    out = prior.sample(torch.randn(5, DX), num_samples=4, steps=5, guidance_scale=guidance,
                       generator=torch.Generator().manual_seed(0))
    assert out.shape == (5, 4, DC)
    assert torch.isfinite(out).all()
    assert 50 < float(out.mean()) < 150  # unstandardised back to the target's units
    with pytest.raises(ModelConfigError, match=r"\(B, 12\)"):
        prior.sample(torch.randn(5, DX + 1))


@pytest.mark.parametrize("arch", PRIOR_ARCHS)
def test_prior_safetensors_round_trip_gives_identical_samples(tmp_path, arch):
    prior = _prior(arch=arch, prediction="v_prediction")
    prior.set_standardizers(torch.randn(30, DX), torch.randn(30, DC) * 3)
    opt = torch.optim.AdamW(prior.denoiser.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x0, cond = torch.randn(16, DC), torch.randn(16, DX)
    for _ in range(3):  # a few steps so the EMA and live weights differ from init and each other
        x0_hat, _ = prior.training_prediction(x0, cond, g)
        loss, _ = prior_loss(x0_hat, x0, _teacher(), 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        prior.ema.update(prior.denoiser)
    save_file(prior.state_dict(), tmp_path / "prior.safetensors")
    (tmp_path / "config.json").write_text(prior.config.to_json())

    clone = DiffusionPrior(PriorConfig.from_json((tmp_path / "config.json").read_text()))
    clone.load_state_dict(load_file(tmp_path / "prior.safetensors"))
    c = torch.randn(3, DX)
    for use_ema in (True, False):
        a = prior.sample(c, 2, 5, generator=torch.Generator().manual_seed(7), use_ema=use_ema)
        b = clone.sample(c, 2, 5, generator=torch.Generator().manual_seed(7), use_ema=use_ema)
        assert torch.equal(a, b)
    ema_vs_live = prior.sample(c, 2, 5, generator=torch.Generator().manual_seed(7), use_ema=False)
    assert not torch.equal(ema_vs_live, prior.sample(c, 2, 5, generator=torch.Generator().manual_seed(7)))


def test_condition_dropout_only_in_training_mode():
    prior = _prior(cond_drop_prob=0.5)
    with torch.no_grad():
        prior.denoiser.null_cond.fill_(5.0)  # makes a dropped condition visible in the output
        prior.denoiser.out.weight.normal_()
    x0, cond = torch.randn(64, DC), torch.randn(64, DX)
    prior.eval()
    a, ta = prior.training_prediction(x0, cond, torch.Generator().manual_seed(1))
    a2, _ = prior.training_prediction(x0, cond, torch.Generator().manual_seed(1))
    assert torch.equal(a, a2)
    prior.train()
    b, tb = prior.training_prediction(x0, cond, torch.Generator().manual_seed(1))
    assert torch.equal(ta, tb)  # same noise and timesteps: only the dropped rows differ
    same = (a == b).all(dim=1)  # (64,)
    assert 10 < int((~same).sum()) < 54


def test_ema_update_and_mode():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
    ema = EMA(net, decay=0.9)
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    for _ in range(50):
        ema.update(net)
    after = ema.module[0].weight
    assert not torch.equal(after, before)
    w = net[0].weight.detach()
    assert float((after - w).abs().max()) < float((before - w).abs().max())
    ema.train()
    assert not ema.module.training  # the average is inference-only
    assert all(not p.requires_grad for p in ema.module.parameters())


# ------------------------------------------------------------------------------ baselines
def test_ridge_recovers_linear_map_primal_and_dual():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, generator=g)
    for n in (40, 4):  # N > D uses the primal solve, N < D the dual
        x = torch.randn(n, 6, generator=g)
        y = x @ w + 2.0
        model = RidgeRegression(6, 3, alpha=1e-8, squeeze=False).fit(x, y)
        if n > 6:
            torch.testing.assert_close(model(x), y, atol=1e-4, rtol=1e-4)
        else:  # underdetermined: still interpolates the training points
            torch.testing.assert_close(model(x), y, atol=1e-3, rtol=1e-3)
    big = RidgeRegression(6, 1, alpha=1e9).fit(x, x[:, 0])
    torch.testing.assert_close(big(x), torch.full((x.shape[0],), float(x[:, 0].mean())), atol=1e-3, rtol=0)


def test_ridge_matches_sklearn_on_standardised_inputs():
    sklearn_linear = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 8, generator=g) * 3 + 1
    y = torch.randn(50, generator=g)
    ours = RidgeRegression(8, 1, alpha=5.0).fit(x, y)
    xs = ((x - x.mean(0)) / x.std(0)).double().numpy()
    ref = sklearn_linear.Ridge(alpha=5.0).fit(xs, y.double().numpy())
    torch.testing.assert_close(ours.weight[:, 0].double(), torch.from_numpy(ref.coef_), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------ layering
def test_models_modules_do_not_import_embedstore_outside_models():
    root = pathlib.Path(__file__).resolve().parents[1] / "models"
    for name in ("heads.py", "prior.py", "losses.py", "baselines.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module
            elif isinstance(node, ast.Import):
                mod = node.names[0].name
            else:
                continue
            if mod.startswith("embedstore"):
                assert mod.startswith("embedstore.models"), f"{name} imports {mod}"


# ------------------------------------------------------------------------------ ridge mean
def test_ridge_mean_is_fitted_and_the_sampler_runs_around_it():
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(DX, DC, generator=g)
    c_tr = torch.randn(400, DX, generator=g) * 3 + 1
    y_tr = c_tr @ w_true + 0.05 * torch.randn(400, DC, generator=g) + 5
    c_new = torch.randn(6, DX, generator=g) * 3 + 1
    ridge = _prior(prediction="sample", mean_model="ridge")
    ridge.set_standardizers(c_tr, y_tr)
    assert 0 < float(ridge.mean_alpha) < 1e5
    # an untrained x0-predicting denoiser outputs 0: every sample is exactly the ridge mean
    out = ridge.sample(c_new, num_samples=2, steps=5, generator=torch.Generator().manual_seed(1))
    expected = c_new @ w_true + 5  # (6, DC)
    torch.testing.assert_close(out[:, 0], out[:, 1])
    assert torch.corrcoef(torch.stack([out[:, 0].flatten(), expected.flatten()]))[0, 1] > 0.99
    plain = _prior(prediction="sample", mean_model="none")
    plain.set_standardizers(c_tr, y_tr)
    flat = plain.sample(c_new, num_samples=1, steps=5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(flat[:, 0], plain.target_mean.expand(6, DC))  # no mean model
    with pytest.raises(ModelError, match="mean_model"):
        PriorConfig(cond_dim=DX, target_dim=DC, mean_model="lasso")


# ------------------------------------------------------------------------------ ridge path
def _direct_ridge(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    xc, yc = x - x.mean(0), y - y.mean(0)
    return torch.linalg.solve(xc.T @ xc + alpha * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ yc)


@pytest.mark.parametrize("n", [40, 7])  # N > Dx (primal) and N < Dx (rank-deficient Gram)
def test_ridge_path_weights_equal_a_direct_solve_at_every_penalty(n):
    from embedstore.models.baselines import RidgePath

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 9, generator=g, dtype=torch.float64) * 3 + 2
    y = x @ torch.randn(9, 3, generator=g, dtype=torch.float64) + torch.randn(n, 3, generator=g, dtype=torch.float64)
    path = RidgePath(x, y, chunk_rows=5)  # several chunks: the one-pass sums must add up
    for alpha in (0.01, 1.0, 30.0):
        torch.testing.assert_close(path.weight(alpha), _direct_ridge(x, y, alpha))
        w = path.weight(alpha)
        pred = x @ w + path.intercept(w)  # uncentred inputs + intercept
        torch.testing.assert_close(pred, (x - x.mean(0)) @ w + y.mean(0))
        rss = float(((y - pred) ** 2).sum())
        assert path.rss(alpha) == pytest.approx(rss, rel=1e-9)


def test_ridge_path_gcv_matches_the_svd_formula():
    from embedstore.models.baselines import RidgePath

    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 8, generator=g, dtype=torch.float64)
    x = x - x.mean(0)
    y = x[:, :2] * 2 + torch.randn(60, 2, generator=g, dtype=torch.float64)
    y = y - y.mean(0)
    u, sv, _ = torch.linalg.svd(x, full_matrices=False)
    path = RidgePath(x, y)
    for alpha in (0.1, 3.0, 100.0):
        shrink = sv**2 / (sv**2 + alpha)
        resid = y - u @ (shrink[:, None] * (u.T @ y))
        gcv = float((resid**2).sum()) / (60 * (1 - float(shrink.sum()) / 60) ** 2)
        assert path.gcv(alpha) == pytest.approx(gcv, rel=1e-9)
        assert path.df(alpha) == pytest.approx(float(shrink.sum()), rel=1e-9)


def test_ridge_regression_fit_path_equals_one_fit_per_penalty():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(50, 6, generator=g) * 4, torch.randn(50, 2, generator=g)
    alphas = [0.1, 1.0, 10.0]
    for a, m in zip(alphas, RidgeRegression.fit_path(x, y, alphas, squeeze=False), strict=True):
        one = RidgeRegression(6, 2, alpha=a, squeeze=False).fit(x, y)
        torch.testing.assert_close(m(x), one(x))
        assert m.alpha == a
    # and the fit is the standardised ridge (same as a direct solve on z-scored inputs)
    xs = (x.double() - x.double().mean(0)) / x.double().std(0)
    w = _direct_ridge(xs, y.double(), 1.0)
    torch.testing.assert_close(RidgeRegression(6, 2, alpha=1.0, squeeze=False).fit(x, y).weight.double(), w,
                               atol=1e-5, rtol=1e-5)


def test_prior_ridge_mean_takes_the_gcv_minimum():
    from embedstore.models.baselines import RidgePath
    from embedstore.models.prior import RIDGE_ALPHAS

    prior = _prior()
    g = torch.Generator().manual_seed(3)
    c = torch.randn(80, DX, generator=g)
    x = c @ torch.randn(DX, DC, generator=g) * 0.3 + torch.randn(80, DC, generator=g)
    prior.set_standardizers(c, x)
    cs, xs = prior.standardize_cond(c), prior.standardize_target(x)
    path = RidgePath(cs, xs)
    scores = [path.gcv(a) for a in RIDGE_ALPHAS]
    best = RIDGE_ALPHAS[scores.index(min(scores))]
    assert RIDGE_ALPHAS[0] < best < RIDGE_ALPHAS[-1]  # an interior optimum: the search matters
    assert float(prior.mean_alpha) == pytest.approx(best)
    torch.testing.assert_close(prior.mean_weight.double(), _direct_ridge(cs.double(), xs.double(), best),
                               atol=1e-5, rtol=1e-4)
