"""The contract of the one training step (`diffalign.train.step.PreferenceStep`), checked on what a
recording UNet saw: one policy forward over the 2B images of B pairs; the same noise and timestep for
the chosen and the rejected image of a pair (and different ones across pairs); reference errors under
no_grad on the very same noisy inputs; float32 errors into the objective. Deliberately broken steps
show the checks catch each violation. Also: SFT skips the rejected half unless its diagnostic is on,
and accuracies count a tie as half."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from diffalign.data.collate import collate_pairs
from diffalign.models.conditioning import Conditioning
from diffalign.models.denoiser import Denoiser
from diffalign.objectives import DPOObjective, SFTObjective, build_objective
from diffalign.reference import build_reference
from diffalign.reference.policies import PendingErrors
from diffalign.timesteps import UniformTimesteps
from diffalign.train.driver import build_trainer
from diffalign.train.step import PairBatch, PreferenceStep, make_batch
from diffusers import DDPMScheduler

B, C, H, W, T = 4, 4, 8, 8, 1000


@dataclass
class _Out:
    sample: torch.Tensor


class RecordingUNet(torch.nn.Module):
    """The UNet call signature; prediction = scale * x + bias (per element, so a sample's output does
    not depend on the batch it is in). Records every call's inputs and whether grad was enabled."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.75))
        self.bias = torch.nn.Parameter(torch.linspace(-0.1, 0.1, C).view(C, 1, 1))
        self.calls: list[dict] = []

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, **_):
        self.calls.append({"sample": sample.detach().clone(), "timestep": timestep.detach().clone(),
                           "cond": encoder_hidden_states.detach().clone(), "grad": torch.is_grad_enabled()})
        return _Out(self.scale * sample + self.bias.to(sample.dtype))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """What forward computes, written again in float64 for the independent error check."""
        return self.scale.detach().double() * x.double() + self.bias.detach().double()


class SpyObjective:
    """Wraps an objective and keeps the arguments of every call."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []
        self.name, self.needs_reference = inner.name, inner.needs_reference
        self.uses_rejected = inner.uses_rejected

    def __call__(self, err_w, err_l, ref_err_w=None, ref_err_l=None, weight=None):
        self.calls.append({"err_w": err_w, "err_l": err_l, "ref_err_w": ref_err_w, "ref_err_l": ref_err_l})
        return self.inner(err_w, err_l, ref_err_w, ref_err_l, weight=weight)


class LazyReference:
    """A reference computing when read, with no no_grad of its own: the step must provide it."""

    def __init__(self, unet: RecordingUNet, denoiser: Denoiser, eager: bool = False,
                 force_grad: bool = False) -> None:
        self.unet, self.denoiser, self.eager, self.force_grad = unet, denoiser, eager, force_grad

    def _errors(self, noisy, timesteps, cond, target):
        if self.force_grad:  # a broken reference: builds a graph through its copy
            with torch.enable_grad():
                return self.denoiser.errors(self.unet, noisy, timesteps, cond, target)
        return self.denoiser.errors(self.unet, noisy, timesteps, cond, target)

    def request_errors(self, noisy, timesteps, cond, target) -> PendingErrors:
        if self.eager:  # computes at the request (before the policy forward), like a remote actor
            value = self._errors(noisy, timesteps, cond, target)
            return PendingErrors(lambda: value)
        return PendingErrors(lambda: self._errors(noisy, timesteps, cond, target))


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon")


def pair_batch(seed: int = 0) -> PairBatch:
    g = torch.Generator().manual_seed(seed)
    chosen, rejected = torch.randn(B, C, H, W, generator=g), torch.randn(B, C, H, W, generator=g)
    cond = Conditioning(torch.randn(B, 5, 16, generator=g))
    return PairBatch(chosen, rejected, cond, [f"p{i}" for i in range(B)])


def make_step(objective, denoiser: Denoiser | None = None, reference=None, autocast_dtype=None):
    denoiser = denoiser or Denoiser(scheduler())
    return PreferenceStep(denoiser, objective, reference, UniformTimesteps(T), torch.ones(T),
                          autocast_dtype=autocast_dtype)


def recovered_noise(call: dict, batch: PairBatch, sched: DDPMScheduler) -> torch.Tensor:
    """eps from x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, solved with the known clean latents."""
    x0 = torch.cat([batch.chosen, batch.rejected]).double()
    abar = sched.alphas_cumprod.double()[call["timestep"]].view(-1, 1, 1, 1)
    return (call["sample"].double() - abar.sqrt() * x0) / (1 - abar).sqrt()


def violations(policy: RecordingUNet, reference: RecordingUNet | None, batch: PairBatch,
               sched: DDPMScheduler) -> list[str]:
    """Every way the recorded calls break the step contract (empty: none)."""
    out = []
    if len(policy.calls) != 1:
        return [f"{len(policy.calls)} policy forwards, expected 1"]
    call = policy.calls[0]
    if call["sample"].shape[0] != 2 * B:
        out.append(f"policy forward over {call['sample'].shape[0]} samples, expected {2 * B}")
        return out
    if not call["grad"]:
        out.append("policy forward without grad")
    t = call["timestep"]
    if not torch.equal(t[:B], t[B:]):
        out.append("chosen and rejected timesteps differ")
    if len(set(t[:B].tolist())) == 1:
        out.append("one timestep for every pair")
    eps = recovered_noise(call, batch, sched)
    if not torch.allclose(eps[:B], eps[B:], atol=1e-4):
        out.append("chosen and rejected noise differ")
    flat = eps[:B].flatten(1)
    if any(torch.allclose(flat[i], flat[j], atol=1e-3) for i in range(B) for j in range(i + 1, B)):
        out.append("two pairs share their noise")
    if not torch.equal(call["cond"][:B], call["cond"][B:]):
        out.append("chosen and rejected conditioning differ")
    if reference is not None:
        if len(reference.calls) != 1:
            out.append(f"{len(reference.calls)} reference forwards, expected 1")
        else:
            ref = reference.calls[0]
            if ref["grad"]:
                out.append("reference computed with grad enabled")
            for key in ("sample", "timestep", "cond"):
                if not torch.equal(ref[key], call[key]):
                    out.append(f"reference {key} differs from the policy's")
    return out


# ---- the real step satisfies the contract ---------------------------------------------------------


@pytest.mark.parametrize("reference_kind", ["frozen", "lazy", "eager"])
def test_step_contract_holds(reference_kind):
    sched = scheduler()
    denoiser = Denoiser(sched)
    policy = RecordingUNet()
    if reference_kind == "frozen":
        reference = build_reference("frozen", policy, denoiser)  # a deep copy: its own record
        ref_unet = reference.ref_unet
    else:
        ref_unet = RecordingUNet()
        with torch.no_grad():
            ref_unet.scale.fill_(0.7)
        reference = LazyReference(ref_unet, denoiser, eager=reference_kind == "eager")
    spy = SpyObjective(DPOObjective(beta=10.0))
    batch = pair_batch()
    res = make_step(spy, denoiser, reference)(policy, batch, torch.Generator().manual_seed(3))
    assert violations(policy, ref_unet, batch, sched) == []

    # The objective's inputs, recomputed from the recorded call: float32 per-sample MSEs.
    (args,) = spy.calls
    call = policy.calls[0]
    eps = recovered_noise(call, batch, sched)
    want = (policy.predict(call["sample"]) - eps).pow(2).flatten(1).mean(1)
    for key in ("err_w", "err_l", "ref_err_w", "ref_err_l"):
        assert args[key].dtype == torch.float32 and args[key].shape == (B,), key
    torch.testing.assert_close(args["err_w"].double(), want[:B], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(args["err_l"].double(), want[B:], rtol=1e-4, atol=1e-6)
    assert args["err_w"].requires_grad and not args["ref_err_w"].requires_grad
    torch.testing.assert_close(res.timesteps, call["timestep"][:B])
    res.loss.backward()  # one graph through the single policy forward
    assert policy.scale.grad is not None and torch.isfinite(policy.scale.grad)


def test_objective_gets_float32_errors_under_bf16():
    sched = scheduler()
    policy = RecordingUNet().to(torch.bfloat16)
    ref_unet = RecordingUNet().to(torch.bfloat16)
    spy = SpyObjective(DPOObjective(beta=10.0))
    batch = pair_batch(1)
    step = make_step(spy, Denoiser(sched), LazyReference(ref_unet, Denoiser(sched)), torch.bfloat16)
    res = step(policy, batch, torch.Generator().manual_seed(0))
    assert policy.calls[0]["sample"].dtype == torch.bfloat16  # the forward really ran in bf16
    assert {v.dtype for v in spy.calls[0].values()} == {torch.float32}
    assert res.loss.dtype == torch.float32


# ---- the checks catch a broken step -------------------------------------------------------------


class UnsharedNoise(Denoiser):
    """Broken: the rejected images get noise of their own."""

    def noisy_and_target(self, latents, noise, timesteps):
        half = noise.shape[0] // 2
        noise = torch.cat([noise[:half], torch.randn_like(noise[half:])])
        return super().noisy_and_target(latents, noise, timesteps)


class UnsharedTimesteps(Denoiser):
    """Broken: the rejected images are noised and denoised at another timestep."""

    @staticmethod
    def _shift(t: torch.Tensor) -> torch.Tensor:
        half = t.shape[0] // 2
        return torch.cat([t[:half], (t[half:] + 17) % T])

    def noisy_and_target(self, latents, noise, timesteps):
        return super().noisy_and_target(latents, noise, self._shift(timesteps))

    def errors(self, unet, noisy, timesteps, cond, target):
        return super().errors(unet, noisy, self._shift(timesteps), cond, target)


class SplitForward(Denoiser):
    """Broken: one policy forward for the chosen half and another for the rejected half."""

    def errors(self, unet, noisy, timesteps, cond, target):
        h = noisy.shape[0] // 2
        parts = [super(SplitForward, self).errors(unet, noisy[s], timesteps[s], cond.index(s), target[s])
                 for s in (slice(0, h), slice(h, None))]
        return torch.cat(parts)


@pytest.mark.parametrize("broken, expected", [
    ("noise", "chosen and rejected noise differ"),
    ("timesteps", "chosen and rejected timesteps differ"),
    ("split", "2 policy forwards, expected 1"),
    ("reference_grad", "reference computed with grad enabled"),
])
def test_a_broken_step_is_caught(broken, expected):
    sched = scheduler()
    denoiser = {"noise": UnsharedNoise, "timesteps": UnsharedTimesteps, "split": SplitForward}.get(
        broken, Denoiser)(sched)
    policy, ref_unet = RecordingUNet(), RecordingUNet()
    reference = LazyReference(ref_unet, denoiser, force_grad=broken == "reference_grad")
    batch = pair_batch(2)
    make_step(DPOObjective(beta=10.0), denoiser, reference)(policy, batch, torch.Generator().manual_seed(5))
    found = violations(policy, ref_unet, batch, sched)
    assert expected in found, found


# ---- SFT: the rejected half only for its diagnostic ---------------------------------------------


def test_sft_runs_the_policy_over_the_chosen_images_only_by_default():
    sched = scheduler()
    batch = pair_batch(4)
    plain, diag = RecordingUNet(), RecordingUNet()
    res = make_step(build_objective("sft"), Denoiser(sched))(plain, batch, torch.Generator().manual_seed(1))
    res_d = make_step(build_objective("sft", rejected_diagnostic=True), Denoiser(sched))(
        diag, batch, torch.Generator().manual_seed(1))

    assert [c["sample"].shape[0] for c in plain.calls] == [B]
    assert [c["sample"].shape[0] for c in diag.calls] == [2 * B]
    assert violations(diag, None, batch, sched) == []  # with the diagnostic, the shared 2B forward
    # The chosen half is the same draw either way, so the loss is too: mean chosen error, unweighted.
    torch.testing.assert_close(plain.calls[0]["sample"], diag.calls[0]["sample"][:B])
    call = plain.calls[0]
    x0 = batch.chosen.double()
    abar = sched.alphas_cumprod.double()[call["timestep"]].view(-1, 1, 1, 1)
    eps = (call["sample"].double() - abar.sqrt() * x0) / (1 - abar).sqrt()
    want = (plain.predict(call["sample"]) - eps).pow(2).flatten(1).mean(1).mean()
    torch.testing.assert_close(res.loss.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(res.loss, res_d.loss)
    # Without rejected errors there is no margin to report; with them, err_l - err_w.
    assert res.out.margin.shape == (0,)
    assert not {"implicit_acc", "margin_mean", "mse_l"} & set(res.out.metrics)
    assert {"implicit_acc", "margin_mean", "mse_l"} <= set(res_d.out.metrics)
    assert res_d.out.margin.shape == (B,)


def test_sft_needs_err_l_only_with_its_diagnostic():
    err = torch.rand(3)
    assert SFTObjective()(err, None).loss == pytest.approx(float(err.mean()))
    with pytest.raises(ValueError, match="err_l"):
        SFTObjective(rejected_diagnostic=True)(err, None)
    with pytest.raises(ValueError, match="err_l"):
        DPOObjective()(err, None, err, err)
    with pytest.raises(ValueError, match="rejected_diagnostic"):
        SFTObjective(rejected_diagnostic="yes")


class ForwardSizes:
    """Forward pre-hook counting the batch size of every call of a module, and whether grad was on."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls: list[tuple[int, bool]] = []
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.calls.append((args[0].shape[0], torch.is_grad_enabled()))


@pytest.mark.parametrize("objective, want", [
    (["objective.name=sft", "reference.strategy=none"], [(4, True)]),
    (["objective.name=sft", "objective.rejected_diagnostic=true", "reference.strategy=none"], [(8, True)]),
    (["objective.name=dpo", "reference.strategy=frozen"], [(8, True)]),
])
def test_trainer_forwards_per_step(tiny_cfg, objective, want):
    """Through the real trainer and tiny UNet: policy forwards (batch size, grad) of one step."""
    trainer = build_trainer(tiny_cfg(*objective, "optim.batch_size=4"))
    policy = ForwardSizes(trainer.setup.bundle.unet)
    ref_unet = getattr(trainer.setup.reference, "ref_unet", None)
    ref = ForwardSizes(ref_unet) if ref_unet is not None else None
    metrics = trainer.train_step()
    assert policy.calls == want
    if ref is not None:
        assert ref.calls == [(8, False)]
    if want == [(4, True)]:  # no rejected errors: no margin, no per-timestep accuracy
        assert "implicit_acc" not in metrics and trainer.bins.metrics() == {}
    else:
        assert 0.0 <= metrics["implicit_acc"] <= 1.0 and trainer.bins.metrics()


# ---- ties count half ----------------------------------------------------------------------------


def test_a_policy_equal_to_its_reference_logs_half_accuracy(tiny_cfg):
    """DPO's first step: policy == frozen reference, every margin exactly 0 -> 0.5, not 0.0."""
    trainer = build_trainer(tiny_cfg())
    raw = collate_pairs([trainer.train_data[i] for i in range(4)])
    batch = make_batch(raw, trainer.setup.prompt_encoder, trainer.setup.latent_encoder, "cpu")
    res = trainer.setup.step(trainer.engine.forward_module, batch, torch.Generator().manual_seed(0))
    assert torch.count_nonzero(res.out.margin) == 0
    assert res.out.metrics["implicit_acc"] == 0.5
    # control: pairs 2 and 3 with a lower chosen error than the reference's are right, not half
    err = torch.full((4,), 0.5)
    lower = torch.tensor([0.5, 0.5, 0.4, 0.4])
    acc = DPOObjective()(lower, err, err, err).metrics["implicit_acc"]
    assert acc == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)


def test_heldout_policy_preference_counts_ties_half(tiny_cfg):
    """Held-out pairs whose two images are identical: err_w == err_l for every pair."""
    from diffalign.data.synthetic import SyntheticPairs
    from diffalign.train.heldout import HeldoutEvaluator

    class SameImages(SyntheticPairs):
        def __getitem__(self, idx):
            item = super().__getitem__(idx)
            return {**item, "rejected": item["chosen"].clone()}

    trainer = build_trainer(tiny_cfg("objective.name=mapo", "reference.strategy=none"))
    same = HeldoutEvaluator(trainer.setup, SameImages(4, 32, seed=3))
    ew, el = same._errors()
    assert torch.equal(ew, el)
    got = same.evaluate()
    assert got["heldout/policy_pref_acc"] == 0.5 and got["heldout/implicit_acc"] == 0.5
    # control: distinct images, no ties: the fraction of pairs with the lower chosen error
    other = HeldoutEvaluator(trainer.setup, SyntheticPairs(4, 32, seed=3))
    ew, el = other._errors()
    assert torch.count_nonzero(ew == el) == 0
    assert other.evaluate()["heldout/policy_pref_acc"] == pytest.approx(float((ew < el).float().mean()))
