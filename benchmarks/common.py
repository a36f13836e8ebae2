"""Shared pieces of the benchmarks: model configs, random inputs, the step variants, timing, results.

The benchmarks run as scripts (``python benchmarks/step_time.py ...``) so this module is imported
as ``common`` from the scripts' own folder.

Models:
- ``tiny``: the tiny random SD1.5-style UNet of ``diffalign.models.tiny`` (32 px images, 8x8 latents).
- ``sd15`` / ``sdxl``: random-init UNets built from the real SD1.5 / SDXL UNet configs (no weights are
  downloaded); the text encoders and the VAE are replaced by random prompt embeddings of the right
  shapes, so only the training step is timed.

Step variants:
- ``TrainerVariant``: one ``diffalign.train.loop.Trainer.train_step`` (data batch from cached latents,
  ``PreferenceStep``, backward, grad norm + clip, guard, AdamW step, reference hook), i.e. exactly the
  code a training run executes per optimizer step.
- ``BaselineDPO``: a plain PyTorch Diffusion-DPO step written the way diffusers'
  ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`` computes it.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import platform as _stdlib_platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Real SD1.5 UNet config (runwayml/stable-diffusion-v1-5 unet/config.json), random init.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)

# Real SDXL base UNet config (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json), random init.
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
    norm_num_groups=32,
)

# Real SD1.5 / SDXL VAE config (the two share the architecture; only scaling_factor differs), random init.
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
)

# Conditioning shapes: (tokens, hidden size, pooled size or None).
TEXT_SHAPES = {"tiny": (16, 32, None), "sd15": (77, 768, None), "sdxl": (77, 2048, 1280)}
FAMILY = {"tiny": "sd15", "sd15": "sd15", "sdxl": "sdxl"}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
PROMPTS = tuple(f"prompt {i}" for i in range(64))


# ----------------------------------------------------------------------------- models and inputs


def noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, prediction_type="epsilon")


def build_unet(model: str, device: str | torch.device = "cpu", seed: int = 0):
    """A random-init fp32 UNet of the given size, built directly on `device`."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if model == "tiny":
        from diffalign.models.tiny import build_tiny_bundle

        return build_tiny_bundle("sd15", seed=seed).unet.to(device)
    cfg = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}[model]
    with torch.device(device):
        return UNet2DConditionModel(**cfg)


def latent_shape(model: str) -> tuple[int, int, int]:
    size = {"tiny": 8, "sd15": 64, "sdxl": 128}[model]
    return (4, size, size)


def pixel_resolution(model: str) -> int:
    return latent_shape(model)[1] * (4 if model == "tiny" else 8)


class StaticPromptEncoder:
    """Stands in for the frozen text encoders: one fixed random embedding per prompt (CPU tensors)."""

    def __init__(self, model: str, prompts=PROMPTS, seed: int = 0) -> None:
        from diffalign.models.conditioning import Conditioning

        self._cls = Conditioning
        tokens, dim, pooled = TEXT_SHAPES[model]
        g = torch.Generator().manual_seed(seed + 17)
        self.res = pixel_resolution(model)
        self.embeds = {p: torch.randn(tokens, dim, generator=g) for p in prompts}
        self.pooled = {p: torch.randn(pooled, generator=g) for p in prompts} if pooled else None

    def __call__(self, prompts, original_sizes=None, crop_top_lefts=None):
        embeds = torch.stack([self.embeds[p] for p in prompts])
        if self.pooled is None:
            return self._cls(embeds)
        pooled = torch.stack([self.pooled[p] for p in prompts])
        r = self.res
        time_ids = torch.tensor([[r, r, 0, 0, r, r]] * len(prompts), dtype=torch.float32)
        return self._cls(embeds, pooled, time_ids)


def pair_items(model: str, n: int, seed: int = 0) -> list[dict]:
    """Cached-latent pair items, as ``CachedPairs`` yields them (CPU tensors)."""
    g = torch.Generator().manual_seed(seed)
    shape = latent_shape(model)
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "chosen_latents": torch.randn(shape, generator=g),
             "rejected_latents": torch.randn(shape, generator=g)} for i in range(n)]


def compile_unet(unet, how: str) -> None:
    """In-place torch.compile of the whole UNet or of each down / mid / up block."""
    if how == "none":
        return
    if how == "unet":
        unet.compile()
    elif how == "blocks":
        for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
            block.compile()
    else:
        raise ValueError(f"compile must be none, unet or blocks, got {how!r}")


# ----------------------------------------------------------------------------- step variants


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
        from diffalign.models.bundle import ModelBundle
        from diffalign.models.denoiser import Denoiser
        from diffalign.objectives import build_objective, objective_needs_reference
        from diffalign.models.precision import resolve_reference_dtype
from diffalign.reference import build_reference
        from diffalign.timesteps import build_timestep_sampler, reward_scale
        from diffalign.train.engine import TorchEngine, build_optimizer
        from diffalign.train.loop import Trainer
        from diffalign.train.setup import DTYPES as MP_DTYPES
        from diffalign.train.setup import Setup, prepare_policy
        from diffalign.train.step import PreferenceStep

        self.spec, self.objective, self.reference_kind = spec, objective, reference
        self.label = label or objective
        self.needs_reference = objective_needs_reference(objective)
        cfg = RunConfig()
        cfg.model.family = FAMILY[spec.model]
        cfg.model.finetune = spec.finetune
        cfg.model.gradient_checkpointing = spec.grad_checkpointing
        cfg.model.mixed_precision = "bf16" if spec.dtype == "bf16" else "no"
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
            r = cfg.reference
            ref = build_reference(r.strategy, unet, denoiser, tau=r.tau, delta=r.delta, on_exceed=r.on_exceed,
                                  dtype=resolve_reference_dtype(r.dtype, cfg.model.mixed_precision, device))
        t = cfg.timesteps
        step = PreferenceStep(
            denoiser, build_objective(objective, **cfg.objective.params()), ref,
            build_timestep_sampler(t.sampler, bundle.num_train_timesteps, t.timestep_gamma, t.num_bins),
            reward_scale(t.reward_scale, sched.alphas_cumprod), cfg.reference.divergence_samples,
            autocast_dtype=MP_DTYPES[cfg.model.mixed_precision],
        )
        setup = Setup(cfg, bundle, groups, denoiser, step, StaticPromptEncoder(spec.model), None)
        compile_unet(unet, spec.compile)
        if getattr(ref, "ref_unet", None) is not None:
            compile_unet(ref.ref_unet, spec.compile)
        params = [p for g in groups for p in g["params"]]
        optimizer = build_optimizer(groups, cfg.optim, fused=spec.fused())
        self.optimizer_desc = _optimizer_desc(optimizer)
        engine = TorchEngine(unet, params, optimizer, cfg.optim, cfg.train.max_steps)
        self.trainer = Trainer(cfg, setup=setup, train_data=pair_items(spec.model, max(64, 2 * spec.batch)),
                               device=device, engine=engine, checkpoint_dir=self._tmp.name)
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


def ensure_ray(num_cpus: int | None = None):
    """A local Ray instance for the benchmarks (one intra-op thread per actor, small object store)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus or max(8, os.cpu_count() or 8), include_dashboard=False,
                 log_to_driver=False, object_store_memory=256 * 2**20,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    return ray


def make_actor_reference(unet, cfg):
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
        self.autocast = DTYPES[spec.dtype]
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

    def _unet_kwargs(self, cond, dtype):
        kw = {"encoder_hidden_states": cond.prompt_embeds.to(self.device, dtype).repeat(2, 1, 1)}
        if cond.pooled_embeds is not None:
            kw["added_cond_kwargs"] = {
                "text_embeds": cond.pooled_embeds.to(self.device, dtype).repeat(2, 1),
                "time_ids": cond.add_time_ids.to(self.device, dtype).repeat(2, 1),
            }
        return kw

    def _ctx(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

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


def build_variant(name: str, spec: Spec):
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

    mp = "bf16" if spec.dtype == "bf16" else "no"
    dtype = str(resolve_reference_dtype(spec.reference_dtype, mp, spec.device)).removeprefix("torch.")
    return f"reference.dtype {spec.reference_dtype} ({dtype} reference copy)"


# ----------------------------------------------------------------------------- timing and memory


def set_threads(threads: int | None, device: str) -> None:
    """CPU runs default to one intra-op thread: on a small shared machine OpenMP threads that wait
    on each other under oversubscription make step times erratic (seen: 20x slower)."""
    if threads is None and torch.device(device).type == "cpu":
        threads = 1
    if threads:
        torch.set_num_threads(threads)


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    """Seconds one call of `fn` takes, device work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median_ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds)


def iqr_ms(seconds: list[float]) -> tuple[float, float]:
    if len(seconds) < 4:
        return 1000.0 * min(seconds), 1000.0 * max(seconds)
    q = statistics.quantiles(seconds, n=4)
    return 1000.0 * q[0], 1000.0 * q[2]


def free_device_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_freed_memory() -> None:
    """Collects garbage and hands freed heap pages back to the OS (glibc malloc_trim), so that RSS
    measured afterwards does not include memory a later allocation would silently reuse."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Resets the kernel's resident-set high-water mark of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """High-water mark of the resident set since the last reset (VmHWM), else since the start (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_child(argv: list[str], timeout: float | None = None, env: dict | None = None) -> dict:
    """Runs `python <argv>` and parses the last stdout line that is a JSON object."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"child exited {proc.returncode}: " + " | ".join(tail)}


# ----------------------------------------------------------------------------- machine and results


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return _stdlib_platform.processor() or "unknown"


def machine(device: str) -> dict:
    import diffusers

    info = {
        "python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "host": _stdlib_platform.node(),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def device_tag(device: str) -> str:
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0)
    m = re.search(r"\b([A-Z]\d{2,3}[A-Z]?)\b", name)
    return m.group(1).lower() if m else "cuda"


def describe_machine(info: dict) -> str:
    lines = [f"- CPU: {info['cpu']} ({info['cpu_count']} logical cores visible, torch threads "
             f"{info['torch_threads']})"]
    if "gpu" in info:
        lines.append(f"- GPU: {info['gpu']} ({info['gpu_memory_gib']} GiB), CUDA {info['cuda']}, "
                     f"cuDNN {info['cudnn']}")
    lines.append(f"- Python {info['python']}, torch {info['torch']}, diffusers {info['diffusers']}")
    return "\n".join(lines)


def fmt(x, digits: int = 1) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(rows: list[dict], columns: list[tuple]) -> str:
    """`columns`: (key, header) or (key, header, digits) tuples; missing values print as an em dash."""
    head = "| " + " | ".join(c[1] for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(c[0]), *c[2:]) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def command_line() -> str:
    script = os.path.relpath(sys.argv[0], Path(__file__).resolve().parent.parent)
    return " ".join(["python", script, *sys.argv[1:]])


def write_results(name: str, device: str, payload: dict, markdown: str, out_dir: str | Path | None = None,
                  title: str | None = None) -> tuple[Path, Path]:
    """Writes <out_dir>/<name>-<device>.json and .md (the table, the machine and the command)."""
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    tag = device_tag(device)
    info = machine(device)
    payload = {"benchmark": name, "device": tag, "machine": info, "command": command_line(),
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **payload}
    stem = f"{name}-{tag}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    text = [f"# {title or name} ({tag})", "", markdown.rstrip(), "", "## Machine", describe_machine(info), "",
            "## Command", "```", payload["command"], "```", ""]
    md_path.write_text("\n".join(text))
    return json_path, md_path


def spec_dict(spec: Spec) -> dict:
    return asdict(spec)
