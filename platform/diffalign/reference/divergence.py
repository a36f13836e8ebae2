"""The reference-drift estimate of Kang et al. (AAAI 2026), eq. 8, a non-negative variant, the fixed
probe set they are evaluated on, and their pooling over data-parallel ranks.

    D_KL(p_ref, p_init) ≈ T · E_{x0, t, x_t} [ KL(q(x_{t-1}|x_{0,t}) ‖ p_ref(x_{t-1}|x_t))
                                             − KL(q(x_{t-1}|x_{0,t}) ‖ p_init(x_{t-1}|x_t)) ]   (8)

For Gaussian reverse steps each KL term is ω(t)·||target − prediction||², so eq. 8 is a difference
of denoising errors. Both estimators below are per-ELEMENT means without the factor T or ω(t): the
units in which the paper's δ = 0.005 (SD1.5) and 0.002 (SDXL) make sense.

- `signed` (the paper, the default): err_ref − err_init, err = mean over elements of
  (prediction − target)². It is negative when the reference denoises the chosen images better
  than the initial model. When the preference data is far from what the initial model generates,
  fitting it lowers err_ref further the more the model moves: the estimate goes more negative,
  never reaches δ, and the reference never freezes.
- `eps_mse`: mean over elements of (pred_ref − pred_init)². Two reverse steps with the same
  variance have KL(p_ref(x_{t-1}|x_t) ‖ p_init(x_{t-1}|x_t)) = ω(t)·||eps_ref − eps_init||², so this
  is the chain's KL with x_t drawn from q (the approximation of eq. 7) up to ω(t) and T:
  non-negative and zero only when the two models predict the same. With v-prediction it is
  measured on v (the eps difference is sqrt(ᾱ_t) times the v difference). Use it when the data is
  far from the initial model's samples, or whenever the bound must hold however well the
  reference fits the data.

They are related by signed = eps_mse + 2·mean((pred_ref − pred_init)·(pred_init − target)). If
the initial model is the MSE-optimal denoiser of the probe data, E[pred_init − target | x_t] = 0,
the cross term vanishes in expectation and both estimate the same number: so the eps_mse bound
defaults to δ. A reference that fits the data better than the initial model makes the cross term
negative, and eps_mse then reaches a given δ no later than signed does.

Probe set: the first `divergence_samples` chosen latents a rank sees (`PreferenceStep` collects
them across micro-batches), with fresh timesteps uniform over all T training timesteps and fresh
noise, drawn once from a generator seeded with `PROBE_SEED + rank` of the rank the latents came
from (`fix_probe`; the training step's timesteps may be skewed to high noise, which would bias the
estimate). The set is fixed for the run and saved with the reference, so successive checks differ
only by the model; `stderr` is the standard error of the probe mean (sample std / sqrt(n)), the
sampling error those checks share. The set is fixed at the first step it is complete (step
ceil(n / (batch_size * grad_accum)), before the first check); a run resumed from a checkpoint
written before that step collects it from the data it reads after the resume.

Ranks: the probe sets of all ranks are gathered once (`gather_probe`) into one set held by every
rank (so a resume, which loads rank 0's checkpoint everywhere, restores the whole set); each rank
evaluates its share (samples i ≡ rank mod world size) and the sums, sums of squares and counts
are all-reduced (`pooled_estimates`): every rank gets the mean over all ranks' probes, hence the
same decision. Since each sample's noise depends only on its own rank, the pooled estimate is
exactly the count-weighted mean of what each rank alone would estimate. The Ray reference actor
gets the gathered set from rank 0 and evaluates all of it: the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffalign.models.conditioning import Conditioning
from diffalign.models.denoiser import Denoiser, per_sample_mse

PROBE_SEED = 8_2026  # timesteps and noise of the probe set: the same in every run and placement
PROBE_CHUNK = 8  # probe samples per no-grad forward (bounds activation memory at SDXL sizes)


@torch.no_grad()
def estimate_reference_kl(
    ref_errors: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    init_errors: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    target: torch.Tensor,
) -> float:
    """Mean of err_ref − err_init over the probe batch (the `signed` estimate on one process)."""
    return float((ref_errors(noisy, timesteps, target) - init_errors(noisy, timesteps, target)).mean())


def per_sample_divergences(pred_ref: torch.Tensor, pred_init: torch.Tensor,
                           target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Both estimators per sample, (B,) float32 each (see module docstring)."""
    return {"signed": per_sample_mse(pred_ref, target) - per_sample_mse(pred_init, target),
            "eps_mse": per_sample_mse(pred_ref, pred_init)}


@dataclass(frozen=True)
class Estimate:
    mean: float
    stderr: float  # sample std / sqrt(n); nan for n < 2
    n: int         # probe samples over all ranks


def data_parallel_world(world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size) the estimate is pooled over.

    `world_size` is what the trainer runs with: 1 pools nothing, > 1 needs the default
    torch.distributed group of that size (DDP and DeepSpeed both initialize it). None: the default
    group if one is initialized, else one process.
    """
    initialized = dist.is_available() and dist.is_initialized()
    if world_size is None:
        return (dist.get_rank(), dist.get_world_size()) if initialized else (0, 1)
    if world_size == 1:
        return 0, 1
    if not initialized:
        raise RuntimeError(f"the trainer runs with world_size={world_size} but torch.distributed is not "
                           "initialized: the reference decisions cannot be made the same on every rank")
    if dist.get_world_size() != world_size:
        raise RuntimeError(f"the trainer runs with world_size={world_size} but the torch.distributed group "
                           f"has {dist.get_world_size()} ranks")
    return dist.get_rank(), world_size


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo (and the CPU part of a mixed backend) takes CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pooled_estimates(values: dict[str, torch.Tensor], world: int) -> dict[str, Estimate]:
    """Mean and standard error of each per-sample estimator over every rank's samples."""
    names = sorted(values)
    rows = []
    for name in names:
        v = values[name].detach().double().flatten().cpu()
        count = torch.tensor(float(v.numel()), dtype=torch.float64)
        rows.append(torch.stack([v.sum(), v.pow(2).sum(), count]))
    sums = torch.stack(rows)
    if world > 1:
        sums = sums.to(_collective_device())
        dist.all_reduce(sums)
        sums = sums.cpu()
    out = {}
    for name, (s, ss, n) in zip(names, sums.tolist()):
        if n < 1:
            raise ValueError("the drift estimate got no probe samples")
        mean = s / n
        var = (ss - s * s / n) / (n - 1) if n > 1 else math.nan
        out[name] = Estimate(mean, math.sqrt(max(var, 0.0) / n) if n > 1 else math.nan, int(n))
    return out


def cat_conditioning(parts: list[Conditioning]) -> Conditioning:
    """Conditionings of several batches stacked along the batch."""
    return Conditioning.cat(parts)


def gather_probe(probe: dict | None, world: int) -> dict:
    """Every rank's probe (tensors and "cond"), concatenated in rank order, on every rank.

    A collective when world > 1: every rank must call it at the same step. A rank without a
    probe makes every rank raise (they all see the gathered list).
    """
    if world == 1:
        if probe is None:
            raise ValueError("no probe set to fix")
        return probe
    local = None
    if probe is not None:
        local = {k: v.detach().cpu() for k, v in probe.items() if torch.is_tensor(v)}
        local["cond"] = {k: v.detach().cpu() for k, v in probe["cond"].tensors().items()}
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    missing = [r for r, p in enumerate(parts) if p is None]
    if missing:
        raise ValueError(f"ranks {missing} have no probe set of chosen latents yet")
    device = next(v for v in probe.values() if torch.is_tensor(v)).device
    out = {k: torch.cat([p[k] for p in parts]).to(device) for k in parts[0] if k != "cond"}
    conds = [Conditioning(**p["cond"]) for p in parts]
    out["cond"] = cat_conditioning(conds).to(device)
    return out


def fix_probe(probe: dict, denoiser: Denoiser, seed: int = PROBE_SEED) -> dict:
    """The probe batch {noisy, timesteps, target, cond} the checks are evaluated on.

    Chosen latents ({"latents", "cond", "source_rank"}) get timesteps uniform over all training
    timesteps and noise, the samples of source rank r (in their order) from a generator seeded
    with `seed + r`; a probe that already holds noisy / timesteps / target is used as given.
    """
    if "latents" not in probe:
        return {k: probe[k] for k in ("noisy", "timesteps", "target", "cond")}
    x0 = probe["latents"].float()
    n, device = x0.shape[0], x0.device
    source = probe.get("source_rank")
    source = torch.zeros(n, dtype=torch.long) if source is None else source.cpu().long()
    num_t = int(denoiser.scheduler.config.num_train_timesteps)
    timesteps = torch.empty(n, dtype=torch.long)
    noise = torch.empty(x0.shape, dtype=torch.float32)
    for r in source.unique().tolist():
        idx = (source == r).nonzero().flatten()
        g = torch.Generator().manual_seed(seed + r)
        timesteps[idx] = torch.randint(0, num_t, (len(idx),), generator=g)
        noise[idx] = torch.randn((len(idx), *x0.shape[1:]), generator=g)
    timesteps, noise = timesteps.to(device), noise.to(device)
    noisy, target = denoiser.noisy_and_target(x0, noise, timesteps)
    return {"noisy": noisy, "timesteps": timesteps, "target": target, "cond": probe["cond"]}
