"""Builds the parts of a training step from the config: policy, objective, reference, timestep
sampler, encoders; and the offline datasets. `diffalign.train.driver` assembles them into a trainer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.config import RunConfig
from diffalign.data.synthetic import SyntheticPairs
from diffalign.models.build import build_denoiser, build_policy, prepare_policy, trainable_modules
from diffalign.models.bundle import ModelBundle
from diffalign.models.conditioning import PromptEncoder
from diffalign.models.denoiser import Denoiser
from diffalign.models.precision import mixed_precision_dtype, resolve_reference_dtype
from diffalign.objectives import build_objective
from diffalign.reference import build_reference
from diffalign.timesteps import build_timestep_sampler, reward_scale
from diffalign.train.cache import CachedPromptEncoder
from diffalign.train.step import LatentEncoder, PreferenceStep


@dataclass
class Setup:
    cfg: RunConfig
    bundle: ModelBundle
    param_groups: list[dict]
    denoiser: Denoiser  # or FlowDenoiser: the same contract
    step: PreferenceStep
    prompt_encoder: PromptEncoder
    latent_encoder: LatentEncoder

    @property
    def reference(self):
        return self.step.reference

    @property
    def trainable_modules(self) -> list[torch.nn.Module]:
        return trainable_modules(self.bundle, self.cfg)


def configured_reference(cfg: RunConfig, unet: torch.nn.Module, denoiser: Denoiser,
                         device: torch.device | str):
    """The reference policy of the `reference` section, tied to the policy `unet`."""
    r = cfg.reference
    return build_reference(r.strategy, unet, denoiser, tau=r.tau, delta=r.delta, on_exceed=r.on_exceed,
                           dtype=resolve_reference_dtype(r.dtype, cfg.model.mixed_precision, device),
                           divergence=r.divergence, delta_eps_mse=r.delta_eps_mse)


def build_setup(
    cfg: RunConfig, device: torch.device | str = "cpu", bundle: ModelBundle | None = None, reference=None
) -> Setup:
    """`reference` may be passed in (e.g. a Ray ReferenceActor client); else built colocated."""
    if bundle is None:
        bundle, groups = build_policy(cfg)  # seeded and ordered as in every other process
    else:
        groups = prepare_policy(bundle, cfg)
    for module in [bundle.unet, bundle.vae, *bundle.text_encoders]:
        module.to(device)
    denoiser = build_denoiser(bundle)
    objective = build_objective(cfg.objective.name, **cfg.objective.hyperparameters)
    if reference is None:
        reference = configured_reference(cfg, bundle.unet, denoiser, device)
    t = cfg.timesteps
    sampler = build_timestep_sampler(t.sampler, bundle.num_train_timesteps, t.timestep_gamma, t.num_bins,
                                     logit_mean=t.logit_mean, logit_std=t.logit_std, mode_scale=t.mode_scale)
    scale = (reward_scale(t.reward_scale, sigmas=denoiser.sigmas) if bundle.is_flow
             else reward_scale(t.reward_scale, bundle.noise_scheduler.alphas_cumprod))
    step = PreferenceStep(
        denoiser,
        objective,
        reference,
        sampler,
        scale,
        cfg.reference.divergence_samples,
        autocast_dtype=mixed_precision_dtype(cfg.model.mixed_precision),
    )
    cache_text = cfg.data.cache_prompt_embeds and not cfg.model.train_text_encoder
    prompt_encoder = CachedPromptEncoder(bundle) if cache_text else PromptEncoder(bundle)
    return Setup(cfg, bundle, groups, denoiser, step, prompt_encoder, LatentEncoder(bundle))


def build_datasets(cfg: RunConfig, bundle: ModelBundle | None = None
                   ) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
    """(train, held-out) pair datasets for offline training. A pair store (`data.kind: store`) is
    checked against `bundle`'s VAE and text encoders, the models its latents were made with."""
    d = cfg.data
    if d.kind == "synthetic":
        train = SyntheticPairs(d.num_pairs, cfg.model.resolution, seed=cfg.train.seed)
        held = SyntheticPairs(d.heldout_pairs, cfg.model.resolution, seed=cfg.train.seed + 7919)
        return train, held
    if d.kind == "store":
        from diffalign.data.store import model_identity, open_store
        from diffalign.data.transforms import PairTransform

        if bundle is None:
            raise ValueError("data.kind=store is checked against the run's models: pass the bundle")
        return open_store(d.path, identity=model_identity(bundle), resolution=cfg.model.resolution,
                          center_crop=d.center_crop, random_flip=d.random_flip, sampling=d.latent_sampling,
                          seed=cfg.train.seed, heldout=d.heldout_pairs,
                          transform=PairTransform(cfg.model.resolution, not d.center_crop, d.random_flip),
                          embeddings=not cfg.model.train_text_encoder)
    from diffalign.data.factory import open_pair_dataset

    return open_pair_dataset(cfg)
