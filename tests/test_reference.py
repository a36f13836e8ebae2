"""Reference policies: frozen, periodic, periodic_threshold (freeze / reinit), the KL(ref||init)
estimate, checkpoint state, and LoRA references that keep no UNet copy."""

from __future__ import annotations

import math

import pytest
import torch
from diffalign.models import Denoiser, PromptEncoder, build_tiny_bundle, trainable_state_dict
from diffalign.models.lora import add_lora
from diffalign.models.weights import load_trainable_state_dict
from diffalign.reference import build_reference, estimate_reference_kl
from diffalign.reference.policies import FrozenReference, NoReference, PeriodicReference, ThresholdReference


class Policy:
    """A tiny SD1.5 UNet (full or LoRA) with a fixed probe batch and helpers to move its weights."""

    def __init__(self, lora: bool) -> None:
        self.bundle = build_tiny_bundle("sd15", seed=0)
        self.unet = self.bundle.unet
        self.lora = lora
        if lora:
            add_lora(self.unet, rank=2)
        else:
            self.unet.requires_grad_(True)
        self.unet.train()
        self.denoiser = Denoiser(self.bundle.noise_scheduler)
        g = torch.Generator().manual_seed(5)
        latents = 0.05 * torch.randn(3, 4, 8, 8, generator=g)
        noise = torch.randn(3, 4, 8, 8, generator=g)
        self.timesteps = torch.tensor([30, 400, 900])
        self.noisy, self.target = self.denoiser.noisy_and_target(latents, noise, self.timesteps)
        self.cond = PromptEncoder(self.bundle)(["a square", "a red car", "a dog"])
        self.init_weights = self.weights()
        self._gen = torch.Generator().manual_seed(11)

    def weights(self) -> dict[str, torch.Tensor]:
        return trainable_state_dict(self.unet)

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        load_trainable_state_dict(self.unet, weights)

    @torch.no_grad()
    def perturb(self, scale: float) -> None:
        """Moves every trainable tensor (LoRA: the adapters) by Gaussian noise of std `scale`."""
        for name, p in self.unet.named_parameters():
            if p.requires_grad and (not self.lora or "lora_" in name):
                p.add_(scale * torch.randn(p.shape, generator=self._gen))

    @torch.no_grad()
    def errors(self) -> torch.Tensor:
        was = self.unet.training
        self.unet.eval()
        try:
            return self.denoiser.errors(self.unet, self.noisy, self.timesteps, self.cond, self.target)
        finally:
            self.unet.train(was)

    def ref_errors(self, ref) -> torch.Tensor:
        return ref.errors(self.noisy, self.timesteps, self.cond, self.target)

    def probe(self) -> dict:
        return {"noisy": self.noisy, "timesteps": self.timesteps, "target": self.target, "cond": self.cond}

    def reference(self, strategy: str, **kw):
        return build_reference(strategy, self.unet, self.denoiser, **kw)


@pytest.fixture(params=[False, True], ids=["full", "lora"])
def policy(request) -> Policy:
    return Policy(lora=request.param)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ construction


@pytest.mark.parametrize(
    "kwargs, field",
    [({"strategy": "ema"}, "reference.strategy"),
     ({"strategy": "frozen", "tau": 0}, "reference.tau"),
     ({"strategy": "periodic", "tau": -2}, "reference.tau"),
     ({"strategy": "periodic_threshold", "delta": 0.0}, "reference.delta"),
     ({"strategy": "periodic_threshold", "delta": -0.1}, "reference.delta"),
     ({"strategy": "periodic", "on_exceed": "stop"}, "reference.on_exceed")],
)
def test_build_reference_errors_name_the_field(kwargs, field):
    p = Policy(lora=True)
    strategy = kwargs.pop("strategy")
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        build_reference(strategy, p.unet, p.denoiser, **kwargs)


def test_build_reference_classes():
    p = Policy(lora=True)
    none = build_reference("none")
    assert isinstance(none, NoReference) and not none.active
    assert none.errors(p.noisy, p.timesteps, p.cond, p.target) is None
    assert isinstance(p.reference("frozen"), FrozenReference)
    assert isinstance(p.reference("periodic", tau=3), PeriodicReference)
    assert isinstance(p.reference("periodic_threshold", tau=3, delta=0.1), ThresholdReference)


def test_lora_reference_keeps_no_unet_copy():
    p = Policy(lora=True)
    for strategy in ("frozen", "periodic", "periodic_threshold"):
        ref = p.reference(strategy, tau=2, delta=0.1)
        assert ref.ref_unet is None and ref.init_unet is None
        assert ref.ref_state and all("lora_" in k for k in ref.ref_state)
        # kilobytes of adapters, not a UNet
        n_ref = sum(v.numel() for v in ref.reference_state().values())
        assert n_ref < sum(q.numel() for q in p.unet.parameters()) / 5
    # "init" for a LoRA policy is the policy with adapters disabled: the base UNet
    ref = p.reference("periodic_threshold", tau=1, delta=0.1)
    p.perturb(0.5)
    base = build_tiny_bundle("sd15", seed=0).unet.eval()
    with torch.no_grad():
        expected = p.denoiser.errors(base, p.noisy, p.timesteps, p.cond, p.target)
    assert torch.allclose(ref._init_errors(p.noisy, p.timesteps, p.cond, p.target), expected, atol=1e-6)


def test_full_reference_copies():
    p = Policy(lora=False)
    assert p.reference("frozen").init_unet is None  # only periodic_threshold keeps the initial model
    ref = p.reference("periodic_threshold", tau=1, delta=0.1)
    assert ref.ref_unet is not p.unet and ref.init_unet is not p.unet
    assert not any(q.requires_grad for q in ref.ref_unet.parameters())
    assert not any(q.requires_grad for q in ref.init_unet.parameters())


# ------------------------------------------------------------------ frozen


def test_frozen_reference_stays_at_the_initial_model(policy):
    init_err = policy.errors()
    ref = policy.reference("frozen")
    assert ref.frozen and ref.version == 0
    for step in range(1, 4):
        policy.perturb(0.05)
        metrics = ref.on_step(step, policy.probe())
        assert metrics["ref/version"] == 0.0 and metrics["ref/frozen"] == 1.0
    moved = policy.weights()
    assert not torch.allclose(policy.errors(), init_err)
    assert torch.equal(policy.ref_errors(ref), init_err)
    # computing reference errors leaves the policy's weights and mode alone
    assert _same(policy.weights(), moved)
    assert policy.unet.training


# ------------------------------------------------------------------ periodic


def test_periodic_reference_updates_every_tau_steps(policy):
    tau = 3
    ref = policy.reference("periodic", tau=tau)
    assert not ref.frozen
    adopted_err = policy.errors()
    for step in range(1, 3 * tau + 2):
        policy.perturb(0.05)
        metrics = ref.on_step(step, None)
        assert ref.version == step // tau
        assert metrics["ref/version"] == float(step // tau)
        if step % tau == 0:
            adopted_err = policy.errors()
            adopted_weights = policy.weights()
            assert torch.equal(policy.ref_errors(ref), adopted_err)
        else:
            # between updates the reference is the copy taken at the last update
            assert torch.equal(policy.ref_errors(ref), adopted_err)
            assert not torch.allclose(policy.errors(), adopted_err)
    if policy.lora:
        assert _same(ref.reference_state(), adopted_weights)


# ------------------------------------------------------------------ periodic_threshold


def test_threshold_within_bound_updates_like_periodic(policy):
    ref = policy.reference("periodic_threshold", tau=2, delta=1.0)
    for step in range(1, 7):
        policy.perturb(1e-3)
        ref.on_step(step, policy.probe())
        assert ref.version == step // 2
    assert not ref.frozen
    assert abs(ref.last_divergence) <= 1.0
    assert ref.version == 3
    assert torch.equal(policy.ref_errors(ref), policy.errors())  # step 6 adopted the current policy
    assert "ref/divergence" in ref.metrics()


def test_threshold_needs_a_probe(policy):
    ref = policy.reference("periodic_threshold", tau=1, delta=0.1)
    with pytest.raises(ValueError, match="probe"):
        ref.on_step(1, None)


def _divergence(policy: Policy) -> float:
    """err(policy) - err(init) on the probe, computed directly."""
    current = policy.weights()
    err_now = policy.errors()
    policy.set_weights(policy.init_weights)
    err_init = policy.errors()
    policy.set_weights(current)
    return float((err_now - err_init).mean())


def test_threshold_freezes_at_the_last_in_bound_reference(policy):
    delta = 0.02
    ref = policy.reference("periodic_threshold", tau=2, delta=delta)
    probe = policy.probe()
    policy.perturb(1e-3)
    ref.on_step(1, probe)
    ref.on_step(2, probe)
    assert ref.version == 1 and not ref.frozen
    assert ref.last_divergence == pytest.approx(_divergence(policy), abs=1e-6)
    kept_err, kept_weights = policy.errors(), policy.weights()

    policy.perturb(1.0)  # far from the initial model
    div = _divergence(policy)
    assert div > delta
    ref.on_step(3, probe)
    ref.on_step(4, probe)
    assert ref.frozen and ref.version == 1
    assert ref.last_divergence == pytest.approx(div, rel=1e-5)
    assert ref.metrics()["ref/frozen"] == 1.0
    assert torch.equal(policy.ref_errors(ref), kept_err)
    if policy.lora:
        assert _same(ref.reference_state(), kept_weights)

    # frozen for good: even a policy back near the initial model is not adopted
    policy.set_weights(policy.init_weights)
    for step in (5, 6, 8):
        ref.on_step(step, probe)
    assert ref.version == 1 and ref.frozen
    assert torch.equal(policy.ref_errors(ref), kept_err)


def test_threshold_reinit_restores_initial_weights_and_keeps_updating(policy):
    delta = 0.02
    init_ref_state = {k: v.clone() for k, v in policy.reference("frozen").reference_state().items()}
    init_err = policy.errors()
    ref = policy.reference("periodic_threshold", tau=1, delta=delta, on_exceed="reinit")
    probe = policy.probe()
    policy.perturb(1e-3)
    ref.on_step(1, probe)
    assert ref.version == 1
    assert not torch.equal(policy.ref_errors(ref), init_err)

    policy.perturb(1.0)
    assert _divergence(policy) > delta
    ref.on_step(2, probe)
    assert ref.version == 2 and not ref.frozen
    assert _same(ref.reference_state(), init_ref_state)  # exactly the initial weights
    assert torch.equal(policy.ref_errors(ref), init_err)

    # periodic updates go on once the policy is back inside the bound
    policy.set_weights(policy.init_weights)
    policy.perturb(1e-3)
    ref.on_step(3, probe)
    assert ref.version == 3 and not ref.frozen
    assert torch.equal(policy.ref_errors(ref), policy.errors())


# ------------------------------------------------------------------ divergence estimate


def test_estimate_reference_kl_is_mean_error_difference():
    p = Policy(lora=False)
    init = build_tiny_bundle("sd15", seed=0).unet.eval()
    other = build_tiny_bundle("sd15", seed=0).unet.eval()
    with torch.no_grad():
        for q in other.parameters():
            q.add_(0.05 * torch.randn_like(q))

    def errs(unet):
        return lambda x, t, y: p.denoiser.errors(unet, x, t, p.cond, y)

    with torch.no_grad():
        e_ref = p.denoiser.errors(other, p.noisy, p.timesteps, p.cond, p.target)
        e_init = p.denoiser.errors(init, p.noisy, p.timesteps, p.cond, p.target)
    by_hand = float(sum(float(a) - float(b) for a, b in zip(e_ref, e_init)) / len(e_ref))
    est = estimate_reference_kl(errs(other), errs(init), p.noisy, p.timesteps, p.target)
    assert isinstance(est, float)
    assert est == pytest.approx(by_hand, abs=1e-6)
    assert abs(est) > 1e-4
    same = estimate_reference_kl(errs(init), errs(init), p.noisy, p.timesteps, p.target)
    assert same == 0.0


# ------------------------------------------------------------------ checkpoint state


@pytest.mark.parametrize("strategy", ["periodic", "periodic_threshold"])
def test_state_dict_round_trip(policy, strategy):
    ref = policy.reference(strategy, tau=1, delta=0.5)
    policy.perturb(1e-3)
    ref.on_step(1, policy.probe())
    policy.perturb(1e-3)
    ref.on_step(2, policy.probe())
    state = ref.state_dict()
    expected_err = policy.ref_errors(ref)

    fresh = Policy(lora=policy.lora)
    other = fresh.reference(strategy, tau=1, delta=0.5)
    assert not torch.equal(fresh.ref_errors(other), expected_err)
    other.load_state_dict(state)
    assert other.version == ref.version == 2
    assert other.frozen == ref.frozen
    assert other.last_divergence == ref.last_divergence
    assert _same(other.reference_state(), ref.reference_state())
    assert torch.equal(fresh.ref_errors(other), expected_err)


# ------------------------------------------------------------------ half-precision reference copy


def test_resolve_reference_dtype_and_config_field():
    from diffalign.config import ConfigError, load_config
    from diffalign.models.precision import resolve_reference_dtype

    assert resolve_reference_dtype("auto", "bf16", "cpu") == torch.float32
    assert resolve_reference_dtype("auto", "bf16", "cuda") == torch.bfloat16
    assert resolve_reference_dtype("auto", "fp16", torch.device("cuda", 0)) == torch.float16
    assert resolve_reference_dtype("auto", "no", "cuda") == torch.float32
    assert resolve_reference_dtype("bf16", "no", "cpu") == torch.bfloat16
    with pytest.raises(ConfigError, match=r"reference\.dtype"):
        load_config(None, ["reference.dtype=fp8"])


def test_bf16_reference_copy_serves_float32_errors_and_casts_updates():
    p = Policy(lora=False)
    fp32 = p.reference("periodic", tau=1)
    bf16 = p.reference("periodic", tau=1, dtype=torch.bfloat16)
    assert {q.dtype for q in bf16.ref_unet.parameters()} == {torch.bfloat16}
    assert {q.dtype for q in p.unet.parameters()} == {torch.float32}  # the policy is untouched
    err16, err32 = p.ref_errors(bf16), p.ref_errors(fp32)
    assert err16.dtype == torch.float32
    assert not torch.equal(err16, err32)
    assert torch.allclose(err16, err32, rtol=2e-3)

    p.perturb(0.05)
    bf16.on_step(1, None)
    policy_state = p.unet.state_dict()
    for name, value in bf16.ref_unet.state_dict().items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, policy_state[name].to(torch.bfloat16)), name
    # the checkpointed reference is the bf16 copy and loads back bit for bit
    other = Policy(lora=False).reference("periodic", tau=1, dtype=torch.bfloat16)
    other.load_state_dict(bf16.state_dict())
    assert torch.equal(p.ref_errors(other), p.ref_errors(bf16))


def test_bf16_threshold_reference_estimates_the_same_divergence():
    p = Policy(lora=False)
    refs = {dt: p.reference("periodic_threshold", tau=1, delta=1.0, dtype=dt)
            for dt in (torch.float32, torch.bfloat16)}
    assert {q.dtype for q in refs[torch.bfloat16].init_unet.parameters()} == {torch.bfloat16}
    refs[torch.bfloat16].on_step(1, p.probe())
    assert refs[torch.bfloat16].last_divergence == 0.0  # policy == init: computed the same way
    p.perturb(0.02)
    for ref in refs.values():
        ref.on_step(2, p.probe())
    d32, d16 = refs[torch.float32].last_divergence, refs[torch.bfloat16].last_divergence
    assert abs(d32) > 5e-3
    assert d16 == pytest.approx(d32, abs=2e-3)


def test_lora_reference_ignores_the_dtype():
    p = Policy(lora=True)
    ref = p.reference("periodic", tau=1, dtype=torch.bfloat16)
    assert ref.dtype is None and ref.ref_unet is None
    assert {v.dtype for v in ref.reference_state().values()} == {torch.float32}


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_bf16_reference_step_losses(tiny_cfg, mixed_precision):
    from diffalign.train.driver import build_trainer

    base = ("objective.beta=500", "data.num_pairs=8", "optim.batch_size=4",
            f"model.mixed_precision={mixed_precision}")
    runs = {}
    for dtype in ("fp32", "bf16"):
        trainer = build_trainer(tiny_cfg(*base, f"reference.dtype={dtype}"))
        ref_params = {q.dtype for q in trainer.setup.reference.ref_unet.parameters()}
        assert ref_params == {torch.bfloat16 if dtype == "bf16" else torch.float32}
        batch = trainer._micro_batch(0)
        res = trainer.setup.step(trainer.engine.forward_module, batch, torch.Generator().manual_seed(0))
        assert res.loss.dtype == torch.float32  # the objective runs in float32 under autocast too
        first = {**res.out.metrics, "loss": float(res.loss.detach())}
        runs[dtype] = [first, trainer.train_step()]
    for m16, m32 in zip(runs["bf16"], runs["fp32"]):
        assert math.isfinite(m16["loss"])
        if mixed_precision == "bf16":
            # autocast already rounds the fp32 copy's weights to bf16: the bf16 copy changes nothing
            for key in ("loss", "ref_mse_w", "ref_mse_l"):
                assert m16[key] == pytest.approx(m32[key], rel=1e-6), key
        else:
            assert m16["loss"] == pytest.approx(m32["loss"], abs=0.05)
            assert m16["ref_mse_w"] == pytest.approx(m32["ref_mse_w"], rel=1e-3)


# ------------------------------------------------------------------ asynchronous reference requests


def test_step_requests_reference_errors_before_the_policy_forward(tiny_cfg):
    from diffalign.reference import PendingErrors
    from diffalign.train.driver import build_trainer

    trainer = build_trainer(tiny_cfg("data.num_pairs=4", "optim.batch_size=2"))
    step, unet = trainer.setup.step, trainer.engine.forward_module
    batch = trainer._micro_batch(0)
    plain = step(unet, batch, torch.Generator().manual_seed(3))
    events: list[str] = []
    inner = step.reference

    class Recording:
        def request_errors(self, *args):
            events.append("request")
            pending = inner.request_errors(*args)
            return PendingErrors(lambda: (events.append("result"), pending.result())[1])

    hook = unet.register_forward_pre_hook(lambda *a: events.append("policy forward"))
    step.reference = Recording()
    try:
        res = step(unet, batch, torch.Generator().manual_seed(3))
    finally:
        step.reference = inner
        hook.remove()
    assert events == ["request", "policy forward", "result"]
    assert torch.equal(res.loss, plain.loss)
    assert res.out.metrics == plain.out.metrics
