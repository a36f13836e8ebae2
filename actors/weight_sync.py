"""Learner -> sampler weight sync: versioned packets, strict loading, and a probe that checks the
receiver really computes what the sender computes.

Pure torch (no Ray): the Ray layer moves `WeightPacket`s through the object store, this module
decides whether what arrived is complete, current and numerically the same model.

A packet holds the trainable weights only (LoRA adapter tensors for a LoRA policy, every UNet
parameter for a full fine-tune), cast to the run's training dtype (`packet_dtype`: bf16 / fp16
under `model.mixed_precision`, else fp32), so a bf16 run moves half the bytes of its fp32 master
weights. The receiver casts them into its own parameters on load. With several trainable modules
(UNet plus text-encoder LoRA), keys follow the Trainer's checkpoint convention: the first module
unprefixed, module i as ``text_encoder_{i}.<name>``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffalign.models.conditioning import Conditioning
from diffalign.models.denoiser import Denoiser
from diffalign.models.flow_denoiser import flow_family_of, transformer_forward
from diffalign.models.precision import mixed_precision_dtype
from diffalign.models.weights import (
    WeightMismatchError,
    check_state_dict,
    is_lora_model,
    load_trainable_state_dict,
    state_fingerprint,
    trainable_state_dict,
)

__all__ = [
    "WeightMismatchError", "WeightSyncError", "WeightPacket", "make_packet", "apply_packet", "packet_dtype",
    "ProbeBatch", "probe_outputs", "probe_tolerance", "compute_dtype", "lowest_precision", "verify_probe",
    "SyncVerifier",
]

Modules = torch.nn.Module | Sequence[torch.nn.Module]


class WeightSyncError(RuntimeError):
    """A receiver does not hold the sender's policy (wrong version or different outputs)."""


@dataclass
class WeightPacket:
    version: int                         # the learner's optimizer step these weights belong to
    weights: dict[str, torch.Tensor]     # CPU tensors
    lora: bool                           # adapter tensors only (True) or every parameter (False)
    fingerprint: float                   # state_fingerprint(weights) of the sent tensors, checked on arrival

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights.values())

    @property
    def dtype(self) -> torch.dtype:
        """The lowest precision among its floating tensors (float32 for an empty packet)."""
        floats = {t.dtype for t in self.weights.values() if t.is_floating_point()}
        return lowest_precision(*floats) if floats else torch.float32


def _as_list(modules: Modules) -> list[torch.nn.Module]:
    return [modules] if isinstance(modules, torch.nn.Module) else list(modules)


def _prefix(i: int) -> str:
    return "" if i == 0 else f"text_encoder_{i}."


def packet_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype weights travel in for `model.mixed_precision`: bf16 / fp16, or float32 for "no"."""
    return mixed_precision_dtype(mixed_precision) or torch.float32


def make_packet(modules: Modules, version: int, dtype: torch.dtype | None = None) -> WeightPacket:
    """Snapshot (detached CPU copies) of the trainable weights of `modules` as policy `version`.

    With `dtype`, floating tensors are cast to it in the same copy (no fp32 CPU copy first); the
    fingerprint is of the cast tensors, i.e. of what is sent. None keeps each parameter's dtype.
    """
    mods = _as_list(modules)
    lora = is_lora_model(mods[0])
    weights: dict[str, torch.Tensor] = {}
    for i, module in enumerate(mods):
        if dtype is None:
            part = trainable_state_dict(module, lora_only=lora)
        else:
            part = {name: p.detach().to(device="cpu", dtype=dtype if p.is_floating_point() else p.dtype,
                                        copy=True)
                    for name, p in module.named_parameters() if not lora or "lora_" in name}
        weights.update({_prefix(i) + k: v for k, v in part.items()})
    return WeightPacket(int(version), weights, lora, state_fingerprint(weights))


def _split(weights: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, value in weights.items():
        i = 0
        if key.startswith("text_encoder_"):
            head, _, rest = key.partition(".")
            idx = head[len("text_encoder_"):]
            if idx.isdigit() and 0 < int(idx) < n:
                i, key = int(idx), rest
        parts[i][key] = value
    return parts


def apply_packet(modules: Modules, packet: WeightPacket, expected_version: int | None = None) -> int:
    """Loads `packet` into `modules` strictly; returns its version.

    Each tensor is cast into the receiver's parameter dtype (a bf16 packet loads into fp32 weights).
    Raises WeightSyncError on a version other than `expected_version`, a LoRA/full mismatch or weights
    that changed in transit, and WeightMismatchError (naming the keys) on any missing, unexpected or
    mis-shaped key: a partial load would sample from a model nobody trained. Nothing is loaded unless
    every module's keys match.
    """
    if expected_version is not None and packet.version != expected_version:
        raise WeightSyncError(f"weight packet has version {packet.version}, expected {expected_version}")
    mods = _as_list(modules)
    receiver_lora = is_lora_model(mods[0])
    if packet.lora != receiver_lora:
        kinds = {True: "LoRA adapters", False: "full weights"}
        raise WeightSyncError(f"packet v{packet.version} holds {kinds[packet.lora]} but the receiver is "
                              f"set up for {kinds[receiver_lora]} (model.finetune differs?)")
    got = state_fingerprint(packet.weights)
    if not math.isclose(got, packet.fingerprint, rel_tol=1e-9, abs_tol=1e-9):
        raise WeightSyncError(f"packet v{packet.version} fingerprint {got!r} != {packet.fingerprint!r}: "
                              "weights changed after the packet was made")
    parts = _split(packet.weights, len(mods))
    for i, (module, part) in enumerate(zip(mods, parts)):
        try:
            check_state_dict(module, part, lora_only=packet.lora)
        except WeightMismatchError as e:
            where = "unet" if i == 0 else f"text_encoder_{i}"
            raise WeightMismatchError(f"weight packet v{packet.version} ({where}): {e}") from None
    for module, part in zip(mods, parts):
        load_trainable_state_dict(module, part, lora_only=packet.lora)
    return packet.version


# --------------------------------------------------------------------------- probe


@dataclass
class ProbeBatch:
    """Fixed UNet inputs. Both sides build it from (seed, UNet config), so only outputs are compared."""

    noisy: torch.Tensor        # (B, C, h, w)
    timesteps: torch.Tensor    # (B,) long; a flow transformer's probe holds sigmas (float)
    cond: Conditioning

    @classmethod
    def build(cls, unet, seed: int = 0, batch: int = 2, seq_len: int = 8,
              num_train_timesteps: int = 1000) -> ProbeBatch:
        family = flow_family_of(unet)
        if family is not None:
            return cls._flow(unet, family, seed, batch, seq_len)
        c = unet.config
        g = torch.Generator().manual_seed(int(seed))
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        noisy = torch.randn(batch, c.in_channels, size, size, generator=g)
        # Spread over the schedule: high- and low-noise behaviour both get checked.
        timesteps = torch.linspace(num_train_timesteps - 1, 0, batch).round().long()
        embeds = torch.randn(batch, seq_len, c.cross_attention_dim, generator=g)
        pooled = time_ids = None
        if c.addition_embed_type == "text_time":
            pooled_dim = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            pooled = torch.randn(batch, pooled_dim, generator=g)
            res = float(size * 8)
            time_ids = torch.tensor([[res, res, 0.0, 0.0, res, res]]).repeat(batch, 1)
        return cls(noisy, timesteps, Conditioning(embeds, pooled, time_ids))

    @classmethod
    def _flow(cls, net, family: str, seed: int, batch: int, seq_len: int) -> ProbeBatch:
        """Flow transformers: `timesteps` are noise levels sigma in (0, 1], spread as for the UNets."""
        c = net.config
        g = torch.Generator().manual_seed(int(seed))
        channels = c.in_channels if family == "sd3" else c.in_channels // 4  # FLUX / Qwen: packed 2x2
        noisy = torch.randn(batch, channels, 4, 4, generator=g)
        sigmas = torch.linspace(1.0, 0.05, batch)
        embeds = torch.randn(batch, seq_len, c.joint_attention_dim, generator=g)
        pooled = (torch.randn(batch, c.pooled_projection_dim, generator=g)
                  if family in ("sd3", "flux") else None)
        return cls(noisy, sigmas, Conditioning(embeds, pooled))


@torch.no_grad()
def probe_outputs(unet, probe: ProbeBatch) -> torch.Tensor:
    """Denoiser outputs of `unet` on the probe batch, float32 on CPU (eval mode, then restored)."""
    was = unet.training
    unet.eval()
    try:
        device = next(unet.parameters()).device
        family = flow_family_of(unet)
        if family is not None:
            guidance = 1.0 if unet.config.get("guidance_embeds", False) else None
            out = transformer_forward(family, unet, probe.noisy.to(device), probe.timesteps.to(device),
                                      probe.cond, guidance)
            return out.float().cpu()
        out = Denoiser.predict(unet, probe.noisy.to(device), probe.timesteps.to(device), probe.cond)
        return out.float().cpu()
    finally:
        unet.train(was)


# Max abs error allowed, relative to the largest output magnitude. fp32 copies differ only by
# summation order (threads, kernels). Half precisions round in every layer: the tiny UNet in bf16
# (a CPU copy, or CUDA autocast) lands 1-2e-2 off; fp16 and TF32 keep 3 more mantissa bits. A 10%
# change of the LoRA weights moves the outputs by about 1e-1, still well above the bf16 bound.
_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9, torch.bfloat16: 4e-2, torch.float16: 1e-2}


def probe_tolerance(dtype: torch.dtype) -> float:
    return _TOLERANCE.get(dtype, _TOLERANCE[torch.bfloat16])


def compute_dtype(module: torch.nn.Module, autocast_dtype: torch.dtype | None = None) -> torch.dtype:
    """The precision `module` effectively computes in, for choosing the probe tolerance. On CUDA with
    TF32 enabled, fp32 convolutions/matmuls keep a 10-bit mantissa: counted as float16."""
    if autocast_dtype is not None:
        return autocast_dtype
    p = next(module.parameters())
    if p.dtype == torch.float32 and p.is_cuda and (torch.backends.cudnn.allow_tf32
                                                   or torch.backends.cuda.matmul.allow_tf32):
        return torch.float16
    return p.dtype


def lowest_precision(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype with the loosest tolerance (a bf16 receiver of an fp32 learner is checked as bf16, and
    so is an fp32 receiver of a bf16 packet: pass sender, receiver and packet dtypes)."""
    return max(dtypes, key=probe_tolerance)


def verify_probe(receiver_out: torch.Tensor, sender_out: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> tuple[bool, float]:
    """(outputs agree within the dtype's tolerance, max absolute error)."""
    if receiver_out.shape != sender_out.shape:
        return False, math.inf
    a, b = receiver_out.detach().double().cpu(), sender_out.detach().double().cpu()
    if not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
        return False, math.inf
    err = float((a - b).abs().max()) if a.numel() else 0.0
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1e-6)
    return err <= probe_tolerance(dtype) * scale, err


class SyncVerifier:
    """Checks every sync's version and, every `probe_every` syncs (the first one included), that the
    receivers' probe outputs match the sender's. `probe_every=0` turns the probe off."""

    def __init__(self, probe_every: int = 4) -> None:
        if probe_every < 0:
            raise ValueError(f"probe_every must be >= 0, got {probe_every}")
        self.probe_every = probe_every
        self.syncs = 0
        self.probes = 0
        self.last_probe_err: float | None = None

    def next_sync(self) -> bool:
        """Counts one more sync; True when this one is due for the probe comparison."""
        due = self.probe_every > 0 and self.syncs % self.probe_every == 0
        self.syncs += 1
        return due

    def check_version(self, sender_version: int, receiver_version: int, who: str = "receiver") -> None:
        if int(receiver_version) != int(sender_version):
            raise WeightSyncError(f"{who} reports policy version {receiver_version} after a sync of version "
                                  f"{sender_version}")

    def check_probe(self, sender_out: torch.Tensor, receiver_out: torch.Tensor,
                    dtype: torch.dtype = torch.float32, who: str = "receiver",
                    version: int | None = None) -> float:
        ok, err = verify_probe(receiver_out, sender_out, dtype)
        if not ok:
            at = f" at version {version}" if version is not None else ""
            raise WeightSyncError(
                f"{who} probe outputs differ from the learner's{at}: max abs error {err:.3g} exceeds the "
                f"{dtype} tolerance ({probe_tolerance(dtype):.0e} x max |output| "
                f"{float(sender_out.abs().max()):.3g}); the synced weights are not the learner's"
            )
        return err

    def after_sync(self, sender_version: int, receiver_versions: Sequence[int],
                   sender_probe: Callable[[], torch.Tensor] | None = None,
                   receiver_probes: Callable[[], Sequence[torch.Tensor]] | None = None,
                   dtype: torch.dtype = torch.float32) -> dict[str, float]:
        """Verifies one completed sync to every receiver; returns metrics. Raises WeightSyncError."""
        due = self.next_sync()
        for i, v in enumerate(receiver_versions):
            self.check_version(sender_version, v, who=f"receiver {i}")
        metrics: dict[str, float] = {"sync/count": float(self.syncs)}
        if due and sender_probe is not None and receiver_probes is not None:
            ref = sender_probe()
            errs = [self.check_probe(ref, out, dtype, who=f"receiver {i}", version=sender_version)
                    for i, out in enumerate(receiver_probes())]
            self.probes += 1
            self.last_probe_err = max(errs, default=0.0)
            metrics["sync/probe_max_abs_err"] = self.last_probe_err
        return metrics
