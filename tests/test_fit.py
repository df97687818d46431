"""Training loops on in-memory tensors (embedstore.fit): selection, determinism, API shape."""

from __future__ import annotations

import inspect

import pytest
import torch
from embedstore.models.heads import LinearHead
from embedstore.models.prior import DiffusionPrior

from embedstore import fit as fit_mod
from embedstore.errors import ConfigError
from embedstore.fit import (
    ClassifierTrainConfig,
    PriorTrainConfig,
    RidgeTrainConfig,
    auc_score,
    fit_classifier,
    fit_prior,
    fit_ridge_embed,
    fit_ridge_logit,
    predict_embed_student,
    predict_ridge_logit,
    predict_student,
)
from embedstore.testing import surrogate_latents

D = 16
TINY_PRIOR = PriorTrainConfig(
    hidden=32, depth=1, time_embed_dim=16, epochs=4, eval_every=2, val_samples=2, val_steps=3,
    batch_size=32,
)


@pytest.fixture(scope="module")
def data():
    d = surrogate_latents(240, D, D, latent_dim=4, cxr_signal=2.0, ctpa_signal=4.0, seed=0)
    split = {"tr": slice(0, 160), "val": slice(160, 240)}
    return {k: {m: d[m][s] for m in ("cxr", "ctpa", "y")} for k, s in split.items()}


@pytest.fixture(scope="module")
def teacher(data):
    tr, val = data["tr"], data["val"]
    return fit_classifier(tr["ctpa"], tr["y"], val["ctpa"], val["y"], ClassifierTrainConfig(epochs=40)).model


# ------------------------------------------------------------------------------ helpers
def test_auc_score_known_values_and_ties():
    assert auc_score(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert auc_score(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([0, 0, 1, 1])) == 0.0
    assert auc_score(torch.tensor([0.5, 0.5, 0.5, 0.5]), torch.tensor([0, 1, 0, 1])) == 0.5
    assert auc_score(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert auc_score(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])) != auc_score(
        torch.tensor([0.1, 0.2]), torch.tensor([1, 1])
    )  # NaN when a class is absent


def test_fit_api_has_no_test_split_argument():
    for name in fit_mod.__all__:
        obj = getattr(fit_mod, name)
        if inspect.isfunction(obj) and name.startswith("fit_"):
            params = inspect.signature(obj).parameters
            assert not [p for p in params if "test" in p.lower()], f"{name} takes a test split"
            assert any("val" in p for p in params), f"{name} has no validation input"


@pytest.mark.parametrize("cls", [ClassifierTrainConfig, PriorTrainConfig, RidgeTrainConfig])
def test_train_configs_json_round_trip_and_refuse_unknown(cls):
    cfg = cls()
    assert cls.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="'epoch_count'"):
        cls.from_dict({"epoch_count": 3})


def test_config_errors_name_the_bad_value():
    with pytest.raises(ConfigError, match="'gbm'"):
        ClassifierTrainConfig(kind="gbm")
    with pytest.raises(ConfigError, match="'x0'"):
        PriorTrainConfig(prediction="x0")
    with pytest.raises(ConfigError, match="-1"):
        PriorTrainConfig(lam=-1.0)
    assert PriorTrainConfig().replace(lam=0.5).lam == 0.5


# ------------------------------------------------------------------------------ classifier
def test_fit_classifier_selects_on_validation_and_reports(data):
    tr, val = data["tr"], data["val"]
    rows = []
    res = fit_classifier(tr["ctpa"], tr["y"], val["ctpa"], val["y"],
                         ClassifierTrainConfig(epochs=60, patience=5), on_epoch=rows.append)
    assert rows == res.history and len(rows) <= 60
    aucs = [r["val_auc"] for r in res.history]
    assert res.val_auc == max(aucs)
    assert res.history[res.best_epoch]["val_auc"] == res.val_auc
    assert res.val_auc > 0.85  # CTPA carries a strong label signal in the surrogate
    with torch.no_grad():
        assert auc_score(res.model(val["ctpa"]), val["y"]) == pytest.approx(res.val_auc)
    assert {"epoch", "epochs", "train_loss", "val_auc", "seconds"} <= set(rows[0])
    if len(rows) < 60:  # stopped early: exactly `patience` evaluations after the best one
        assert len(rows) - 1 - res.best_epoch == 5


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_fit_classifier_is_deterministic_and_leaves_global_state(data, kind):
    tr, val = data["tr"], data["val"]
    cfg = ClassifierTrainConfig(kind=kind, epochs=5, hidden=8)
    rng_before, threads_before = torch.random.get_rng_state(), torch.get_num_threads()
    a = fit_classifier(tr["cxr"], tr["y"], val["cxr"], val["y"], cfg)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert torch.get_num_threads() == threads_before
    b = fit_classifier(tr["cxr"], tr["y"], val["cxr"], val["y"], cfg)
    c = fit_classifier(tr["cxr"], tr["y"], val["cxr"], val["y"], cfg.replace(seed=1))
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]


def test_fit_classifier_refuses_bad_inputs(data):
    tr, val = data["tr"], data["val"]
    with pytest.raises(ConfigError, match="single class"):
        fit_classifier(tr["cxr"], tr["y"], val["cxr"], torch.zeros_like(val["y"]))
    with pytest.raises(ConfigError, match="0/1"):
        fit_classifier(tr["cxr"], tr["y"] * 2, val["cxr"], val["y"])
    with pytest.raises(ConfigError, match="NaN"):
        fit_classifier(tr["cxr"] * float("nan"), tr["y"], val["cxr"], val["y"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            fit_classifier(tr["cxr"], tr["y"], val["cxr"], val["y"], ClassifierTrainConfig(device="cuda"))


# ------------------------------------------------------------------------------ prior
def test_fit_prior_is_deterministic_and_keeps_callers_teacher(data, teacher):
    tr, val = data["tr"], data["val"]
    flags = [p.requires_grad for p in teacher.parameters()]
    teacher.train()
    a = fit_prior(tr["cxr"], tr["ctpa"], teacher, val["cxr"], val["y"], TINY_PRIOR)
    b = fit_prior(tr["cxr"], tr["ctpa"], teacher, val["cxr"], val["y"], TINY_PRIOR)
    assert [p.requires_grad for p in teacher.parameters()] == flags and teacher.training
    assert isinstance(a.model, DiffusionPrior)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.history == [dict(r, seconds=ra["seconds"]) for r, ra in zip(b.history, a.history, strict=True)]
    assert {"train_mse", "train_teacher_bce", "train_loss"} <= set(a.history[0])
    evaluated = [r for r in a.history if r["val_auc"] is not None]
    assert [r["epoch"] for r in evaluated] == [1, 3]  # every eval_every epochs, and the last
    assert a.val_auc == max(r["val_auc"] for r in evaluated)
    c = fit_prior(tr["cxr"], tr["ctpa"], teacher, val["cxr"], val["y"], TINY_PRIOR.replace(seed=5))
    assert not torch.equal(sa["denoiser.out.weight"], c.model.state_dict()["denoiser.out.weight"])


def test_fit_prior_lambda_changes_training(data, teacher):
    tr, val = data["tr"], data["val"]
    cfg = TINY_PRIOR.replace(epochs=2, eval_every=2)
    a = fit_prior(tr["cxr"], tr["ctpa"], teacher, val["cxr"], val["y"], cfg.replace(lam=0.0))
    b = fit_prior(tr["cxr"], tr["ctpa"], teacher, val["cxr"], val["y"], cfg.replace(lam=2.0))
    assert "train_teacher_bce" not in a.history[0] and "train_teacher_bce" in b.history[0]
    assert not torch.equal(a.model.denoiser.out.weight, b.model.denoiser.out.weight)


def test_fit_prior_label_term_needs_labels(data, teacher):
    tr, val = data["tr"], data["val"]
    cfg = TINY_PRIOR.replace(epochs=2, eval_every=2, mu=1.0)
    with pytest.raises(ConfigError, match="labels_tr"):
        fit_prior(tr["cxr"], tr["ctpa"], teacher, val["cxr"], val["y"], cfg)
    mask = torch.arange(tr["y"].shape[0]) % 4 == 0  # 25 % labelled
    res = fit_prior(tr["cxr"], tr["ctpa"], teacher, val["cxr"], val["y"], cfg,
                    labels_tr=tr["y"], label_mask_tr=mask)
    assert res.history[0]["train_label_bce"] > 0
    with pytest.raises(ConfigError, match="rows"):
        fit_prior(tr["cxr"][:10], tr["ctpa"], teacher, val["cxr"], val["y"], TINY_PRIOR)


def test_predict_student_shapes_uncertainty_and_determinism(data, teacher):
    tr, val = data["tr"], data["val"]
    prior = fit_prior(tr["cxr"], tr["ctpa"], teacher, val["cxr"], val["y"], TINY_PRIOR.replace(epochs=2)).model
    mean, std, emb = predict_student(prior, teacher, val["cxr"], num_samples=4, steps=3, batch_size=16)
    n = val["cxr"].shape[0]
    assert mean.shape == (n,) and std.shape == (n,) and emb.shape == (n, D)
    assert bool((std >= 0).all()) and float(std.max()) > 0
    assert bool(((mean >= 0) & (mean <= 1)).all())
    again = predict_student(prior, teacher, val["cxr"], num_samples=4, steps=3, batch_size=16)
    assert torch.equal(again[0], mean) and torch.equal(again[1], std)  # seeded
    other = predict_student(prior, teacher, val["cxr"], num_samples=4, steps=3, batch_size=16, seed=1)
    assert not torch.equal(other[0], mean)
    one = predict_student(prior, teacher, val["cxr"][:5], num_samples=1, steps=3)
    assert torch.equal(one[1], torch.zeros(5))  # a single sample has no spread


# ------------------------------------------------------------------------------ baselines
def test_ridge_baselines_select_alpha_on_validation(data, teacher):
    tr, val = data["tr"], data["val"]
    cfg = RidgeTrainConfig(alphas=(0.1, 10.0, 1e6))
    rl = fit_ridge_logit(tr["cxr"], tr["ctpa"], teacher, val["cxr"], val["y"], cfg)
    re = fit_ridge_embed(tr["cxr"], tr["ctpa"], teacher, val["cxr"], val["y"], cfg)
    assert [h["alpha"] for h in rl.history] == [0.1, 10.0, 1e6]
    assert rl.val_auc == max(h["val_auc"] for h in rl.history) > 0.6
    assert rl.extra["alpha"] == cfg.alphas[rl.best_epoch]
    # ridge is linear in its targets and the teacher is linear: both routes give the same scores
    if rl.extra["alpha"] == re.extra["alpha"]:
        torch.testing.assert_close(
            predict_ridge_logit(rl.model, val["cxr"]), predict_embed_student(re.model, teacher, val["cxr"]),
            atol=1e-4, rtol=1e-4,
        )


# ------------------------------------------------------------------------------ science
@pytest.mark.slow
def test_student_beats_chance_on_surrogate_cohort():
    d = surrogate_latents(1000, 128, 128, latent_dim=8, cxr_signal=1.5, ctpa_signal=3.0, seed=3)
    tr, val, te = slice(0, 600), slice(600, 800), slice(800, 1000)
    lab = torch.arange(150)  # 25 % of the training patients labelled
    teacher = fit_classifier(d["ctpa"][lab], d["y"][lab], d["ctpa"][val], d["y"][val]).model
    cfg = PriorTrainConfig(hidden=128, epochs=30, eval_every=3, val_samples=8, val_steps=8)
    res = fit_prior(d["cxr"][tr], d["ctpa"][tr], teacher, d["cxr"][val], d["y"][val], cfg)
    prob, std, _ = predict_student(res.model, teacher, d["cxr"][te], num_samples=8, steps=8)
    student = auc_score(prob, d["y"][te])
    with torch.no_grad():
        teacher_auc = auc_score(teacher(d["ctpa"][te]), d["y"][te])
    assert student > 0.62, student
    assert teacher_auc > student
    assert float(std.mean()) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_prior_on_cuda_with_bf16(data):
    tr, val = data["tr"], data["val"]
    teacher = LinearHead(D)
    teacher.set_standardizer(tr["ctpa"])
    res = fit_prior(tr["cxr"], tr["ctpa"], teacher, val["cxr"], val["y"],
                    TINY_PRIOR.replace(device="cuda", amp_bf16=True))
    assert next(res.model.parameters()).device.type == "cuda"
    mean, std, _ = predict_student(res.model, teacher, val["cxr"], num_samples=2, steps=3)
    assert torch.isfinite(mean).all() and bool((std >= 0).all())


@pytest.mark.parametrize(("train_cls", "model_cls"), [(PriorTrainConfig, "PriorConfig"),
                                                      (ClassifierTrainConfig, "HeadConfig")])
def test_trainer_and_model_configs_share_defaults(train_cls, model_cls):
    """A field declared both in a training config and in the model config it builds has one default:
    library users of the model config get what `embedstore train` trains (no drift)."""
    import dataclasses

    from embedstore.models import heads, prior

    mcls = getattr(prior, model_cls, None) or getattr(heads, model_cls)
    tdef = {f.name: f.default for f in dataclasses.fields(train_cls)}
    mdef = {f.name: f.default for f in dataclasses.fields(mcls) if f.default is not dataclasses.MISSING}
    shared = set(tdef) & set(mdef)
    assert shared, "no shared fields: the test is checking nothing"
    assert {k: tdef[k] for k in shared} == {k: mdef[k] for k in shared}
