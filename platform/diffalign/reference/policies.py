"""Reference policies for the reference-based objectives (DPO, xDPO).

One interface, four strategies:
- `none`: no reference (MaPO, SFT).
- `frozen`: the initial model, as in Diffusion-DPO (Wallace et al.).
- `periodic`: every `tau` optimizer steps the reference is replaced by the current policy.
- `periodic_threshold`: Kang et al. (AAAI 2026): like `periodic`, but before each replacement the
  candidate's drift from the initial model is estimated (eq. 8, `divergence.py`); once it passes
  `delta` the reference stops moving ("frozen near the δ-boundary": it keeps the last copy that
  was inside the bound), or with `on_exceed="reinit"` it is reset to the initial model and the
  periodic updates go on.

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
from collections.abc import Callable
from contextlib import contextmanager

import torch

from diffalign.models.conditioning import Conditioning
from diffalign.models.denoiser import Denoiser
from diffalign.models.precision import autocast
from diffalign.models.weights import check_state_dict, is_lora_model, trainable_state_dict
from diffalign.reference.divergence import estimate_reference_kl
from diffalign.reference.names import DEFAULT_DELTA, DEFAULT_ON_EXCEED, DEFAULT_TAU, ON_EXCEED, STRATEGIES


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

    def on_step(self, step: int, probe: dict | None = None) -> dict[str, float]:
        """Called after optimizer step `step` (1-based); returns metrics to log."""
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

    def _init_errors(self, noisy, timesteps, cond, target):
        if self.lora:
            was_training = self.policy.training
            self.policy.eval()
            try:
                with self._policy_with(None) as unet:
                    return self.denoiser.errors(unet, noisy, timesteps, cond, target)
            finally:
                self.policy.train(was_training)
        with self._compute(noisy.device):
            return self.denoiser.errors(self.init_unet, noisy, timesteps, cond, target)

    def _candidate_errors(self, noisy, timesteps, cond, target):
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self._compute(noisy.device):
                return self.denoiser.errors(self.policy, noisy, timesteps, cond, target)
        finally:
            self.policy.train(was_training)

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

    def on_step(self, step: int, probe: dict | None = None) -> dict[str, float]:
        if not self.frozen and step % self.tau == 0:
            self._adopt_policy()
        return self.metrics()


class ThresholdReference(ModelReference):
    strategy = "periodic_threshold"

    def on_step(self, step: int, probe: dict | None = None) -> dict[str, float]:
        if self.frozen or step % self.tau != 0:
            return self.metrics()
        if probe is None:
            raise ValueError("periodic_threshold needs a probe batch of chosen latents to estimate "
                             "KL(ref||init)")
        cond = probe["cond"]
        div = estimate_reference_kl(
            lambda x, t, y: self._candidate_errors(x, t, cond, y),
            lambda x, t, y: self._init_errors(x, t, cond, y),
            probe["noisy"], probe["timesteps"], probe["target"],
        )
        self.last_divergence = div
        if div <= self.delta:
            self._adopt_policy()
        elif self.on_exceed == "freeze":
            self.frozen = True  # keep the last reference that was inside the δ-bound
        else:
            self.reset_to_init()
        return self.metrics()


def build_reference(strategy: str, policy_unet: torch.nn.Module | None = None,
                    denoiser: Denoiser | None = None, tau: int = DEFAULT_TAU, delta: float = DEFAULT_DELTA,
                    on_exceed: str = DEFAULT_ON_EXCEED, dtype: torch.dtype | None = None) -> ReferencePolicy:
    """Reference policy by name (see module docstring)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"reference.strategy must be one of {STRATEGIES}, got {strategy!r}")
    if on_exceed not in ON_EXCEED:
        raise ValueError(f"reference.on_exceed must be one of {ON_EXCEED}, got {on_exceed!r}")
    if strategy == "none":
        return NoReference()
    if tau < 1:
        raise ValueError(f"reference.tau must be >= 1, got {tau}")
    if strategy == "periodic_threshold" and delta <= 0:
        raise ValueError(f"reference.delta must be > 0, got {delta}")
    cls = {"frozen": FrozenReference, "periodic": PeriodicReference, "periodic_threshold": ThresholdReference}
    return cls[strategy](policy_unet, denoiser, tau=tau, delta=delta, on_exceed=on_exceed, dtype=dtype)
