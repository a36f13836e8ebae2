"""Builds the policy from the model section of a config: the bundle (tiny random or `from_pretrained`),
the trainable parts (LoRA adapters or the full network, optionally text-encoder LoRA) and their optimizer
param groups. Every process that needs the policy's initial weights (learner, reference actor, sampler
actors, evaluation) builds it here, so they agree bit for bit.

The config is only read (duck-typed), never imported: `diffalign.config` sits above the models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from diffalign.models.bundle import FLOW_FAMILIES, UNET_FAMILIES, ModelBundle
from diffalign.models.lora import TEXT_TARGETS, add_lora, lora_targets
from diffalign.models.precision import frozen_dtype

if TYPE_CHECKING:  # type names only: importing the config here would make a cycle
    from diffalign.config import RunConfig


def build_bundle(cfg: RunConfig) -> ModelBundle:
    """`model.pretrained` unset -> the tiny random model of `model.family`; else loaded from disk / Hub."""
    m = cfg.model
    if m.family in FLOW_FAMILIES:
        bundle = _flow_bundle(cfg)
        # What every process needs to noise, condition and sample alike (FlowDenoiser, PromptEncoder);
        # the tiny builders set a short max_sequence_length of their own.
        settings = {"flow_shift": m.flow_shift, "flux_guidance": m.flux_guidance,
                    "max_sequence_length": m.max_sequence_length}
        bundle.extras.update({k: v for k, v in settings.items() if v is not None})
        return bundle
    if m.pretrained is None:
        from diffalign.models.tiny.diffusion import build_tiny_bundle

        return build_tiny_bundle(m.family, seed=m.tiny_seed, resolution=m.resolution)
    from diffalign.models.loading import load_bundle

    return load_bundle(m.pretrained, family=m.family, resolution=m.resolution, vae_path=m.vae,
                       frozen_dtype=frozen_dtype(m.mixed_precision))


def _flow_bundle(cfg: RunConfig) -> ModelBundle:
    m = cfg.model
    if m.pretrained is None:
        from diffalign.models.tiny.flow import build_tiny_flow_bundle

        return build_tiny_flow_bundle(m.family, seed=m.tiny_seed, resolution=m.resolution, t5=m.t5)
    from diffalign.models.flow_loading import load_flow_bundle

    return load_flow_bundle(m.pretrained, family=m.family, resolution=m.resolution, t5=m.t5,
                            frozen_dtype=frozen_dtype(m.mixed_precision))


def prepare_policy(bundle: ModelBundle, cfg: RunConfig) -> list[dict]:
    """Makes the trained network (UNet or flow transformer: `bundle.unet`, and optionally the UNet
    families' text encoders) trainable; returns optimizer param groups."""
    m, o = cfg.model, cfg.optim
    if m.train_text_encoder and bundle.is_flow:
        # Config validation refuses this first; the check here keeps a hand-built config honest.
        raise ValueError(f"model.train_text_encoder is not supported for family {bundle.family!r} "
                         f"(only {', '.join(UNET_FAMILIES)})")
    unet = bundle.unet
    if m.finetune == "lora":
        add_lora(unet, m.lora_rank, m.lora_alpha, targets=lora_targets(bundle.family))
    else:
        unet.requires_grad_(True)
    if m.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": o.lr}]
    if m.train_text_encoder:
        for enc in bundle.text_encoders:
            add_lora(enc, m.lora_rank, m.lora_alpha, targets=TEXT_TARGETS)
            groups.append(
                {"params": [p for p in enc.parameters() if p.requires_grad], "lr": o.text_encoder_lr}
            )
    return groups


def build_policy(cfg: RunConfig) -> tuple[ModelBundle, list[dict]]:
    """The policy at step 0, as every process builds it: seeded with `train.seed`, then the bundle,
    then its trainable parts (LoRA adapters are random, so the seed and this order fix them)."""
    torch.manual_seed(cfg.train.seed)
    bundle = build_bundle(cfg)
    return bundle, prepare_policy(bundle, cfg)


def trainable_modules(bundle: ModelBundle, cfg: RunConfig) -> list[torch.nn.Module]:
    """The modules whose weights training changes: the UNet, plus the text encoders if trained."""
    return [bundle.unet, *(bundle.text_encoders if cfg.model.train_text_encoder else [])]


def build_denoiser(bundle: ModelBundle):
    """The denoiser of a bundle: `Denoiser` for the UNets, `FlowDenoiser` for the flow transformers
    (one contract: noisy_and_target, predict, errors)."""
    if bundle.is_flow:
        from diffalign.models.flow_denoiser import FlowDenoiser

        return FlowDenoiser.for_bundle(bundle)
    from diffalign.models.denoiser import Denoiser

    return Denoiser(bundle.noise_scheduler)
