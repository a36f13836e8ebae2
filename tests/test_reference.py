"""Reference policies: frozen, periodic, periodic_threshold (freeze / reinit), the KL(ref||init)
estimates (signed, eps_mse) on the fixed probe set, checkpoint state, the drift config, and LoRA
references that keep no UNet copy. Several ranks: tests/test_reference_ranks.py."""

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
            f"model.mixed_precision={mixed_precision}", "data.latent_sampling=mean")  # fixed latents
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


# ------------------------------------------------------------------ drift estimators, probe set, pooling


def test_per_sample_divergences_match_the_formulas():
    from diffalign.reference.divergence import per_sample_divergences

    g = torch.Generator().manual_seed(0)
    pred_ref, pred_init, target = (torch.randn(5, 4, 3, 3, generator=g) for _ in range(3))
    d = per_sample_divergences(pred_ref, pred_init, target)
    for b in range(5):
        r, i, y = (x[b].flatten().tolist() for x in (pred_ref, pred_init, target))
        err_ref = sum((a - c) ** 2 for a, c in zip(r, y)) / len(y)
        err_init = sum((a - c) ** 2 for a, c in zip(i, y)) / len(y)
        eps_mse = sum((a - c) ** 2 for a, c in zip(r, i)) / len(y)
        cross = sum((a - c) * (c - e) for a, c, e in zip(r, i, y)) / len(y)
        assert float(d["signed"][b]) == pytest.approx(err_ref - err_init, rel=1e-5, abs=1e-6)
        assert float(d["eps_mse"][b]) == pytest.approx(eps_mse, rel=1e-5)
        # signed = eps_mse + 2 * cross term: the two agree where the cross term vanishes
        assert float(d["signed"][b]) == pytest.approx(eps_mse + 2 * cross, rel=1e-4, abs=1e-5)
    assert (d["signed"] < 0).any() and (d["eps_mse"] > 0).all()  # only eps_mse is non-negative
    same = per_sample_divergences(pred_init, pred_init, target)
    assert torch.equal(same["eps_mse"], torch.zeros(5)) and torch.equal(same["signed"], torch.zeros(5))


def test_pooled_estimates_mean_and_standard_error():
    import statistics

    from diffalign.reference.divergence import pooled_estimates

    values = [0.3, -0.1, 0.7, 0.2, 0.05, 0.4]
    est = pooled_estimates({"signed": torch.tensor(values)}, world=1)["signed"]
    assert est.n == 6
    assert est.mean == pytest.approx(sum(values) / 6, rel=1e-6)
    assert est.stderr == pytest.approx(statistics.stdev(values) / math.sqrt(6), rel=1e-6)
    one = pooled_estimates({"eps_mse": torch.tensor([0.5])}, world=1)["eps_mse"]
    assert one.mean == pytest.approx(0.5) and math.isnan(one.stderr)  # no standard error from one sample


def test_fix_probe_draws_fresh_uniform_timesteps_and_seeded_noise():
    from diffalign.reference.divergence import PROBE_SEED, fix_probe

    p = Policy(lora=False)
    num_t = p.bundle.num_train_timesteps
    n = 4000
    x0 = 0.5 * torch.randn(n, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    cond = p.cond.index(torch.zeros(n, dtype=torch.long))
    fixed = fix_probe({"latents": x0, "cond": cond}, p.denoiser)
    t = fixed["timesteps"]
    assert int(t.min()) >= 0 and int(t.max()) < num_t
    # uniform over all timesteps: each tenth of [0, T) holds ~n/10 (a gamma=0.9 skewed draw puts
    # ~26% in the noisiest tenth); 5 sigma of a binomial(n, 0.1)
    counts = torch.bincount(t * 10 // num_t, minlength=10).tolist()
    sigma = math.sqrt(n * 0.1 * 0.9)
    assert all(abs(c - n / 10) < 5 * sigma for c in counts), counts
    # epsilon prediction: noisy = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps and the target is eps ~ N(0, 1)
    abar = p.bundle.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = fixed["target"]
    assert torch.allclose(fixed["noisy"], abar.sqrt() * x0 + (1 - abar).sqrt() * eps, atol=1e-5)
    assert abs(float(eps.mean())) < 0.02 and abs(float(eps.std()) - 1) < 0.02
    # the generator is PROBE_SEED: timesteps first, then the noise
    g = torch.Generator().manual_seed(PROBE_SEED)
    assert torch.equal(t, torch.randint(0, num_t, (n,), generator=g))
    assert torch.equal(eps, torch.randn(x0.shape, generator=g))
    # each sample's draw depends on its own rank only: a gathered set is the union of the ranks' sets
    a, b = x0[:6], x0[6:10]
    parts = [fix_probe({"latents": a, "cond": cond.index(slice(0, 6))}, p.denoiser),
             fix_probe({"latents": b, "cond": cond.index(slice(0, 4)),
                        "source_rank": torch.ones(4, dtype=torch.long)}, p.denoiser)]
    both = fix_probe({"latents": x0[:10], "cond": cond.index(slice(0, 10)),
                      "source_rank": torch.tensor([0] * 6 + [1] * 4)}, p.denoiser)
    for key in ("noisy", "timesteps", "target"):
        assert torch.equal(both[key], torch.cat([parts[0][key], parts[1][key]])), key
    assert not torch.equal(parts[1]["target"], fixed["target"][:4])  # rank 1 draws other noise than rank 0


def test_data_parallel_world_needs_the_process_group_the_trainer_says():
    from diffalign.reference.divergence import data_parallel_world

    assert data_parallel_world(None) == (0, 1) and data_parallel_world(1) == (0, 1)
    with pytest.raises(RuntimeError, match="world_size=2"):
        data_parallel_world(2)
    p = Policy(lora=True)
    ref = p.reference("periodic_threshold", tau=1, delta=1.0)
    with pytest.raises(RuntimeError, match="not initialized"):  # never a silently per-rank decision
        ref.on_step(1, p.probe(), world_size=2)


def _fit_chosen(policy: Policy, latents: torch.Tensor, steps: int = 40, lr: float = 2e-3) -> None:
    """Denoising-loss steps on these chosen latents (fresh t and noise each step): the policy fits them."""
    params = [q for q in policy.unet.parameters() if q.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(3)
    cond = policy.cond
    for _ in range(steps):
        t = torch.randint(0, 1000, (latents.shape[0],), generator=g)
        noisy, target = policy.denoiser.noisy_and_target(latents, torch.randn(latents.shape, generator=g), t)
        loss = policy.denoiser.errors(policy.unet, noisy, t, cond, target).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_eps_mse_bounds_a_policy_that_the_signed_estimate_lets_through():
    """Kang et al.'s signed estimate goes negative when the model fits the chosen images better than
    the initial model; eps_mse is >= 0 and freezes at the same delta."""
    p = Policy(lora=False)
    latents = 0.8 * torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    probe = {"latents": latents, "cond": p.cond}
    delta = 1e-3
    signed = p.reference("periodic_threshold", tau=1, delta=delta)
    eps = p.reference("periodic_threshold", tau=1, delta=10.0, divergence="eps_mse", delta_eps_mse=delta)
    assert eps.threshold == delta and signed.threshold == delta
    _fit_chosen(p, latents)
    m_signed, m_eps = signed.on_step(1, probe), eps.on_step(1, probe)
    # both computed the two estimates on the same probe set
    assert m_signed["ref/divergence_eps_mse"] == pytest.approx(m_eps["ref/divergence_eps_mse"], rel=1e-6)
    assert m_signed["ref/divergence"] < 0 < delta < m_eps["ref/divergence"]
    assert m_signed["ref/divergence_stderr"] > 0 and m_eps["ref/divergence_stderr"] > 0
    assert signed.version == 1 and not signed.frozen  # adopted: the signed bound never triggers
    assert eps.version == 0 and eps.frozen
    # delta_eps_mse unset: the eps_mse bound is delta
    assert p.reference("periodic_threshold", delta=0.3, divergence="eps_mse").threshold == 0.3


def test_threshold_estimates_on_a_fixed_probe_set_and_checkpoints_it(policy):
    ref = policy.reference("periodic_threshold", tau=2, delta=10.0, divergence="eps_mse")
    first = {"latents": 0.3 * torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4)),
             "cond": policy.cond}
    ref.on_step(1, first)  # the first complete set is fixed at once
    fixed = {k: ref.probe[k].clone() for k in ("noisy", "timesteps", "target")}
    policy.perturb(0.02)
    other = {"latents": torch.randn(3, 4, 8, 8), "cond": policy.cond}
    m = ref.on_step(2, other)  # a later set is ignored: successive checks stay comparable
    for k, v in fixed.items():
        assert torch.equal(ref.probe[k], v), k
    # the estimate is over the first set, by hand
    with torch.no_grad():
        pol = policy.unet.eval()
        pred = p_init = None
        pred = policy.denoiser.predict(pol, fixed["noisy"], fixed["timesteps"], policy.cond)
        if policy.lora:
            pol.disable_adapters()
            p_init = policy.denoiser.predict(pol, fixed["noisy"], fixed["timesteps"], policy.cond)
            pol.enable_adapters()
        else:
            base = build_tiny_bundle("sd15", seed=0).unet.eval()
            p_init = policy.denoiser.predict(base, fixed["noisy"], fixed["timesteps"], policy.cond)
        policy.unet.train()
    per = (pred - p_init).pow(2).flatten(1).mean(1).tolist()
    assert m["ref/divergence"] == pytest.approx(sum(per) / 3, rel=1e-5)
    assert m["ref/divergence_n"] == 3.0

    state = ref.state_dict()
    fresh = Policy(lora=policy.lora)
    again = fresh.reference("periodic_threshold", tau=2, delta=10.0, divergence="eps_mse")
    fresh.set_weights(policy.weights())  # after building it: its initial model is the initial one
    again.load_state_dict(state)
    assert again.estimates == ref.estimates and again.metrics() == ref.metrics()
    assert again.at_init == ref.at_init is False
    for k, v in fixed.items():
        assert torch.equal(again.probe[k], v), k
    assert again.estimate() == ref.estimate()  # the restored set gives the same numbers


def test_threshold_reinit_stays_at_the_initial_model_while_the_policy_is_out_of_bound(policy):
    """The documented choice: the check is on the candidate; after a reset the reference stays the
    initial model (no new version) for as long as the policy stays out of bound. Checking the
    current reference instead (which, after a reset, is within the bound) would adopt the
    out-of-bound policy at the next check."""
    delta = 0.02
    init_err = policy.errors()
    # eps_mse: a random move of the weights never lowers it (the signed estimate can go either way)
    ref = policy.reference("periodic_threshold", tau=1, delta=delta, on_exceed="reinit", divergence="eps_mse")
    probe = policy.probe()
    policy.perturb(1e-3)
    ref.on_step(1, probe)
    assert ref.version == 1 and not ref.at_init
    policy.perturb(1.0)
    ref.on_step(2, probe)
    assert ref.version == 2 and ref.at_init
    for step in (3, 4, 5):
        policy.perturb(0.1)  # still out of bound
        m = ref.on_step(step, probe)
        assert m["ref/divergence"] > delta
        assert ref.version == 2 and not ref.frozen  # no reset counted, no adoption
        assert torch.equal(policy.ref_errors(ref), init_err)


def test_threshold_freeze_keeps_a_reference_within_the_bound(policy):
    delta = 0.02
    ref = policy.reference("periodic_threshold", tau=1, delta=delta, divergence="eps_mse")
    probe = policy.probe()
    for step in range(1, 40):
        policy.perturb(1e-3 * 1.3**step)  # growing moves: a few adoptions, then out of bound
        ref.on_step(step, probe)
        if ref.frozen:
            break
    assert ref.frozen and ref.version >= 2  # it adopted some policies, then froze
    # the kept reference's own drift, by hand: within the bound, the policy's beyond it
    unet = policy.unet.eval()
    p = ref.probe
    with torch.no_grad():
        if policy.lora:
            with ref._policy_with(ref.ref_state):
                kept = policy.denoiser.predict(unet, p["noisy"], p["timesteps"], p["cond"])
            unet.disable_adapters()
            init = policy.denoiser.predict(unet, p["noisy"], p["timesteps"], p["cond"])
            unet.enable_adapters()
        else:
            kept = policy.denoiser.predict(ref.ref_unet, p["noisy"], p["timesteps"], p["cond"])
            init = policy.denoiser.predict(ref.init_unet, p["noisy"], p["timesteps"], p["cond"])
    unet.train()
    assert 0 < float((kept - init).pow(2).mean()) <= delta < ref.last_divergence


# ------------------------------------------------------------------ the probe set in the step and trainer


def test_step_collects_the_first_chosen_latents_across_micro_batches(tiny_cfg):
    from diffalign.train.driver import build_trainer

    trainer = build_trainer(tiny_cfg("reference.strategy=periodic_threshold", "reference.tau=3",
                                     "reference.divergence_samples=10", "optim.batch_size=4"))
    step, unet = trainer.setup.step, trainer.engine.forward_module
    batches = [trainer._micro_batch(m) for m in range(4)]
    probes = []
    for b in batches:
        gen = torch.Generator().manual_seed(7)
        res = step(unet, b, gen)
        # the probe takes none of the step's random draws
        alone = torch.Generator().manual_seed(7)
        step.noise_and_timesteps(b, alone)
        assert torch.equal(gen.get_state(), alone.get_state())
        probes.append(res.probe)
    assert probes[0] is None and probes[1] is None
    assert probes[2] is probes[3]  # complete after 4 + 4 + 2 latents, then the same set
    expected = torch.cat([batches[0].chosen, batches[1].chosen, batches[2].chosen[:2]])
    assert torch.equal(probes[2]["latents"], expected)
    emb = torch.cat([b.cond.prompt_embeds for b in batches[:2]] + [batches[2].cond.prompt_embeds[:2]])
    assert torch.equal(probes[2]["cond"].prompt_embeds, emb)
    # a reference that checks no drift gets no probe set
    frozen = build_trainer(tiny_cfg("optim.batch_size=4"))
    assert frozen.setup.step(frozen.engine.forward_module, batches[0]).probe is None


def test_trainer_logs_the_pooled_estimate_computed_on_fresh_uniform_timesteps(tiny_cfg):
    import copy
    import statistics

    from diffalign.reference.divergence import PROBE_SEED
    from diffalign.train.driver import build_trainer

    trainer = build_trainer(tiny_cfg("reference.strategy=periodic_threshold", "reference.tau=2",
                                     "reference.delta=100", "reference.divergence_samples=6",
                                     "optim.batch_size=4", "timesteps.sampler=skewed", "optim.lr=1e-3"))
    init = copy.deepcopy(trainer.setup.bundle.unet).eval()
    m1 = trainer.train_step()
    assert "ref/divergence" not in m1
    m2 = trainer.train_step()
    for key in ("ref/divergence", "ref/divergence_stderr", "ref/divergence_signed",
                "ref/divergence_signed_stderr", "ref/divergence_eps_mse", "ref/divergence_eps_mse_stderr"):
        assert math.isfinite(m2[key]), key
    assert m2["ref/divergence_n"] == 6.0 and m2["ref/divergence"] == m2["ref/divergence_signed"]
    assert m2["ref/version"] == 1.0

    # Independently: the first 6 chosen latents, t uniform and noise from the seed, both models.
    x0 = trainer.setup.step._probe["latents"]
    cond = trainer.setup.step._probe["cond"]
    sched = trainer.setup.bundle.noise_scheduler
    g = torch.Generator().manual_seed(PROBE_SEED)
    t = torch.randint(0, 1000, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    unet = trainer.setup.bundle.unet.eval()
    with torch.no_grad():
        kw = cond.unet_kwargs()
        pred, pred0 = unet(noisy, t, **kw).sample, init(noisy, t, **kw).sample
    unet.train()
    signed = [float(((a - e) ** 2).mean() - ((b - e) ** 2).mean()) for a, b, e in zip(pred, pred0, eps)]
    eps_mse = [float(((a - b) ** 2).mean()) for a, b in zip(pred, pred0)]
    for name, vals in (("signed", signed), ("eps_mse", eps_mse)):
        assert m2[f"ref/divergence_{name}"] == pytest.approx(statistics.fmean(vals), rel=1e-4, abs=1e-7)
        assert m2[f"ref/divergence_{name}_stderr"] == pytest.approx(statistics.stdev(vals) / math.sqrt(6),
                                                                    rel=1e-4)
    # not on the training step's skewed timesteps, which sit mostly in the noisiest tenth
    assert (t < 900).sum() >= 3


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "overrides, field",
    [(["reference.divergence=kl"], "reference.divergence"),
     (["reference.delta_eps_mse=0"], "reference.delta_eps_mse"),
     (["reference.strategy=periodic_threshold", "reference.divergence_samples=1"],
      "reference.divergence_samples"),
     (["reference.strategy=periodic_threshold", "reference.tau=2", "optim.batch_size=4",
       "reference.divergence_samples=9"], "reference.divergence_samples")],
)
def test_drift_config_errors_name_the_field(overrides, field):
    from diffalign.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as err:
        load_config(None, overrides)
    if field == "reference.divergence":
        assert "signed" in str(err.value) and "eps_mse" in str(err.value)


def test_drift_config_defaults_and_shipped_configs():
    from diffalign.config import load_config
    from diffalign.reference.policies import ThresholdReference
    from diffalign.train.setup import configured_reference

    r = load_config(None, []).reference
    assert (r.divergence, r.delta_eps_mse, r.divergence_samples) == ("signed", None, 16)
    # 8 chosen latents per rank by the first check are enough for 8 samples, not for 9
    eight = ["reference.strategy=periodic_threshold", "reference.tau=2", "optim.batch_size=4",
             "reference.divergence_samples=8"]
    assert load_config(None, eight).reference.divergence_samples == 8
    for family, delta in (("sd15", 0.005), ("sdxl", 0.002), ("tiny", 0.01)):
        c = load_config(f"configs/{family}/dpo_refupdate.yaml", validate_paths=False).reference
        assert (c.strategy, c.divergence, c.delta) == ("periodic_threshold", "signed", delta)
        assert c.delta_eps_mse is None
        assert c.divergence_samples >= 16
    cfg = load_config(None, ["reference.strategy=periodic_threshold", "reference.divergence=eps_mse",
                             "reference.delta_eps_mse=0.01"])
    p = Policy(lora=True)
    ref = configured_reference(cfg, p.unet, p.denoiser, "cpu")
    assert isinstance(ref, ThresholdReference) and (ref.divergence, ref.threshold) == ("eps_mse", 0.01)
