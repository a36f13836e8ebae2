"""Builds everything a run needs from its config: model, objective, reference, step, data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.config import RunConfig
from diffalign.data.synthetic import SyntheticPairs
from diffalign.models.bundle import ModelBundle
from diffalign.models.conditioning import PromptEncoder
from diffalign.models.denoiser import Denoiser
from diffalign.models.loading import load_bundle
from diffalign.models.lora import TEXT_TARGETS, add_lora
from diffalign.models.tiny import build_tiny_bundle
from diffalign.objectives import build_objective
from diffalign.reference import build_reference, resolve_reference_dtype
from diffalign.timesteps import build_timestep_sampler, reward_scale
from diffalign.train.cache import CachedPromptEncoder
from diffalign.train.step import LatentEncoder, PreferenceStep

DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_bundle(cfg: RunConfig) -> ModelBundle:
    m = cfg.model
    if m.pretrained is None:
        return build_tiny_bundle(m.family, seed=m.tiny_seed, resolution=m.resolution)
    frozen = DTYPES[m.mixed_precision] or torch.float32
    return load_bundle(
        m.pretrained, family=m.family, resolution=m.resolution, vae_path=m.vae, frozen_dtype=frozen
    )


def prepare_policy(bundle: ModelBundle, cfg: RunConfig) -> list[dict]:
    """Makes the UNet (and optionally text encoders) trainable; returns optimizer param groups."""
    m, o = cfg.model, cfg.optim
    unet = bundle.unet
    if m.finetune == "lora":
        add_lora(unet, m.lora_rank, m.lora_alpha)
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


@dataclass
class Setup:
    cfg: RunConfig
    bundle: ModelBundle
    param_groups: list[dict]
    denoiser: Denoiser
    step: PreferenceStep
    prompt_encoder: PromptEncoder
    latent_encoder: LatentEncoder

    @property
    def reference(self):
        return self.step.reference

    @property
    def trainable_modules(self) -> list[torch.nn.Module]:
        mods: list[torch.nn.Module] = [self.bundle.unet]
        if self.cfg.model.train_text_encoder:
            mods += self.bundle.text_encoders
        return mods


def build_setup(
    cfg: RunConfig, device: torch.device | str = "cpu", bundle: ModelBundle | None = None, reference=None
) -> Setup:
    """`reference` may be passed in (e.g. a Ray ReferenceActor client); else built colocated."""
    bundle = bundle or build_bundle(cfg)
    groups = prepare_policy(bundle, cfg)
    for module in [bundle.unet, bundle.vae, *bundle.text_encoders]:
        module.to(device)
    denoiser = Denoiser(bundle.noise_scheduler)
    objective = build_objective(cfg.objective.name, **cfg.objective.params())
    if reference is None:
        r = cfg.reference
        reference = build_reference(
            r.strategy,
            bundle.unet,
            denoiser,
            tau=r.tau,
            delta=r.delta,
            on_exceed=r.on_exceed,
            dtype=resolve_reference_dtype(r.dtype, cfg.model.mixed_precision, device),
        )
    t = cfg.timesteps
    sampler = build_timestep_sampler(t.sampler, bundle.num_train_timesteps, t.timestep_gamma, t.num_bins)
    scale = reward_scale(t.reward_scale, bundle.noise_scheduler.alphas_cumprod)
    step = PreferenceStep(
        denoiser,
        objective,
        reference,
        sampler,
        scale,
        cfg.reference.divergence_samples,
        autocast_dtype=DTYPES[cfg.model.mixed_precision],
    )
    cache_text = cfg.data.cache_prompt_embeds and not cfg.model.train_text_encoder
    prompt_encoder = CachedPromptEncoder(bundle) if cache_text else PromptEncoder(bundle)
    return Setup(cfg, bundle, groups, denoiser, step, prompt_encoder, LatentEncoder(bundle))


def build_datasets(cfg: RunConfig) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
    """(train, held-out) pair datasets for offline training."""
    d = cfg.data
    if d.kind == "synthetic":
        train = SyntheticPairs(d.num_pairs, cfg.model.resolution, seed=cfg.train.seed)
        held = SyntheticPairs(d.heldout_pairs, cfg.model.resolution, seed=cfg.train.seed + 7919)
        return train, held
    from diffalign.data.factory import open_pair_dataset

    return open_pair_dataset(cfg)
