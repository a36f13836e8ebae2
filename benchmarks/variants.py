"""Step variants of the benchmarks, each a ``step() -> metrics`` over cached-latent pairs.

- ``TrainerVariant``: one ``Trainer.train_step`` of a trainer from ``train.driver.build_trainer``
  (data batch from cached latents, ``PreferenceStep``, backward, grad norm + clip, guard, AdamW step,
  reference hook), i.e. exactly the code a training run executes per optimizer step.
- ``BaselineDPO``: a plain PyTorch Diffusion-DPO step written the way diffusers'
  ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`` computes it.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from diffalign.models.precision import autocast, mixed_precision_dtype
from fixtures import (
    FAMILY,
    StaticPromptEncoder,
    build_unet,
    compile_unet,
    ensure_ray,
    noise_scheduler,
    pair_items,
    pixel_resolution,
)

# --dtype of the benchmarks (fp32 | bf16) -> the config's mixed-precision name.
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16"}


@dataclass
class Spec:
    """How every variant of one benchmark run is built (equal for all rows)."""

    model: str = "tiny"
    device: str = "cpu"
    dtype: str = "fp32"            # fp32 | bf16 (fp32 weights + bf16 autocast, as mixed_precision=bf16)
    batch: int = 8                 # pairs per step
    grad_checkpointing: bool = False
    compile: str = "none"          # none | unet | blocks
    channels_last: bool = False
    fused_adam: str = "auto"       # auto (each as its source does) | on | off
    finetune: str = "full"         # full | lora
    reference_dtype: str = "auto"  # reference.dtype of the reference rows: auto | fp32 | bf16 | fp16
    seed: int = 0

    def fused(self) -> bool | None:
        return {"auto": None, "on": True, "off": False}[self.fused_adam]


class TrainerVariant:
    """One optimizer step of the real Trainer (`Trainer.train_step`) on cached latents."""

    def __init__(self, spec: Spec, objective: str, reference: str = "colocated",
                 label: str | None = None) -> None:
        from diffalign.config import RunConfig
        from diffalign.models.build import prepare_policy
        from diffalign.models.bundle import ModelBundle
        from diffalign.models.denoiser import Denoiser
        from diffalign.objectives import build_objective, objective_needs_reference
        from diffalign.timesteps import build_timestep_sampler, reward_scale
        from diffalign.train.driver import build_trainer
        from diffalign.train.engine import TorchEngine, build_optimizer
        from diffalign.train.setup import Setup, configured_reference
        from diffalign.train.step import PreferenceStep

        self.spec, self.objective, self.reference_kind = spec, objective, reference
        self.label = label or objective
        self.needs_reference = objective_needs_reference(objective)
        cfg = RunConfig()
        cfg.model.family = FAMILY[spec.model]
        cfg.model.finetune = spec.finetune
        cfg.model.gradient_checkpointing = spec.grad_checkpointing
        cfg.model.mixed_precision = MIXED_PRECISION[spec.dtype]
        cfg.objective.name = objective
        cfg.reference.strategy = "frozen" if self.needs_reference else "none"
        cfg.reference.dtype = "bf16" if reference == "colocated_bf16" else spec.reference_dtype
        cfg.optim.batch_size = spec.batch
        cfg.optim.lr = 1e-6
        cfg.train.max_steps = 10**6
        cfg.train.progress = False
        cfg.train.eval_every = 0
        cfg.guard.spike_sigmas = 1e12   # the check still runs; it just never rolls a benchmark back
        cfg.tracking.mlflow = False
        self.cfg = cfg

        device = torch.device(spec.device)
        unet = build_unet(spec.model, device, seed=spec.seed)
        if spec.channels_last:
            unet.to(memory_format=torch.channels_last)
        sched = noise_scheduler()
        bundle = ModelBundle(family=cfg.model.family, unet=unet, vae=None, text_encoders=[], tokenizers=[],
                             noise_scheduler=sched, sample_scheduler=None,
                             resolution=pixel_resolution(spec.model))
        groups = prepare_policy(bundle, cfg)
        denoiser = Denoiser(sched)
        self._tmp = tempfile.TemporaryDirectory(prefix="diffalign-bench-")
        cfg.train.output_dir = self._tmp.name
        self.ray_reference = None
        if reference == "actor" and self.needs_reference:
            if spec.model != "tiny":
                raise ValueError("the Ray-actor reference row runs on the tiny model only")
            ref = make_actor_reference(unet, cfg)
            self.ray_reference = ref
        else:
            ref = configured_reference(cfg, unet, denoiser, device)
        t = cfg.timesteps
        step = PreferenceStep(
            denoiser, build_objective(objective, **cfg.objective.hyperparameters), ref,
            build_timestep_sampler(t.sampler, bundle.num_train_timesteps, t.timestep_gamma, t.num_bins),
            reward_scale(t.reward_scale, sched.alphas_cumprod), cfg.reference.divergence_samples,
            autocast_dtype=mixed_precision_dtype(cfg.model.mixed_precision),
        )
        setup = Setup(cfg, bundle, groups, denoiser, step, StaticPromptEncoder(spec.model), None)
        compile_unet(unet, spec.compile)
        if getattr(ref, "ref_unet", None) is not None:
            compile_unet(ref.ref_unet, spec.compile)
        params = [p for g in groups for p in g["params"]]
        optimizer = build_optimizer(groups, cfg.optim, fused=spec.fused())
        self.optimizer_desc = _optimizer_desc(optimizer)
        engine = TorchEngine(unet, params, optimizer, cfg.optim, cfg.train.max_steps)
        self.trainer = build_trainer(cfg, setup=setup, engine=engine, device=device,
                                     train_data=pair_items(spec.model, max(64, 2 * spec.batch)),
                                     checkpoint_dir=self._tmp.name)
        self.unet = unet
        self.params = params

    def step(self) -> dict:
        metrics = self.trainer.train_step()
        if not metrics:
            raise RuntimeError(f"{self.label}: the step was skipped by the stability guard")
        return metrics

    def close(self) -> None:
        if self.ray_reference is not None and hasattr(self.ray_reference, "close"):
            self.ray_reference.close()
        self.trainer = None
        self._tmp.cleanup()


def make_actor_reference(unet: torch.nn.Module, cfg: Any) -> Any:
    """The frozen reference served by a Ray `ReferenceActor`, seen through its `RemoteReference` client.

    The actor builds its model from `cfg` (tiny models only: the random sd15/sdxl-size UNets of these
    benchmarks are not reproducible from a config); `bind` checks it matches the learner's policy.
    """
    from diffalign.actors.reference_actor import RemoteReference, spawn_reference_actor

    ensure_ray()
    actor = spawn_reference_actor(cfg, fresh=True)
    ref = RemoteReference(actor, cfg)
    ref.bind(unet)
    ref.close = lambda: __import__("ray").kill(actor, no_restart=True)
    return ref


def actor_reference_available() -> tuple[bool, str]:
    import importlib.util

    try:
        if importlib.util.find_spec("ray") is None:
            return False, "ray is not installed"
        if importlib.util.find_spec("diffalign.actors") is None or \
                importlib.util.find_spec("diffalign.actors.reference_actor") is None:
            return False, "diffalign.actors.reference_actor does not exist yet"
        from diffalign.actors import reference_actor
    except Exception as e:  # noqa: BLE001 - any import failure means the row cannot run
        return False, f"diffalign.actors.reference_actor failed to import: {e!r}"
    if not hasattr(reference_actor, "RemoteReference"):
        return False, "diffalign.actors.reference_actor has no RemoteReference"
    return True, ""


def _optimizer_desc(opt: torch.optim.Optimizer) -> str:
    d = opt.defaults
    if d.get("fused"):
        return "AdamW fused"
    if d.get("foreach") is False:
        return "AdamW for-loop"
    cuda = any(p.is_cuda for g in opt.param_groups for p in g["params"])
    return "AdamW foreach" if cuda else "AdamW default"


class BaselineDPO:
    """A plain PyTorch Diffusion-DPO step, computed the way diffusers' research example does.

    Full fine-tune: the policy UNet (fp32 weights, bf16 autocast under --dtype bf16) runs on the
    concatenated [chosen; rejected] batch with one noise and timestep per pair; a separate frozen
    reference UNet (cast to bf16 under --dtype bf16, as the example casts it to the weight dtype)
    runs on the same inputs under no_grad; mse per sample; loss = -logsigmoid(-0.5 * beta *
    (model_diff - ref_diff)); backward; clip_grad_norm_; AdamW step; LR scheduler step; zero_grad;
    and the example's per-step ``.item()`` logging of loss and implicit accuracy.
    """

    label = "baseline dpo (diffusers-style)"
    objective = "dpo"
    needs_reference = True

    def __init__(self, spec: Spec, beta: float = 5000.0, label: str | None = None) -> None:
        self.spec, self.beta = spec, beta
        self.label = label or self.label
        self.device = torch.device(spec.device)
        self.autocast = mixed_precision_dtype(MIXED_PRECISION[spec.dtype])
        self.unet = build_unet(spec.model, self.device, seed=spec.seed)
        if spec.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if spec.grad_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.requires_grad_(True)
        self.unet.train()
        self.ref = copy.deepcopy(self.unet)
        self.ref.requires_grad_(False)
        self.ref.eval()
        if self.autocast is not None:
            self.ref.to(self.autocast)
        compile_unet(self.unet, spec.compile)
        compile_unet(self.ref, spec.compile)
        self.sched = noise_scheduler()
        self.sched.alphas_cumprod = self.sched.alphas_cumprod.to(self.device)
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-6, weight_decay=1e-2, fused=spec.fused())
        self.optimizer_desc = _optimizer_desc(self.optimizer)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        self.items = pair_items(spec.model, max(64, 2 * spec.batch))
        self.encoder = StaticPromptEncoder(spec.model)
        self.pos = 0

    def _batch(self):
        n, b = len(self.items), self.spec.batch
        items = [self.items[(self.pos + i) % n] for i in range(b)]
        self.pos += b
        chosen = torch.stack([it["chosen_latents"] for it in items])
        rejected = torch.stack([it["rejected_latents"] for it in items])
        cond = self.encoder([it["prompt"] for it in items])
        return torch.cat([chosen, rejected]).to(self.device), cond

    def _unet_kwargs(self, cond: Any, dtype: torch.dtype) -> dict:
        kw = {"encoder_hidden_states": cond.prompt_embeds.to(self.device, dtype).repeat(2, 1, 1)}
        if cond.pooled_embeds is not None:
            kw["added_cond_kwargs"] = {
                "text_embeds": cond.pooled_embeds.to(self.device, dtype).repeat(2, 1),
                "time_ids": cond.add_time_ids.to(self.device, dtype).repeat(2, 1),
            }
        return kw

    def _ctx(self):
        return autocast(self.device, self.autocast)

    def step(self) -> dict:
        latents, cond = self._batch()
        bsz = latents.shape[0] // 2
        noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
        timesteps = torch.randint(0, 1000, (bsz,), device=self.device, dtype=torch.long).repeat(2)
        noisy = self.sched.add_noise(latents, noise, timesteps)
        with self._ctx():
            pred = self.unet(noisy, timesteps, **self._unet_kwargs(cond, torch.float32)).sample
        losses = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        model_w, model_l = losses.chunk(2)
        model_diff = model_w - model_l
        with torch.no_grad(), self._ctx():
            ref_dtype = next(self.ref.parameters()).dtype
            ref_pred = self.ref(noisy.to(ref_dtype), timesteps, **self._unet_kwargs(cond, ref_dtype)).sample
            ref_losses = F.mse_loss(ref_pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
            ref_w, ref_l = ref_losses.chunk(2)
            ref_diff = ref_w - ref_l
        inside = -0.5 * self.beta * (model_diff - ref_diff)
        loss = -F.logsigmoid(inside).mean()
        implicit_acc = (inside > 0).float().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item(), "implicit_acc": implicit_acc.item()}

    def close(self) -> None:
        self.unet = self.ref = self.optimizer = None


def build_variant(name: str, spec: Spec) -> TrainerVariant | BaselineDPO:
    """Variant names: sft, mapo, dpo, dpo_bf16ref, dpo_actor, xdpo, baseline, baseline_fused."""
    if name == "baseline":
        return BaselineDPO(spec)
    if name == "baseline_fused":
        return BaselineDPO(replace(spec, fused_adam="on"), label="baseline dpo + fused AdamW")
    if name == "dpo_actor":
        return TrainerVariant(spec, "dpo", reference="actor", label="dpo (reference on a Ray actor)")
    if name == "dpo_bf16ref":
        return TrainerVariant(spec, "dpo", reference="colocated_bf16", label="dpo (bf16 reference copy)")
    labels = {"dpo": "dpo (reference colocated)", "xdpo": "xdpo (reference colocated)"}
    return TrainerVariant(spec, name, label=labels.get(name, name))


def reference_dtype_note(spec: Spec) -> str:
    """What `spec.reference_dtype` resolves to for the colocated / actor reference rows."""
    from diffalign.models.precision import resolve_reference_dtype

    mp = MIXED_PRECISION[spec.dtype]
    dtype = str(resolve_reference_dtype(spec.reference_dtype, mp, spec.device)).removeprefix("torch.")
    return f"reference.dtype {spec.reference_dtype} ({dtype} reference copy)"


def spec_dict(spec: Spec) -> dict:
    return asdict(spec)
