"""Contract tests for ``--preset paper``: the published prior recipe (models/paper_prior.py) and
its training loop (embedstore/fit_paper.py). Tiny dims; every mechanism has a test that a one-line
mutation breaks."""

from __future__ import annotations

import math

import pytest
import torch
from embedstore.models.heads import LinearHead, ModelConfigError
from embedstore.models.losses import freeze
from embedstore.models.paper_prior import (
    PUBLISHED_NULL_TOKENS,
    PaperPrior,
    PaperPriorConfig,
    WarmupEMA,
    paper_loss,
    select_best_of,
)
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from embedstore.errors import ConfigError
from embedstore.fit import auc_score
from embedstore.fit_paper import PaperTrainConfig, fit_paper_prior, predict_paper_student
from embedstore.testing import surrogate_latents

DX, DC, W = 12, 10, 16
TINY = dict(width=W, layers=2, heads=2)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _prior(null_tokens: int = 0, **kw) -> PaperPrior:
    torch.manual_seed(0)
    return PaperPrior(PaperPriorConfig(cond_dim=DX, target_dim=DC, null_tokens=null_tokens, **{**TINY, **kw}))


def _teacher(dim: int = DC) -> LinearHead:
    torch.manual_seed(1)
    head = LinearHead(dim)
    torch.nn.init.normal_(head.fc.weight, std=1.0)
    return freeze(head)


def _inputs(b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, DC, generator=g), torch.randint(0, 64, (b,), generator=g), torch.randn(b, DX, generator=g)


# ------------------------------------------------------------------------------ config
def test_config_json_round_trip_and_typed_errors():
    cfg = PaperPriorConfig(cond_dim=DX, target_dim=DC, null_tokens=77, normalization="zscore", **TINY)
    assert PaperPriorConfig.from_json(cfg.to_json()) == cfg
    assert cfg.num_tokens == 81
    with pytest.raises(ModelConfigError, match="normalization 'l2'.*minmax"):
        PaperPriorConfig(cond_dim=DX, target_dim=DC, normalization="l2")
    with pytest.raises(ModelConfigError, match="best_of_space='raw' needs cond_dim == target_dim"):
        PaperPriorConfig(cond_dim=DX, target_dim=DC, best_of_space="raw")
    with pytest.raises(ModelConfigError, match="divisible by heads"):
        PaperPriorConfig(cond_dim=DX, target_dim=DC, width=10, heads=4)


def test_train_config_defaults_are_the_published_recipe():
    cfg = PaperTrainConfig()
    assert (cfg.width, cfg.layers, cfg.tokens, cfg.num_train_timesteps) == (512, 12, 4, 64)
    assert (cfg.lr, cfg.weight_decay, cfg.grad_clip, cfg.warmup_steps) == (1.1e-4, 6.02e-2, 0.5, 50)
    assert (cfg.mse_weight, cfg.teacher_weight, cfg.published_nograd) == (0.8, 0.2, False)
    assert (cfg.ema_beta, cfg.normalization, cfg.sample_steps, cfg.sample_best_of) == (0.9999, "minmax", 64, 2)
    assert PaperTrainConfig(tokens=81).prior_config(DX, DC).null_tokens == PUBLISHED_NULL_TOKENS
    with pytest.raises(ConfigError, match="tokens must be 4"):
        PaperTrainConfig(tokens=3)
    with pytest.raises(ConfigError, match="val_steps=5 must divide num_train_timesteps=64"):
        PaperTrainConfig(val_steps=5)
    with pytest.raises(ConfigError, match="select_weights 'best'"):
        PaperTrainConfig(select_weights="best")


# ------------------------------------------------------------------------------ layout and mask
def _block_inputs(prior: PaperPrior, cache_prefix: bool):
    seen = []
    hook = prior.net.blocks[0].register_forward_hook(lambda m, args, out: seen.append((args[0].shape, args[1].shape)))
    x, t, c = _inputs()
    prior.net(x, t, c, cache_prefix=cache_prefix)
    hook.remove()
    return seen


def test_published_layout_has_81_tokens_and_the_variant_4():
    seen = _block_inputs(_prior(PUBLISHED_NULL_TOKENS), cache_prefix=False)
    assert seen == [(torch.Size([3, 81, W]), torch.Size([81, 81]))]
    assert _block_inputs(_prior(0), cache_prefix=True) == [(torch.Size([3, 4, W]), torch.Size([4, 4]))]
    # the cached path: the 77 null tokens once (batch 1), the 4 inputs attending to all 81 keys
    assert _block_inputs(_prior(PUBLISHED_NULL_TOKENS), cache_prefix=True) == [
        (torch.Size([1, 77, W]), torch.Size([77, 77])), (torch.Size([3, 4, W]), torch.Size([4, 81]))]
    x, t, c = _inputs()
    assert _prior(PUBLISHED_NULL_TOKENS).net.sequence(x, t, c).shape == (3, 81, W)


@pytest.mark.parametrize("null_tokens", [0, 5])
def test_causal_mask_a_later_token_never_changes_an_earlier_one(null_tokens):
    net = _prior(null_tokens).net.eval()
    x, t, c = _inputs()
    seq = net.sequence(x, t, c)  # (B, S, W)
    s = seq.shape[1]
    changed = seq.clone()
    changed[:, s - 2] += torch.randn(seq.shape[0], W)  # the noisy-target token (not a constant: LayerNorm removes those)
    a, b = net.encode(seq), net.encode(changed)
    assert torch.equal(a[:, : s - 2], b[:, : s - 2])  # condition, time, null tokens: untouched
    assert not torch.allclose(a[:, s - 1], b[:, s - 1])  # the query sees it


def test_cached_prefix_is_the_same_function_as_the_full_81_tokens():
    prior = _prior(PUBLISHED_NULL_TOKENS).eval()
    x, t, c = _inputs(5)
    full = prior(x, t, c, cache_prefix=False)
    cached = prior(x, t, c, cache_prefix=True)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    # and the gradients, null tokens included
    grads = []
    for cache in (False, True):
        prior.zero_grad()
        prior(x, t, c, cache_prefix=cache).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in prior.net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-4, rtol=1e-4)
    assert float(grads[0]["null"].abs().sum()) > 0


# ------------------------------------------------------------------------------ normalisation
def test_minmax_times_sqrt_d_and_zscore_round_trip():
    g = torch.Generator().manual_seed(0)
    cond, target = torch.randn(50, DX, generator=g) * 3 + 1, torch.randn(50, DC, generator=g) * 2 - 5
    mm = _prior(normalization="minmax")
    mm.fit_normalizers(cond, target)
    z = mm.normalize_target(target)
    torch.testing.assert_close(z.min(0).values, torch.full((DC,), -math.sqrt(DC)))
    torch.testing.assert_close(z.max(0).values, torch.full((DC,), math.sqrt(DC)))
    zc = mm.normalize_cond(cond)
    torch.testing.assert_close(zc.min(0).values, -torch.ones(DX))
    torch.testing.assert_close(zc.max(0).values, torch.ones(DX))
    torch.testing.assert_close(mm.denormalize_target(z), target, atol=1e-5, rtol=1e-5)
    zs = _prior(normalization="zscore")
    zs.fit_normalizers(cond, target)
    z = zs.normalize_target(target)
    torch.testing.assert_close(z.mean(0), torch.zeros(DC), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(DC), atol=1e-5, rtol=0)
    torch.testing.assert_close(zs.denormalize_target(z), target, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ loss
def test_loss_is_0_8_mse_plus_0_2_teacher_bce():
    teacher = _teacher()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, DC, generator=g)
    x0_hat = x0 + 0.5 * torch.randn(8, DC, generator=g)
    loss, parts = paper_loss(x0_hat, x0, teacher)
    mse = ((x0_hat - x0) ** 2).mean()
    p, q = torch.sigmoid(teacher(x0_hat)), torch.sigmoid(teacher(x0))
    bce = -(q * p.log() + (1 - q) * (1 - p).log()).mean()
    torch.testing.assert_close(loss, 0.8 * mse + 0.2 * bce)
    assert abs(parts["teacher_bce"] - float(bce)) < 1e-5 and abs(parts["mse"] - float(mse)) < 1e-6


def _loss_grads(**kw):
    prior = _prior()
    prior.train()
    teacher = _teacher()
    x0, c = torch.randn(16, DC), torch.randn(16, DX)
    x0_hat, _ = prior.training_prediction(x0, c, torch.Generator().manual_seed(3))
    loss, parts = paper_loss(x0_hat, x0, teacher, **kw)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    return {n: p.grad.clone() for n, p in prior.net.named_parameters() if p.grad is not None}, parts


def test_published_nograd_gives_exactly_the_gradients_of_no_teacher_term():
    g_none, _ = _loss_grads(teacher_weight=0.0)
    g_bug, parts = _loss_grads(published_nograd=True)
    g_ours, _ = _loss_grads()
    assert parts["teacher_bce"] > 0  # computed and logged ...
    assert all(torch.equal(g_none[k], g_bug[k]) for k in g_none)  # ... but it trains nothing
    assert max(float((g_none[k] - g_ours[k]).abs().max()) for k in g_none if g_none[k].numel()) > 1e-7


# ------------------------------------------------------------------------------ EMA
def test_ema_follows_the_ema_pytorch_schedule():
    lin = torch.nn.Linear(1, 1, bias=False)
    ema = WarmupEMA(lin, beta=0.9999, after=100, every=10, power=2 / 3)
    assert ema.decay_at(100) == 0.0 and ema.decay_at(110) == pytest.approx(1 - 11 ** (-2 / 3))
    assert ema.decay_at(10**9) == 0.9999
    values = []
    for s in range(121):
        with torch.no_grad():
            lin.weight.fill_(float(s))
        ema.update(lin)
        values.append(float(ema.module.weight))
    assert values[5] == 0.0 and values[10] == 10.0 and values[100] == 100.0  # copy, every 10 steps
    d = 1 - 11 ** (-2 / 3)
    assert values[110] == pytest.approx(d * 100 + (1 - d) * 110, rel=1e-6)
    d2 = 1 - 21 ** (-2 / 3)
    assert values[120] == pytest.approx(d2 * values[110] + (1 - d2) * 120, rel=1e-6)


# ------------------------------------------------------------------------------ sampling
def test_select_best_of_takes_the_highest_score():
    cand = torch.arange(12.0).view(2, 3, 2)
    picked = select_best_of(torch.tensor([[0.1, 0.9, 0.3], [0.5, -1.0, 0.2]]), cand)
    assert torch.equal(picked, torch.stack([cand[0, 1], cand[1, 0]]))


def _fitted_prior(**kw) -> PaperPrior:
    prior = _prior(**kw)
    g = torch.Generator().manual_seed(5)
    prior.fit_normalizers(torch.randn(40, DX, generator=g), torch.randn(40, DC, generator=g) * 2)
    prior.ema.copy_from(prior.net)
    return prior.eval()


def test_best_of_2_picks_the_candidate_closer_to_the_condition():
    prior = _fitted_prior()
    cond = torch.randn(6, DX, generator=torch.Generator().manual_seed(1))
    k = 2
    picked = prior.sample(cond, k, 4, torch.Generator().manual_seed(0), best_of=2)  # (6, 2, Dc)
    # the same noise, without selection: 2K candidates per condition, consecutive pairs
    cand = prior.sample(cond, 2 * k, 4, torch.Generator().manual_seed(0), best_of=1).view(6 * k, 2, DC)
    # "projected": cosine between the prior's condition and target input projections
    with torch.no_grad():
        c_tok = prior.net.cond_in(prior.normalize_cond(cond)).repeat_interleave(k, 0)  # (6K, W)
        x_tok = prior.net.target_in(prior.normalize_target(cand.reshape(-1, DC))).view(6 * k, 2, W)
    scores = F.cosine_similarity(c_tok[:, None], x_tok, dim=-1)  # (6K, 2)
    win = scores.argmax(1)
    assert 0 < int(win.sum()) < 6 * k  # both candidates win somewhere, so the check can fail
    expected = cand[torch.arange(6 * k), win].view(6, k, DC)
    torch.testing.assert_close(picked, expected, atol=1e-5, rtol=1e-5)
    first = _fitted_prior(best_of_space="first").sample(cond, k, 4, torch.Generator().manual_seed(0), best_of=2)
    torch.testing.assert_close(first, cand[:, 0].view(6, k, DC), atol=1e-5, rtol=1e-5)


def test_sample_refuses_steps_that_do_not_divide_T_and_guidance_without_dropout():
    prior = _fitted_prior()
    with pytest.raises(ModelConfigError, match="steps=5 does not divide num_train_timesteps=64"):
        prior.sample(torch.randn(2, DX), steps=5)
    with pytest.raises(ModelConfigError, match="cond_drop_prob > 0"):
        prior.sample(torch.randn(2, DX), steps=4, guidance_scale=2.0)


def test_safetensors_round_trip_reproduces_samples_bit_for_bit(tmp_path):
    prior = _fitted_prior(null_tokens=3)
    with torch.no_grad():  # make EMA and raw weights differ, and select raw
        for p in prior.net.parameters():
            p.add_(0.01)
    prior.selected_ema.fill_(0)
    save_file(prior.state_dict(), tmp_path / "prior.safetensors")
    (tmp_path / "config.json").write_text(prior.config.to_json())
    loaded = PaperPrior(PaperPriorConfig.from_json((tmp_path / "config.json").read_text()))
    loaded.load_state_dict(load_file(tmp_path / "prior.safetensors"))
    cond = torch.randn(4, DX)
    a = prior.sample(cond, 3, 8, torch.Generator().manual_seed(7))
    b = loaded.eval().sample(cond, 3, 8, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # the stored selection is honoured: raw weights, not the EMA copy
    assert torch.equal(a, prior.sample(cond, 3, 8, torch.Generator().manual_seed(7), use_ema=False))
    assert not torch.equal(a, prior.sample(cond, 3, 8, torch.Generator().manual_seed(7), use_ema=True))


# ------------------------------------------------------------------------------ training loop
TINY_TRAIN = PaperTrainConfig(
    width=W, layers=2, heads=2, epochs=4, batch_size=16, eval_every=2, patience=10, val_samples=2,
    val_steps=4, warmup_steps=50, num_threads=1,
)


@pytest.fixture(scope="module")
def data():
    d = surrogate_latents(160, DX, DC, ctpa_signal=4.0, cxr_signal=3.0, seed=0)
    teacher = LinearHead(DC)
    teacher.set_standardizer(d["ctpa"][:96])
    with torch.no_grad():
        teacher.fc.weight.normal_()
    return {"tr": (d["cxr"][:96], d["ctpa"][:96]), "val": (d["cxr"][96:], d["y"][96:]), "teacher": freeze(teacher)}


def _fit(data, cfg=TINY_TRAIN, **kw):
    (cx, ct), (cv, yv) = data["tr"], data["val"]
    return fit_paper_prior(cx, ct, data["teacher"], cv, yv, cfg, **kw)


def test_fit_warm_up_and_gradient_clip_are_applied(data):
    rows = []
    res = _fit(data, on_step=rows.append)
    assert len(rows) == 4 * 6 == res.extra["steps"]
    for r in rows:
        assert r["lr"] == pytest.approx(1.1e-4 * min(1.0, (r["step"] + 1) / 50))
        assert r["grad_norm_clipped"] <= 0.5 + 1e-4
    assert max(r["grad_norm"] for r in rows) > 1.0  # clipping had something to do


def test_fit_published_nograd_trains_exactly_as_without_the_teacher_term(data):
    one = TINY_TRAIN.replace(epochs=1, eval_every=1)
    bug = _fit(data, one.replace(published_nograd=True)).model.net.state_dict()
    none = _fit(data, one.replace(teacher_weight=0.0)).model.net.state_dict()
    ours = _fit(data, one).model.net.state_dict()
    assert all(torch.equal(bug[k], none[k]) for k in bug)
    assert not all(torch.equal(ours[k], none[k]) for k in ours)


def test_fit_normalisation_comes_from_training_pairs_only(data):
    (cx, ct), (cv, yv) = data["tr"], data["val"]
    res = fit_paper_prior(cx, ct, data["teacher"], cv * 10, yv, TINY_TRAIN.replace(epochs=1, eval_every=1))
    ref = _prior()
    ref.fit_normalizers(cx, ct)
    assert torch.equal(res.model.cond_shift, ref.cond_shift) and torch.equal(res.model.cond_scale, ref.cond_scale)
    assert torch.equal(res.model.target_scale, ref.target_scale)


def test_fit_is_deterministic_and_selects_on_validation(data):
    a, b = _fit(data), _fit(data)
    assert a.history == [{**r, "seconds": a.history[i]["seconds"]} for i, r in enumerate(b.history)]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # both weight sets were scored; the kept one is the best score of the run
    scores = [(r[f"val_auc_{w}"], w) for r in a.history if r["val_auc"] is not None for w in ("ema", "raw")]
    assert a.val_auc == max(s for s, _ in scores)
    assert a.extra["selected_weights"] in ("ema", "raw")
    assert bool(a.model.selected_ema) == (a.extra["selected_weights"] == "ema")
    cv, yv = data["val"]
    p1, s1, e1 = predict_paper_student(a.model, data["teacher"], cv, 2, 4, 1, seed=0, num_threads=1)
    p2, _, _ = predict_paper_student(a.model, data["teacher"], cv, 2, 4, 1, seed=0, num_threads=1)
    assert torch.equal(p1, p2) and p1.shape == s1.shape == (64,) and e1.shape == (64, DC)
    assert bool((s1 >= 0).all())
    # the selection replays: the kept weights score the recorded validation AUC
    assert auc_score(p1, yv) == pytest.approx(a.val_auc)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_paper_prior_on_cuda_with_bf16(data):
    (cx, ct), (cv, yv) = data["tr"], data["val"]
    for tokens in (4, 81):
        res = fit_paper_prior(cx, ct, data["teacher"], cv, yv,
                              TINY_TRAIN.replace(device="cuda", amp_bf16=True, tokens=tokens, epochs=2))
        assert next(res.model.parameters()).device.type == "cuda"
        mean, std, _ = predict_paper_student(res.model, data["teacher"], cv, 2, 8, 2, amp_bf16=True)
        assert torch.isfinite(mean).all() and bool((std >= 0).all())
