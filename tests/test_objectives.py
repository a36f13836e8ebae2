"""Objectives checked against the papers' formulas written out independently (float64, direct exp,
sigmoid().log(), no clamping or Taylor branches)."""

from __future__ import annotations

import math

import pytest
import torch
from diffalign.objectives import (
    OBJECTIVES,
    DPOObjective,
    MaPOObjective,
    Objective,
    ObjectiveOutput,
    SFTObjective,
    XDPOObjective,
    amplification_factor,
    build_objective,
    mapo_score,
    objective_hyperparameters,
    objective_needs_reference,
)

B = 16
COMMON = {"implicit_acc", "margin_mean", "margin_std", "mse_w", "mse_l"}


def _inputs(seed: int, b: int = B, spread: float = 0.02) -> dict[str, torch.Tensor]:
    """Errors around typical epsilon-prediction values, reference close to the policy."""
    g = torch.Generator().manual_seed(seed)
    err_w = 0.05 + 0.2 * torch.rand(b, generator=g)
    err_l = 0.05 + 0.2 * torch.rand(b, generator=g)
    ref_err_w = err_w + spread * (torch.rand(b, generator=g) - 0.5)
    ref_err_l = err_l + spread * (torch.rand(b, generator=g) - 0.5)
    weight = 1.0 + torch.rand(b, generator=g)
    return {"err_w": err_w, "err_l": err_l, "ref_err_w": ref_err_w, "ref_err_l": ref_err_l, "weight": weight}


def _cast(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in inputs.items()}


# ---- formulas written out -------------------------------------------------------------------


def ref_sft(x: dict[str, torch.Tensor]) -> torch.Tensor:
    # unweighted, as MaPO's SFT term: the reward scale lambda(t) has no reward to scale here
    return x["err_w"].double().mean()


def ref_dpo(x: dict[str, torch.Tensor], beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    ew, el, rw, rl, w = (x[k].double() for k in ("err_w", "err_l", "ref_err_w", "ref_err_l", "weight"))
    # Wallace et al. eq. 14 with per-element means: -log sigma(-beta/2 * w * ((ew - rw) - (el - rl)))
    inside = -(beta / 2.0) * w * ((ew - rw) - (el - rl))
    return -(torch.sigmoid(inside).log()).mean(), inside


def ref_mapo(
    x: dict[str, torch.Tensor], beta: float, s: float, mw: float
) -> tuple[torch.Tensor, torch.Tensor]:
    ew, el, w = (x[k].double() for k in ("err_w", "err_l", "weight"))
    score_w = s * ew / (torch.exp(s * ew) - 1.0)
    score_l = s * el / (torch.exp(s * el) - 1.0)
    margin = beta * w * (score_w - score_l)
    return ew.mean() - mw * torch.sigmoid(margin).log().mean(), margin


def ref_xdpo(
    x: dict[str, torch.Tensor], beta: float, eta: float, n: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    ew, el, rw, rl, w = (x[k].double() for k in ("err_w", "err_l", "ref_err_w", "ref_err_l", "weight"))
    g_w = gamma * torch.exp(n * (ew - rw)) + eta * (ew - rw)
    g_l = gamma * torch.exp(n * (el - rl)) + eta * (el - rl)
    inside = -0.5 * beta * w * (g_w - g_l)
    return -(torch.sigmoid(inside).log()).mean(), inside


# ---- values against the formulas ----------------------------------------------------------------

DTYPE_TOL = [(torch.float32, 1e-5), (torch.bfloat16, 1e-4)]


@pytest.mark.parametrize("dtype,tol", DTYPE_TOL)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sft_matches_formula(seed: int, dtype: torch.dtype, tol: float) -> None:
    x = _cast(_inputs(seed), dtype)
    out = SFTObjective()(**x)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    torch.testing.assert_close(out.loss.double(), ref_sft(x), rtol=tol, atol=1e-7)
    torch.testing.assert_close(
        out.margin.double(), x["err_l"].double() - x["err_w"].double(), rtol=tol, atol=1e-6
    )
    # without a weight the loss is the plain chosen MSE
    torch.testing.assert_close(
        SFTObjective()(x["err_w"], x["err_l"]).loss.double(), x["err_w"].double().mean()
    )


@pytest.mark.parametrize("dtype,tol", DTYPE_TOL)
@pytest.mark.parametrize("seed,beta", [(0, 5000.0), (1, 2500.0), (2, 100.0), (3, 1.0)])
def test_dpo_matches_formula(seed: int, beta: float, dtype: torch.dtype, tol: float) -> None:
    x = _cast(_inputs(seed, spread=20.0 / beta), dtype)
    out = DPOObjective(beta=beta)(**x)
    loss, inside = ref_dpo(x, beta)
    assert out.loss.dtype == torch.float32 and out.per_sample.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), loss, rtol=tol, atol=1e-6)
    torch.testing.assert_close(out.margin.double(), inside, rtol=tol, atol=1e-3)
    torch.testing.assert_close(out.per_sample.mean(), out.loss)
    ew, el, rw, rl = (x[k].double() for k in ("err_w", "err_l", "ref_err_w", "ref_err_l"))
    assert out.metrics["reward_w"] == pytest.approx(
        (-0.5 * beta * (ew - rw)).mean().item(), rel=1e-3, abs=1e-3
    )
    assert out.metrics["reward_l"] == pytest.approx(
        (-0.5 * beta * (el - rl)).mean().item(), rel=1e-3, abs=1e-3
    )


def test_dpo_matches_diffusers_reference_snippet() -> None:
    """The loss of Wallace et al.'s train.py (also diffusers' train_diffusion_dpo_sdxl.py), transcribed."""
    import torch.nn.functional as F

    x = _inputs(7, spread=0.004)
    model_losses = torch.cat([x["err_w"], x["err_l"]])
    ref_losses = torch.cat([x["ref_err_w"], x["ref_err_l"]])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    scale_term = -0.5 * 5000
    inside_term = scale_term * ((model_losses_w - model_losses_l) - (ref_losses_w - ref_losses_l))
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    expected = -1 * F.logsigmoid(inside_term).mean()
    out = build_objective("dpo")(x["err_w"], x["err_l"], x["ref_err_w"], x["ref_err_l"])
    torch.testing.assert_close(out.loss, expected)
    assert out.metrics["implicit_acc"] == pytest.approx(implicit_acc.item())


@pytest.mark.parametrize("dtype,tol", DTYPE_TOL)
@pytest.mark.parametrize(
    "seed,beta,s,mw", [(0, 1000.0, 0.5, 0.1), (1, 8.0, 0.5, 0.1), (2, 1024.0, 1.0, 0.5), (3, 64.0, 2.0, 1.0)]
)
def test_mapo_matches_formula(
    seed: int, beta: float, s: float, mw: float, dtype: torch.dtype, tol: float
) -> None:
    x = _cast(_inputs(seed), dtype)
    out = MaPOObjective(beta=beta, snr_value=s, margin_weight=mw)(**x)
    loss, margin = ref_mapo(x, beta, s, mw)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), loss, rtol=tol, atol=1e-6)
    torch.testing.assert_close(out.margin.double(), margin, rtol=tol, atol=1e-3)
    ew, el = x["err_w"].double(), x["err_l"].double()
    assert out.metrics["score_w"] == pytest.approx((s * ew / torch.expm1(s * ew)).mean().item(), rel=1e-5)
    assert out.metrics["score_l"] == pytest.approx((s * el / torch.expm1(s * el)).mean().item(), rel=1e-5)
    margin_loss = -mw * torch.sigmoid(margin).log().mean()
    assert out.metrics["mapo_margin_loss"] == pytest.approx(margin_loss.item(), rel=1e-3, abs=1e-6)


def test_mapo_matches_official_compute_loss() -> None:
    """The official mapo-t2i/mapo ``compute_loss`` body, transcribed (snr 0.5, T 1000, beta_mapo 0.1)."""
    import torch.nn.functional as F

    x = _inputs(11)
    # evaluated in float64: in float32, exp(x) - 1 loses ~1e-5 relative to cancellation (we use expm1)
    model_losses_w, model_losses_l = x["err_w"].double(), x["err_l"].double()
    snr_value, num_train_timesteps, beta_mapo = 0.5, 1000, 0.1
    log_odds = (snr_value * model_losses_w) / (torch.exp(snr_value * model_losses_w) - 1) - (
        snr_value * model_losses_l
    ) / (torch.exp(snr_value * model_losses_l) - 1)
    ratio_losses = beta_mapo * F.logsigmoid(log_odds * num_train_timesteps)
    expected = model_losses_w.mean() - ratio_losses.mean()
    out = build_objective("mapo")(x["err_w"], x["err_l"])
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=1e-7)


def test_mapo_ignores_reference() -> None:
    x = _inputs(3)
    obj = MaPOObjective()
    a = obj(x["err_w"], x["err_l"])
    b = obj(x["err_w"], x["err_l"], x["ref_err_w"] * 3, x["ref_err_l"] * 0.1)
    torch.testing.assert_close(a.loss, b.loss)
    assert "ref_mse_w" not in a.metrics and "ref_mse_w" in b.metrics


@pytest.mark.parametrize("dtype,tol", DTYPE_TOL)
@pytest.mark.parametrize(
    "seed,beta,eta,n,gamma",
    [
        (0, 1000.0, 0.05, 6.0, 1 / 6),
        (1, 2000.0, 1.0, 1.0, 1.0),
        (2, 1000.0, 0.5, 3.0, 1 / 3),
        (3, 50.0, 0.1, 6.0, 1 / 6),
    ],
)
def test_xdpo_matches_formula(
    seed: int, beta: float, eta: float, n: float, gamma: float, dtype: torch.dtype, tol: float
) -> None:
    x = _cast(_inputs(seed, spread=10.0 / beta), dtype)
    out = XDPOObjective(beta=beta, eta=eta, n=n, gamma=gamma)(**x)
    loss, inside = ref_xdpo(x, beta, eta, n, gamma)
    torch.testing.assert_close(out.loss.double(), loss, rtol=tol, atol=1e-6)
    torch.testing.assert_close(out.margin.double(), inside, rtol=tol, atol=1e-3)
    assert out.metrics["exp_clamped_frac"] == 0.0


def test_xdpo_matches_appendix_c_snippet() -> None:
    """Appendix C of the xDPO paper, transcribed (with our per-element mean errors)."""
    import torch.nn.functional as F

    x = _inputs(5, spread=0.01)
    beta = 1000.0
    model_w_err, model_l_err, ref_w_err, ref_l_err = x["err_w"], x["err_l"], x["ref_err_w"], x["ref_err_l"]
    exp_w = torch.exp(6 * (model_w_err - ref_w_err)) / 6 + 0.05 * (model_w_err - ref_w_err)
    exp_l = torch.exp(6 * (model_l_err - ref_l_err)) / 6 + 0.05 * (model_l_err - ref_l_err)
    inside_term = -0.5 * beta * (exp_w - exp_l)
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    expected = (-1 * F.logsigmoid(inside_term)).mean()
    out = build_objective("xdpo")(model_w_err, model_l_err, ref_w_err, ref_l_err)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert out.metrics["implicit_acc"] == pytest.approx(implicit_acc.item())


def test_xdpo_normal_range_equals_unclamped_and_clamp_engages() -> None:
    g = torch.Generator().manual_seed(0)
    d = (torch.rand(64, generator=g) - 0.5) * 2.0  # n*d in [-6, 6], far below the clamp
    obj = XDPOObjective()
    expected = obj.gamma * torch.exp(obj.n * d.double()) + obj.eta * d.double()
    torch.testing.assert_close(obj.generator(d).double(), expected, rtol=1e-6, atol=0)
    # a small clamp changes the large values and leaves the others equal
    tight = XDPOObjective(max_exponent=1.0)
    changed = obj.n * d > 1.0
    assert changed.any()
    assert not torch.allclose(tight.generator(d)[changed], obj.generator(d)[changed])
    torch.testing.assert_close(tight.generator(d)[~changed], obj.generator(d)[~changed])
    err = torch.full((4,), 1.0)
    out = tight(err, err, err - 1.0, err)
    assert out.metrics["exp_clamped_frac"] == 0.5


# ---- weight = lambda(t) scales beta ----------------------------------------------------------------


def test_dpo_weight_scales_beta() -> None:
    x = _inputs(4, spread=0.002)
    w = x["weight"]
    base = {k: x[k] for k in ("err_w", "err_l", "ref_err_w", "ref_err_l")}
    weighted = DPOObjective(beta=2000.0)(**base, weight=w)
    for i in range(B):
        single = DPOObjective(beta=2000.0 * float(w[i]))(**{k: v[i : i + 1] for k, v in base.items()})
        torch.testing.assert_close(weighted.per_sample[i : i + 1], single.per_sample, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weighted.margin[i : i + 1], single.margin, rtol=1e-5, atol=1e-5)
    # a scalar weight equals the same beta scaling for the whole batch
    torch.testing.assert_close(
        DPOObjective(beta=2000.0)(**base, weight=1.5).loss, DPOObjective(beta=3000.0)(**base).loss
    )
    torch.testing.assert_close(
        DPOObjective(beta=2000.0)(**base, weight=torch.tensor(1.5)).loss,
        DPOObjective(beta=3000.0)(**base).loss,
    )
    # the weight really changes the loss
    assert not torch.allclose(weighted.loss, DPOObjective(beta=2000.0)(**base).loss)


@pytest.mark.parametrize("name", ["mapo", "xdpo"])
def test_weight_scales_beta_mapo_xdpo(name: str) -> None:
    x = _inputs(6, spread=0.005)
    base = {k: x[k] for k in ("err_w", "err_l", "ref_err_w", "ref_err_l")}
    torch.testing.assert_close(
        build_objective(name, beta=400.0)(**base, weight=2.5).margin,
        build_objective(name, beta=1000.0)(**base).margin,
        rtol=1e-5,
        atol=1e-5,
    )


def test_sft_ignores_the_reward_scale() -> None:
    x = _inputs(8)
    assert not torch.allclose(x["weight"], torch.ones_like(x["weight"]))
    out = SFTObjective()(x["err_w"], x["err_l"], weight=x["weight"])
    torch.testing.assert_close(out.per_sample, x["err_w"])


# ---- gradient direction ----------------------------------------------------------------------------

ALL = ["sft", "dpo", "mapo", "xdpo"]
PREF = ["dpo", "mapo", "xdpo"]


def _grads(name: str, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    ew = x["err_w"].clone().requires_grad_()
    el = x["err_l"].clone().requires_grad_()
    out = build_objective(name)(ew, el, x["ref_err_w"], x["ref_err_l"], weight=x["weight"])
    out.loss.backward()
    return ew.grad, el.grad


@pytest.mark.parametrize("name", ALL)
def test_lowering_chosen_error_lowers_loss(name: str) -> None:
    x = _inputs(9, spread=0.002)
    gw, _ = _grads(name, x)
    assert (gw > 0).all()
    obj = build_objective(name)
    rest = (x["err_l"], x["ref_err_w"], x["ref_err_l"])
    before = obj(x["err_w"], *rest, weight=x["weight"]).loss
    after = obj(x["err_w"] - 1e-3, *rest, weight=x["weight"]).loss
    assert after < before


@pytest.mark.parametrize("name", PREF)
def test_raising_rejected_error_lowers_loss(name: str) -> None:
    x = _inputs(10, spread=0.002)
    _, gl = _grads(name, x)
    assert (gl < 0).all()
    obj = build_objective(name)
    before = obj(x["err_w"], x["err_l"], x["ref_err_w"], x["ref_err_l"], weight=x["weight"]).loss
    after = obj(x["err_w"], x["err_l"] + 1e-3, x["ref_err_w"], x["ref_err_l"], weight=x["weight"]).loss
    assert after < before


def test_sft_ignores_rejected() -> None:
    x = _inputs(12)
    _, gl = _grads("sft", x)
    assert gl is None or torch.count_nonzero(gl) == 0


# ---- stability ------------------------------------------------------------------------------------

EXTREMES = [0.0, 1e-8, 1e-4, 1e-3, 0.5, 1.0, 30.0, 100.0, 1e3, 1e4]


@pytest.mark.parametrize("name", ["mapo", "xdpo", "dpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_errors_finite(name: str, dtype: torch.dtype) -> None:
    vals = torch.tensor(EXTREMES)
    ew, el = torch.meshgrid(vals, vals, indexing="ij")
    ew, el = ew.reshape(-1), el.reshape(-1)
    n = ew.numel()
    # references at both extremes too: d = err - ref spans [-1e4, 1e4]
    rw = vals.repeat(n // len(vals) + 1)[:n].flip(0)
    rl = vals.repeat(n // len(vals) + 1)[:n]
    ew_ = ew.to(dtype).requires_grad_()
    el_ = el.to(dtype).requires_grad_()
    out = build_objective(name)(ew_, el_, rw.to(dtype), rl.to(dtype), weight=torch.full((n,), 2.0))
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss) and torch.isfinite(out.per_sample).all()
    out.loss.backward()
    assert torch.isfinite(ew_.grad).all() and torch.isfinite(el_.grad).all()
    assert all(math.isfinite(v) for v in out.metrics.values())


def test_mapo_score_limits_and_gradient() -> None:
    x = torch.tensor([0.0, 1e-9, 1e-6, 1e-3, 0.002, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4], dtype=torch.float32)
    x.requires_grad_()
    s = mapo_score(x, 0.5)
    assert s[0].item() == 1.0
    assert ((s > 0) | (x > 100)).all() and (s <= 1).all()
    assert (s[1:] <= s[:-1]).all()
    # against the direct formula where it is well defined
    xd = x.detach().double()[1:]
    torch.testing.assert_close(
        s.detach()[1:].double(), 0.5 * xd / torch.expm1(0.5 * xd), rtol=1e-5, atol=1e-30
    )
    s.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad <= 0).all()
    assert x.grad[0].item() == pytest.approx(-0.25)  # d/dm psi(0.5 m) at 0 = 0.5 * (-1/2)


def test_mapo_score_continuous_at_taylor_switch() -> None:
    s = 0.5
    eps = 1e-3 / s
    m = torch.tensor([eps * (1 - 1e-4), eps * (1 + 1e-4)], dtype=torch.float32)
    out = mapo_score(m, s)
    assert abs(out[0].item() - out[1].item()) < 1e-6


# ---- MaPO amplification factor ----------------------------------------------------------------------


def test_amplification_factor_bounds_and_monotone() -> None:
    k = torch.logspace(-8, math.log10(600.0), 2000, dtype=torch.float64)
    f = amplification_factor(k, snr_value=1.0)
    assert (f > 0).all() and (f <= 1).all()
    assert (f[1:] < f[:-1]).all()  # strictly decreasing
    assert amplification_factor(torch.tensor([0.0], dtype=torch.float64), 1.0).item() == 1.0
    assert f[0].item() == pytest.approx(1.0, abs=1e-8)
    assert amplification_factor(torch.tensor([1e4]), 1.0).item() == pytest.approx(0.0, abs=1e-30)
    # float32 in, float32 out, bounded, no nan even where it underflows
    f32 = amplification_factor(torch.logspace(-6, 4, 500), 0.5)
    assert f32.dtype == torch.float32 and torch.isfinite(f32).all() and (f32 >= 0).all() and (f32 <= 1).all()


def test_amplification_factor_is_the_score_derivative() -> None:
    """d psi(s m)/dm = -(s/2) f(s m), psi(x) = x/(e^x - 1), with f from the paper's gradient analysis."""
    for s in (0.5, 1.0, 2.0):
        m = torch.cat([torch.linspace(0.01, 5.0, 50), torch.tensor([0.03, 0.09, 0.11, 20.0, 60.0])]).double()
        m.requires_grad_()
        psi = (s * m) / (torch.exp(s * m) - 1.0)
        (grad,) = torch.autograd.grad(psi.sum(), m)
        f = amplification_factor(m.detach(), s)
        torch.testing.assert_close(grad, -(s / 2.0) * f, rtol=1e-7, atol=1e-15)
        # closed form as printed: (e^K (K - 1) + 1) / (e^K - 1)^2, normalised by its K -> 0 limit 1/2
        kk = s * m.detach()
        closed = 2.0 * (torch.exp(kk) * (kk - 1.0) + 1.0) / (torch.exp(kk) - 1.0) ** 2
        torch.testing.assert_close(f, closed, rtol=1e-6, atol=1e-15)


# ---- metrics, validation, registry -------------------------------------------------------------------


def test_common_metrics() -> None:
    err_w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    err_l = torch.tensor([0.2, 0.1, 0.5, 0.4])
    ref = torch.full((4,), 0.25)
    for name in ALL:
        out = build_objective(name)(err_w, err_l, ref, ref)
        assert isinstance(out, ObjectiveOutput)
        assert COMMON | {"ref_mse_w", "ref_mse_l"} <= set(out.metrics)
        assert all(type(v) is float for v in out.metrics.values())
        assert out.metrics["mse_w"] == pytest.approx(0.25) and out.metrics["mse_l"] == pytest.approx(0.3)
        assert out.metrics["ref_mse_w"] == pytest.approx(0.25)
        # pairs 0 and 2 are ranked right (chosen error lower), pair 1 wrong, pair 3 a tie (half)
        assert out.metrics["implicit_acc"] == pytest.approx(2.5 / 4), name
        assert out.metrics["margin_mean"] == pytest.approx(out.margin.mean().item(), rel=1e-6)
        assert out.metrics["margin_std"] == pytest.approx(out.margin.std(unbiased=False).item(), rel=1e-5)
        assert out.per_sample.shape == (4,) and out.margin.shape == (4,)
    no_ref = build_objective("sft")(err_w, err_l)
    assert "ref_mse_w" not in no_ref.metrics and COMMON <= set(no_ref.metrics)
    single = build_objective("mapo")(err_w[:1], err_l[:1])
    assert single.metrics["margin_std"] == 0.0


@pytest.mark.parametrize("name", ["dpo", "xdpo"])
def test_reference_required(name: str) -> None:
    x = _inputs(0)
    with pytest.raises(ValueError, match="reference"):
        build_objective(name)(x["err_w"], x["err_l"])
    with pytest.raises(ValueError, match="ref_err"):
        build_objective(name)(x["err_w"], x["err_l"], x["ref_err_w"], None)


def test_shape_validation() -> None:
    obj = build_objective("dpo")
    e = torch.rand(4)
    with pytest.raises(ValueError, match="err_l"):
        obj(e, torch.rand(3), e, e)
    with pytest.raises(ValueError, match="err_w"):
        obj(torch.rand(4, 2), e, e, e)
    with pytest.raises(ValueError, match="weight"):
        obj(e, e, e, e, weight=torch.rand(5))
    with pytest.raises(TypeError):
        obj(torch.ones(4, dtype=torch.long), e, e, e)


def test_registry() -> None:
    assert set(OBJECTIVES) == {"sft", "dpo", "mapo", "xdpo"}
    assert {n: objective_needs_reference(n) for n in OBJECTIVES} == {
        "sft": False,
        "dpo": True,
        "mapo": False,
        "xdpo": True,
    }
    for name, cls in OBJECTIVES.items():
        obj = build_objective(name)
        assert isinstance(obj, cls) and isinstance(obj, Objective) and obj.name == name
    assert build_objective(" DPO ").beta == 5000.0
    assert objective_hyperparameters("sft") == {"rejected_diagnostic": False}
    assert objective_hyperparameters("xdpo")["gamma"] == pytest.approx(1 / 6)
    m = build_objective("mapo")
    assert (m.beta, m.snr_value, m.margin_weight) == (1000.0, 0.5, 0.1)
    xd = build_objective("xdpo")
    assert (xd.beta, xd.eta, xd.n) == (1000.0, 0.05, 6.0)


def test_registry_errors() -> None:
    with pytest.raises(ValueError, match="dpo, mapo, sft, xdpo"):
        build_objective("kto")
    with pytest.raises(ValueError, match="allowed"):
        objective_needs_reference("orpo")
    with pytest.raises(ValueError, match="beta_mapo"):
        build_objective("dpo", beta_mapo=0.1)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        build_objective("sft", beta=1.0)


@pytest.mark.parametrize(
    "name,params,field",
    [
        ("dpo", {"beta": 0.0}, "beta"),
        ("dpo", {"beta": -5.0}, "beta"),
        ("dpo", {"beta": float("nan")}, "beta"),
        ("dpo", {"beta": "5000"}, "beta"),
        ("mapo", {"beta": 0}, "beta"),
        ("mapo", {"snr_value": 0.0}, "snr_value"),
        ("mapo", {"margin_weight": -0.1}, "margin_weight"),
        ("xdpo", {"beta": -1.0}, "beta"),
        ("xdpo", {"eta": -0.05}, "eta"),
        ("xdpo", {"n": 0}, "n"),
        ("xdpo", {"gamma": -1.0}, "gamma"),
        ("xdpo", {"max_exponent": float("inf")}, "max_exponent"),
        ("xdpo", {"eta": 0.0, "gamma": 0.0}, "eta"),
    ],
)
def test_invalid_hyperparameters(name: str, params: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"'{field}'"):
        build_objective(name, **params)


# ---- MaPO: the paper's beta, omega = 100 / beta, the official code at beta 1000 -----------------

TABLE4_BETAS = (8.0, 32.0, 64.0, 128.0, 1024.0)  # Hong et al. Table 4's grid


def _official_mapo_loss(ew: torch.Tensor, el: torch.Tensor, snr: float, beta_mapo: float) -> torch.Tensor:
    # mapo-t2i/mapo utils.compute_loss with num_train_timesteps 1000, in float64
    ew, el = ew.double(), el.double()
    log_odds = (snr * ew) / (torch.exp(snr * ew) - 1) - (snr * el) / (torch.exp(snr * el) - 1)
    return ew.mean() - (beta_mapo * torch.sigmoid(log_odds * 1000).log()).mean()


def _margin_grad(beta: float, m_w: float, m_l: float, s: float = 0.5) -> float:
    """d(omega * L_margin)/d m_w from the paper's eq. 9-11 with omega = 100 / beta, written out."""
    psi_w = s * m_w / (math.exp(s * m_w) - 1.0)
    psi_l = s * m_l / (math.exp(s * m_l) - 1.0)
    z = beta * (psi_w - psi_l)
    k = s * m_w
    dpsi = -(s / 2.0) * 2.0 * (math.exp(k) * (k - 1.0) + 1.0) / (math.exp(k) - 1.0) ** 2
    return (100.0 / beta) * (1.0 / (1.0 + math.exp(z))) * (-beta * dpsi)


def _mapo_grad_w(beta: float, m_w: float, m_l: float) -> float:
    ew = torch.tensor([m_w], dtype=torch.float64, requires_grad=True)
    MaPOObjective(beta=beta)(ew, torch.tensor([m_l], dtype=torch.float64)).loss.backward()
    return float(ew.grad)


def test_mapo_official_setting_is_beta_1000() -> None:
    x = _inputs(13)
    ew, el = x["err_w"], x["err_l"]
    expected = _official_mapo_loss(ew, el, 0.5, 0.1)
    # objectives compute in float32 (base.py), the transcription in float64
    got = MaPOObjective(beta=1000.0)(ew, el).loss.double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # other official flags: --snr_value 0.3 --beta_mapo 0.25 is snr_value 0.3, margin_weight 0.25
    other = MaPOObjective(beta=1000.0, snr_value=0.3, margin_weight=0.25)(ew, el).loss.double()
    torch.testing.assert_close(other, _official_mapo_loss(ew, el, 0.3, 0.25), rtol=1e-5, atol=1e-7)
    for beta in TABLE4_BETAS:
        assert MaPOObjective(beta=beta).margin_weight == pytest.approx(100.0 / beta, rel=1e-12)


@pytest.mark.parametrize("m", [0.05, 0.15, 0.6])
def test_mapo_omega_cancels_beta_at_a_tie(m: float) -> None:
    """At err_w == err_l the margin term adds 100 * (s/2) * (1/2) * f(s m) = 12.5 f(s m) for every beta."""
    k = 0.5 * m
    f = 2.0 * (math.exp(k) * (k - 1.0) + 1.0) / (math.exp(k) - 1.0) ** 2
    for beta in TABLE4_BETAS:
        assert _mapo_grad_w(beta, m, m) == pytest.approx(1.0 + 12.5 * f, rel=1e-5)
        assert _margin_grad(beta, m, m) == pytest.approx(12.5 * f, rel=1e-12)


def test_mapo_larger_beta_needs_less_margin_and_leaves_more_sft() -> None:
    """Table 4: a larger beta requires less margin; for a large beta the SFT term dominates."""
    right = [_mapo_grad_w(b, 0.10, 0.12) - 1.0 for b in TABLE4_BETAS]  # chosen already ahead
    for beta, got in zip(TABLE4_BETAS, right):
        assert got == pytest.approx(_margin_grad(beta, 0.10, 0.12), rel=1e-4)
    assert all(a > b for a, b in zip(right, right[1:]))
    assert right[0] > 10.0  # beta 8 (preference): the margin term still pushes at ~12x the SFT term
    assert right[-1] < 0.2  # beta 1024 (personalization): mostly the SFT term
    # a pair ranked the wrong way gets a larger push with beta, never above 100 * s/2 = 25
    wrong = [_mapo_grad_w(b, 0.12, 0.10) - 1.0 for b in TABLE4_BETAS]
    for beta, got in zip(TABLE4_BETAS, wrong):
        assert got == pytest.approx(_margin_grad(beta, 0.12, 0.10), rel=1e-4)
    assert all(a < b < 25.0 for a, b in zip(wrong, wrong[1:]))


def test_mapo_presets_follow_table4() -> None:
    from pathlib import Path

    from diffalign.config import load_config

    rows = {"mapo.yaml": 8.0, "sdxl_mapo.yaml": 64.0, "mapo_personalize.yaml": 1024.0}
    # The tiny configs: the "Style" row for the red-vs-blue tint (flow families alike), personalization.
    tiny = {"mapo.yaml": 64.0, "sdxl_mapo.yaml": 64.0, "sd3_mapo.yaml": 64.0, "flux_mapo.yaml": 64.0,
            "qwenimage_mapo.yaml": 64.0, "mapo_personalize.yaml": 1024.0,
            "flux_mapo_personalize.yaml": 1024.0}
    presets = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*/*mapo*.yaml"))
    # sd15, sdxl, sd35, flux: preference + personalization; qwenimage: preference; tiny: seven
    assert len(presets) >= 16
    for path in presets:
        cfg = load_config(path, validate_paths=False)
        obj = build_objective(cfg.objective.name, **cfg.objective.hyperparameters)
        expected = tiny[path.name] if path.parent.name == "tiny" else rows[path.name]
        assert (obj.beta, obj.snr_value) == (expected, 0.5), path
        assert obj.margin_weight == pytest.approx(100.0 / expected), path


# ---- Diffusion-DPO: Wallace et al.'s beta and diffusers' beta_dpo ------------------------------------


def test_dpo_beta_dpo_is_the_diffusers_convention() -> None:
    x = _inputs(14, spread=0.004)
    ew, el, rw, rl = (x[k].double() for k in ("err_w", "err_l", "ref_err_w", "ref_err_l"))
    # diffusers train_diffusion_dpo.py: logits = ref_diff - model_diff; -logsigmoid(beta_dpo * logits)
    logits = (rw - rl) - (ew - el)
    expected = -(torch.sigmoid(2500.0 * logits).log()).mean()
    ported = DPOObjective(beta_dpo=2500)(x["err_w"], x["err_l"], x["ref_err_w"], x["ref_err_l"])
    original = DPOObjective(beta=5000)(x["err_w"], x["err_l"], x["ref_err_w"], x["ref_err_l"])
    torch.testing.assert_close(ported.loss.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ported.loss, original.loss)
    torch.testing.assert_close(ported.margin, original.margin)
    assert DPOObjective(beta_dpo=2500).beta == 5000.0


def test_dpo_beta_and_beta_dpo_are_exclusive() -> None:
    for beta in (5000.0, 1000):  # the default value given explicitly conflicts too
        with pytest.raises(ValueError, match="'beta'.*'beta_dpo'"):
            DPOObjective(beta=beta, beta_dpo=2500)
    for bad in (0.0, -1.0, float("nan"), "2500"):
        with pytest.raises(ValueError, match="'beta_dpo'"):
            build_objective("dpo", beta_dpo=bad)


def test_dpo_beta_dpo_from_config() -> None:
    from diffalign.config import load_config
    from diffalign.config.schema import ConfigError

    cfg = load_config(None, ["objective.name=dpo", "objective.beta_dpo=2500", "reference.strategy=frozen"])
    assert cfg.objective.hyperparameters == {"beta_dpo": 2500.0}
    assert build_objective(cfg.objective.name, **cfg.objective.hyperparameters).beta == 5000.0
    with pytest.raises(ConfigError, match="objective.beta, objective.beta_dpo"):
        load_config(None, ["objective.name=dpo", "objective.beta=5000", "objective.beta_dpo=2500",
                           "reference.strategy=frozen"])


# ---- xDPO: DPO with beta * (eta + gamma * n) for small d; exp_share ---------------------------------


def test_xdpo_small_gaps_are_dpo_with_beta_times_1_05() -> None:
    k = torch.arange(1, 9, dtype=torch.float64)
    d_w, d_l = 1e-4 * k, -2e-5 * k
    ref = torch.full((8,), 0.15, dtype=torch.float64)
    out = XDPOObjective()(ref + d_w, ref + d_l, ref, ref)
    dpo_like = -0.5 * 1000.0 * (0.05 + 6.0 / 6.0) * (d_w - d_l)
    torch.testing.assert_close(out.margin.double(), dpo_like, rtol=3e-3, atol=0)
    assert not torch.allclose(out.margin.double(), -0.5 * 1000.0 * (d_w - d_l), rtol=3e-2, atol=0)


def test_xdpo_exp_share() -> None:
    # d = err - ref per pair; with n = 6 the pairs with |6 d_w| > 0.1 or |6 d_l| > 0.1 are 1, 2 and 4
    d_w = torch.tensor([0.01, 0.02, 0.0, 0.016, -0.017])
    d_l = torch.tensor([0.0, -0.001, -0.05, 0.016, 0.0])
    ref = torch.full((5,), 0.2)
    assert XDPOObjective()(ref + d_w, ref + d_l, ref, ref).metrics["exp_share"] == pytest.approx(3 / 5)
    # n = 1: no |d| exceeds 0.1
    assert XDPOObjective(n=1.0)(ref + d_w, ref + d_l, ref, ref).metrics["exp_share"] == 0.0


# ---- implicit accuracy: a tie counts half (as diffusers' train_diffusion_dpo.py logs it) -----------


def test_implicit_acc_counts_a_tie_as_half() -> None:
    from diffalign.objectives.base import tie_half_accuracy

    e_w = torch.tensor([0.30, 0.10, 0.70, 0.20])
    e_l = torch.tensor([0.25, 0.40, 0.65, 0.90])
    # a policy equal to its reference: every DPO / xDPO margin is exactly 0
    for name in ("dpo", "xdpo"):
        out = build_objective(name)(e_w, e_l, e_w, e_l)
        assert torch.count_nonzero(out.margin) == 0
        assert out.metrics["implicit_acc"] == 0.5, name
    # reference-free objectives tie where the chosen and rejected errors are equal
    for name in ("mapo", "sft"):
        out = build_objective(name)(e_w, e_w.clone())
        assert out.metrics["implicit_acc"] == 0.5, name
    # mixed: written out, right = 1, tie = 1/2, wrong = 0
    margin = torch.tensor([0.2, 0.0, -0.1, 0.0, 3.0])
    assert float(tie_half_accuracy(margin)) == pytest.approx((1 + 0.5 + 0 + 0.5 + 1) / 5)
    # control: nudging one tie off zero moves it to right or wrong
    assert float(tie_half_accuracy(margin + torch.tensor([0, 1e-6, 0, -1e-6, 0]))) == pytest.approx(3 / 5)
