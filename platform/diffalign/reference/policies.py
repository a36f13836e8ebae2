"""Reference policies for the reference-based objectives (DPO, xDPO).

One interface, four strategies:
- `none`: no reference (MaPO, SFT).
- `frozen`: the initial model, as in Diffusion-DPO (Wallace et al.).
- `periodic`: every `tau` optimizer steps the reference is replaced by the current policy.
- `periodic_threshold`: Kang et al. (AAAI 2026): like `periodic`, but each replacement is checked
  against the drift from the initial model (eq. 8 or its non-negative variant, `divergence.py`),
  estimated on a fixed probe set pooled over all data-parallel ranks, so every rank takes the
  same decision and holds the same reference.

What is checked, and what happens past the bound. The paper bounds "the divergence of the current
reference model p_ref" from p_init and, past δ, freezes the reference "near the δ-boundary", or
(Sec. 4, Table 3) re-initializes it to the pre-trained model. We check the reference-to-be: every
`tau` steps the drift of the *candidate* (the current policy) is estimated before it is adopted.
- Within δ: the candidate becomes the reference.
- Past δ, `on_exceed="freeze"`: the reference keeps the last copy that was inside the bound and
  never moves again, so every reference the loss ever uses is within δ (reading the paper's words
  literally, checking the current reference, would keep the first copy past δ instead).
- Past δ, `on_exceed="reinit"`: the reference is reset to the initial model, and the periodic
  checks go on, again on the candidate. While the policy stays out of bound every later check
  finds it out again and the reference stays the initial model (a no-op: the version does not
  change), i.e. reinit behaves like Diffusion-DPO's frozen reference until the policy comes back
  within δ, when it is adopted again. This matches the paper's account of re-init ("the strong
  constraint of the initial model restricts exploration"); checking the current reference instead
  would alternate between the initial model and an out-of-bound policy every `tau` steps.
A non-finite estimate counts as out of bound (such a policy is never adopted).

Storage is chosen for memory: a LoRA policy keeps the reference as a copy of the adapter tensors
(kilobytes) and the initial model is simply the policy with adapters disabled; a full fine-tune
keeps a frozen copy of the UNet (plus a copy of the initial UNet for `periodic_threshold`), in
`dtype` (`reference.dtype`: bf16 / fp16 halve it). Half-precision copies run under autocast to
their dtype, and so does the fp32 policy when `periodic_threshold` compares it with the initial
copy, so the drift estimate compares two models computed the same way. Errors are always the
float32 MSE of the prediction.

`request_errors` is the asynchronous form of `errors`: it returns a `PendingErrors` whose
`result()` gives the errors. Here the forward runs when the result is read; a reference served by
another process (a Ray actor) starts computing at the request, so the step overlaps it with the
policy forward.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import contextmanager

import torch

from diffalign.models.conditioning import Conditioning
from diffalign.models.denoiser import Denoiser, per_sample_mse
from diffalign.models.precision import autocast
from diffalign.models.weights import check_state_dict, is_lora_model, trainable_state_dict
from diffalign.reference.divergence import (
    PROBE_CHUNK,
    Estimate,
    data_parallel_world,
    fix_probe,
    gather_probe,
    per_sample_divergences,
    pooled_estimates,
)
from diffalign.reference.names import (
    DEFAULT_DELTA,
    DEFAULT_DIVERGENCE,
    DEFAULT_ON_EXCEED,
    DEFAULT_TAU,
    DIVERGENCES,
    ON_EXCEED,
    STRATEGIES,
)


class PendingErrors:
    """Reference errors asked for now and read later with `result()` (computed at most once)."""

    def __init__(self, compute: Callable[[], torch.Tensor | None]) -> None:
        self._compute = compute
        self._done = False
        self._value: torch.Tensor | None = None

    def result(self) -> torch.Tensor | None:
        if not self._done:
            self._value, self._done, self._compute = self._compute(), True, None
        return self._value


class ReferencePolicy:
    """Serves per-sample reference errors and decides when the reference changes."""

    strategy = "none"
    needs_probe = False  # True: the step must pass chosen latents to `on_step` (periodic_threshold)

    def __init__(self) -> None:
        self.version = 0
        self.frozen = self.strategy in ("none", "frozen")
        self.last_divergence: float | None = None

    @property
    def active(self) -> bool:
        return self.strategy != "none"

    def errors(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
               target: torch.Tensor) -> torch.Tensor | None:
        return None

    def request_errors(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                       target: torch.Tensor) -> PendingErrors:
        """`errors` of these inputs, computed when the result is read (in the caller's context)."""
        return PendingErrors(lambda: self.errors(noisy, timesteps, cond, target))

    def on_step(self, step: int, probe: dict | None = None,
                world_size: int | None = None) -> dict[str, float]:
        """Called after optimizer step `step` (1-based) on every rank; returns metrics to log.
        `world_size`: the trainer's data-parallel size (see `divergence.data_parallel_world`)."""
        return self.metrics()

    def metrics(self) -> dict[str, float]:
        out = {"ref/version": float(self.version), "ref/frozen": float(self.frozen)}
        if self.last_divergence is not None:
            out["ref/divergence"] = self.last_divergence
        return out

    def state_dict(self) -> dict:
        return {"version": self.version, "frozen": self.frozen, "last_divergence": self.last_divergence}

    def load_state_dict(self, state: dict) -> None:
        self.version = int(state["version"])
        self.frozen = bool(state["frozen"])
        self.last_divergence = state.get("last_divergence")


class NoReference(ReferencePolicy):
    strategy = "none"


class ModelReference(ReferencePolicy):
    """A reference model tied to a policy UNet (LoRA or full fine-tune)."""

    strategy = "frozen"

    def __init__(self, policy_unet: torch.nn.Module, denoiser: Denoiser, tau: int = DEFAULT_TAU,
                 delta: float = DEFAULT_DELTA, on_exceed: str = DEFAULT_ON_EXCEED,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.policy = policy_unet
        self.denoiser = denoiser
        self.tau, self.delta, self.on_exceed = int(tau), float(delta), on_exceed
        self.lora = is_lora_model(policy_unet)
        # Adapter tensors are kilobytes: a LoRA reference keeps the policy's dtype.
        self.dtype = None if self.lora or dtype in (None, torch.float32) else dtype
        if self.lora:
            # Adapter tensors only: the init model is the policy with adapters disabled.
            self.ref_state = trainable_state_dict(policy_unet)
            self.init_state = {k: v.clone() for k, v in self.ref_state.items()}
            self.ref_unet = None
            self.init_unet = None
        else:
            self.ref_unet = self._frozen_copy(policy_unet)
            self.init_unet = (
                self._frozen_copy(policy_unet) if self.strategy == "periodic_threshold" else None
            )

    def _frozen_copy(self, unet: torch.nn.Module) -> torch.nn.Module:
        ref = copy.deepcopy(unet)
        ref.requires_grad_(False)
        ref.eval()
        if self.dtype is not None:
            # nn.Module.to skips diffusers' warning about casting (the UNet keeps no module in float32)
            torch.nn.Module.to(ref, self.dtype)
        return ref

    def _compute(self, device: torch.device):
        """Autocast to a half-precision reference dtype (see module docstring), else as the caller runs."""
        return autocast(device, self.dtype)

    @contextmanager
    def _policy_with(self, state: dict[str, torch.Tensor] | None):
        """Temporarily run the LoRA policy with other adapter weights (or adapters off)."""
        if state is None:
            self.policy.disable_adapters()
            try:
                yield self.policy
            finally:
                self.policy.enable_adapters()
            return
        # Swap the tensors behind the parameters instead of copying into them: an in-place copy
        # would corrupt the autograd graph of a policy forward that is still waiting for backward.
        check_state_dict(self.policy, state)
        params = dict(self.policy.named_parameters())
        saved = {name: params[name].data for name in state}
        try:
            for name, value in state.items():
                params[name].data = value.to(params[name].device, params[name].dtype)
            yield self.policy
        finally:
            for name, value in saved.items():
                params[name].data = value

    @torch.no_grad()
    def errors(self, noisy, timesteps, cond, target):
        if self.lora:
            # Gradient checkpointing and dropout must not change the reference: eval + no_grad.
            was_training = self.policy.training
            self.policy.eval()
            try:
                with self._policy_with(self.ref_state) as unet:
                    return self.denoiser.errors(unet, noisy, timesteps, cond, target)
            finally:
                self.policy.train(was_training)
        with self._compute(noisy.device):
            return self.denoiser.errors(self.ref_unet, noisy, timesteps, cond, target)

    @torch.no_grad()
    def _init_predict(self, noisy, timesteps, cond):
        if self.lora:
            was_training = self.policy.training
            self.policy.eval()
            try:
                with self._policy_with(None) as unet:
                    return self.denoiser.predict(unet, noisy, timesteps, cond)
            finally:
                self.policy.train(was_training)
        with self._compute(noisy.device):
            return self.denoiser.predict(self.init_unet, noisy, timesteps, cond)

    @torch.no_grad()
    def _candidate_predict(self, noisy, timesteps, cond):
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self._compute(noisy.device):
                return self.denoiser.predict(self.policy, noisy, timesteps, cond)
        finally:
            self.policy.train(was_training)

    def _init_errors(self, noisy, timesteps, cond, target):
        return per_sample_mse(self._init_predict(noisy, timesteps, cond), target)

    def _candidate_errors(self, noisy, timesteps, cond, target):
        return per_sample_mse(self._candidate_predict(noisy, timesteps, cond), target)

    def _adopt_policy(self) -> None:
        if self.lora:
            self.ref_state = trainable_state_dict(self.policy)
        else:
            self.ref_unet.load_state_dict(self.policy.state_dict())  # copies cast into the reference dtype
        self.version += 1

    def reset_to_init(self) -> None:
        if self.lora:
            self.ref_state = {k: v.clone() for k, v in self.init_state.items()}
        else:
            self.ref_unet.load_state_dict(self.init_unet.state_dict())
        self.version += 1

    def reference_state(self) -> dict[str, torch.Tensor]:
        """The reference weights (adapter tensors or full UNet state) for checkpoints and sync."""
        if self.lora:
            return dict(self.ref_state)
        return {k: v.detach().cpu() for k, v in self.ref_unet.state_dict().items()}

    def load_reference_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.lora:
            self.ref_state = {k: v.clone() for k, v in state.items()}
        else:
            self.ref_unet.load_state_dict(state)

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["weights"] = self.reference_state()
        return out

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.load_reference_state(state["weights"])


class FrozenReference(ModelReference):
    strategy = "frozen"


class PeriodicReference(ModelReference):
    strategy = "periodic"

    def on_step(self, step: int, probe: dict | None = None,
                world_size: int | None = None) -> dict[str, float]:
        if not self.frozen and step % self.tau == 0:
            self._adopt_policy()
        return self.metrics()


class ThresholdReference(ModelReference):
    """`periodic_threshold` (see module docstring for what is checked and what happens past δ).

    `divergence` picks the estimator compared with its bound (`delta` for signed, `delta_eps_mse`
    or else `delta` for eps_mse); both are computed and logged. The probe set is fixed at the first
    step a full one is passed (gathered over ranks) and kept in the state. `sync_ranks=False`
    makes each rank decide from its own probe alone: only to see what that would do.
    """

    strategy = "periodic_threshold"
    needs_probe = True

    def __init__(self, policy_unet: torch.nn.Module, denoiser: Denoiser, tau: int = DEFAULT_TAU,
                 delta: float = DEFAULT_DELTA, on_exceed: str = DEFAULT_ON_EXCEED,
                 dtype: torch.dtype | None = None, divergence: str = DEFAULT_DIVERGENCE,
                 delta_eps_mse: float | None = None, sync_ranks: bool = True) -> None:
        super().__init__(policy_unet, denoiser, tau=tau, delta=delta, on_exceed=on_exceed, dtype=dtype)
        self.divergence = divergence
        self.delta_eps_mse = None if delta_eps_mse is None else float(delta_eps_mse)
        self.sync_ranks = sync_ranks
        self.probe: dict | None = None
        self.estimates: dict[str, Estimate] = {}
        self.at_init = True  # the reference holds the initial weights (a reset would change nothing)

    @property
    def threshold(self) -> float:
        if self.divergence == "eps_mse" and self.delta_eps_mse is not None:
            return self.delta_eps_mse
        return self.delta

    def _world(self, world_size: int | None) -> tuple[int, int]:
        """(rank, ranks pooled over): all of them, or with sync_ranks=False this one alone."""
        rank, world = data_parallel_world(world_size)
        return (rank, world) if self.sync_ranks else (0, 1)

    def on_step(self, step: int, probe: dict | None = None,
                world_size: int | None = None) -> dict[str, float]:
        if self.probe is None and probe is not None and not self.frozen:
            # Every rank passes its first complete probe set at the same step: gather it there.
            rank, world = data_parallel_world(world_size)
            if "source_rank" not in probe and "latents" in probe:
                probe = {**probe, "source_rank": torch.full((probe["latents"].shape[0],), rank)}
            fixed = fix_probe(gather_probe(probe, world if self.sync_ranks else 1), self.denoiser)
            self.probe = _probe_to(fixed, "cpu")  # all ranks' samples: kept off the accelerator
        if self.frozen or step % self.tau != 0:
            return self.metrics()
        if self.probe is None:
            raise ValueError("periodic_threshold needs a probe batch of chosen latents to estimate "
                             "KL(ref||init) (reference.divergence_samples of them by the first check)")
        self.estimates = self.estimate(*self._world(world_size))
        div = self.estimates[self.divergence].mean
        self.last_divergence = div
        if math.isfinite(div) and div <= self.threshold:
            self._adopt_policy()
            self.at_init = False
        elif self.on_exceed == "freeze":
            self.frozen = True  # keep the last reference that was inside the δ-bound
        elif not self.at_init:
            self.reset_to_init()
            self.at_init = True
        return self.metrics()

    def estimate(self, rank: int = 0, world: int = 1) -> dict[str, Estimate]:
        """Drift of the candidate (the current policy) from the initial model on the probe set:
        this rank evaluates samples rank, rank + world, ...; the sums are pooled over `world` ranks."""
        p = self.probe
        device = next(self.policy.parameters()).device
        share = torch.arange(rank, p["noisy"].shape[0], world)
        values: dict[str, list[torch.Tensor]] = {name: [] for name in DIVERGENCES}
        for idx in share.split(PROBE_CHUNK):
            chunk = _probe_to({k: p[k][idx] for k in ("noisy", "timesteps", "target")}
                              | {"cond": p["cond"].index(idx)}, device)
            noisy, t, cond = chunk["noisy"], chunk["timesteps"], chunk["cond"]
            d = per_sample_divergences(self._candidate_predict(noisy, t, cond),
                                       self._init_predict(noisy, t, cond), chunk["target"])
            for name in DIVERGENCES:
                values[name].append(d[name])
        empty = torch.zeros(0)
        return pooled_estimates({k: torch.cat(v) if v else empty for k, v in values.items()}, world)

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        if self.estimates:
            out["ref/divergence_stderr"] = self.estimates[self.divergence].stderr
            out["ref/divergence_n"] = float(self.estimates[self.divergence].n)
            for name, e in self.estimates.items():
                out[f"ref/divergence_{name}"] = e.mean
                out[f"ref/divergence_{name}_stderr"] = e.stderr
        return out

    def state_dict(self) -> dict:
        out = super().state_dict()
        out["at_init"] = self.at_init
        out["estimates"] = {k: (e.mean, e.stderr, e.n) for k, e in self.estimates.items()}
        out["probe"] = None if self.probe is None else {
            **{k: self.probe[k].detach().cpu() for k in ("noisy", "timesteps", "target")},
            "cond": {k: v.detach().cpu() for k, v in self.probe["cond"].tensors().items()}}
        return out

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.at_init = bool(state.get("at_init", self.version == 0))
        self.estimates = {k: Estimate(*v) for k, v in state.get("estimates", {}).items()}
        saved = state.get("probe")
        self.probe = None if saved is None else {
            **{k: saved[k].cpu() for k in ("noisy", "timesteps", "target")},
            "cond": Conditioning(**saved["cond"]).to("cpu")}


def _probe_to(probe: dict, device: torch.device | str) -> dict:
    """A probe batch (tensors and a Conditioning) on `device`."""
    return {k: v.to(device) for k, v in probe.items()}


def build_reference(strategy: str, policy_unet: torch.nn.Module | None = None,
                    denoiser: Denoiser | None = None, tau: int = DEFAULT_TAU, delta: float = DEFAULT_DELTA,
                    on_exceed: str = DEFAULT_ON_EXCEED, dtype: torch.dtype | None = None,
                    divergence: str = DEFAULT_DIVERGENCE,
                    delta_eps_mse: float | None = None) -> ReferencePolicy:
    """Reference policy by name (see module docstring)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"reference.strategy must be one of {STRATEGIES}, got {strategy!r}")
    if on_exceed not in ON_EXCEED:
        raise ValueError(f"reference.on_exceed must be one of {ON_EXCEED}, got {on_exceed!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"reference.divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if strategy == "none":
        return NoReference()
    if tau < 1:
        raise ValueError(f"reference.tau must be >= 1, got {tau}")
    if strategy != "periodic_threshold":
        cls = {"frozen": FrozenReference, "periodic": PeriodicReference}[strategy]
        return cls(policy_unet, denoiser, tau=tau, delta=delta, on_exceed=on_exceed, dtype=dtype)
    if delta <= 0:
        raise ValueError(f"reference.delta must be > 0, got {delta}")
    if delta_eps_mse is not None and delta_eps_mse <= 0:
        raise ValueError(f"reference.delta_eps_mse must be > 0, got {delta_eps_mse}")
    return ThresholdReference(policy_unet, denoiser, tau=tau, delta=delta, on_exceed=on_exceed, dtype=dtype,
                              divergence=divergence, delta_eps_mse=delta_eps_mse)
