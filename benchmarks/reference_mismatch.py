"""Reference-mismatch study: how close to the chosen images DPO (frozen reference, a beta sweep), DPO with
threshold-bounded reference updates, MaPO (reference free, a beta sweep) and SFT get as the chosen images
move away from the base model, over several training seeds.

    python benchmarks/reference_mismatch.py            # CPU, tiny model: ~11 CPU minutes on one core
    python benchmarks/reference_mismatch.py --levels 0.4 --seeds 0 --steps 5 --pretrain-steps 5  # smoke
    python benchmarks/reference_mismatch.py --from-json benchmarks/results/reference_mismatch.json
                                                       # rebuild the tables and the plot, no training

1. Pretrain the tiny SD1.5-style model with SFT on a "base" distribution (gray-tinted SyntheticPairs
   textures); the pretrained model is the starting point and the frozen reference of every run (shared
   by all seeds).
2. For each mismatch level build a preference dataset: chosen images red-tinted with ``shift = level``
   (farther from the base as the level grows), rejected images base-like (the base's gray tint), the
   two sharing a texture.
3. Train every configuration (DPO frozen reference at each of ``--dpo-betas``, MaPO at each of
   ``--mapo-betas`` with ``margin_weight`` derived from beta by the objective, DPO with a
   periodic_threshold reference, SFT) from the same base with equal budgets, once per training seed in
   ``--seeds``: ``train.seed`` sets the data order and the timestep / noise draws of the run (a full
   fine-tune of the shared base has no random init of its own).
4. Sample with fixed seeds (same prompts and initial noise for every model) and measure the samples'
   ``red_fraction``. The primary metric is the distance to target: the 1-D Wasserstein-1 distance
   between the samples' red_fraction values and the chosen images' (lower = better; 0 only when the
   two distributions match). Also reported: the signed error of the mean (sample red − chosen red:
   > 0 overshoots past the chosen images, < 0 falls short) and the gain over the base model's samples
   (seed-matched), which on its own would count overshooting as success. Held-out denoising errors on
   chosen images and the samples' texture contrast show whether a model fits the chosen images.
5. Every number in the tables is a mean over training seeds ± its standard error across seeds.
   Differences between two configurations are paired by training seed (same data order and noise).
   The computed summary picks, per level and method, the beta with the lowest mean distance and calls
   a difference resolved only when its 95% t-interval across seeds excludes 0.

The tiny random VAE normalises global colour away (its GroupNorms remove channel means), so decoded
colours would say nothing about what the UNet learned. The study sets the VAE's weights to a fixed
linear map instead: the encoder is a 4x4 average pooling of RGB into latent channels 0-2 (channel 3
zero), the decoder a nearest-neighbour upsampling; red_fraction of a decoded sample is exactly that of
the latent the UNet generated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from measure import RESULTS_DIR, command_line, describe_machine, machine  # noqa: E402
from torch import nn  # noqa: E402

FAMILIES = {
    "dpo_frozen": "DPO, frozen reference",
    "mapo": "MaPO (reference free)",
    "dpo_threshold": "DPO + periodic_threshold reference",
    "sft": "SFT on chosen (imitation, for scale)",
}
BASE_SHIFT = 0.3  # gray tint of the base distribution and of the rejected images
# two-sided 95% quantiles of Student's t by degrees of freedom (larger df: the nearest smaller entry)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _seeds(text: str) -> list[int]:
    from diffalign.specs import parse_seeds

    return parse_seeds(text)


def _run_id(family: str, beta: float | None) -> str:
    return family if beta is None else f"{family}@{beta:g}"


def run_specs(args) -> list[dict]:
    """The configurations trained at every level and seed, in table order."""
    specs = [{"family": "dpo_frozen", "beta": float(b)} for b in args.dpo_betas]
    specs += [{"family": "mapo", "beta": float(b)} for b in args.mapo_betas]
    if args.with_threshold:
        specs.append({"family": "dpo_threshold", "beta": float(args.threshold_beta)})
    if args.with_sft:
        specs.append({"family": "sft", "beta": None})
    for s in specs:
        s["run"] = _run_id(s["family"], s["beta"])
    return specs


# ----------------------------------------------------------------------------- statistics


def mean_se(values) -> tuple[float, float, int]:
    """Mean, standard error of the mean (sample std / sqrt(n); nan for n < 2) and n."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    n = int(v.size)
    if n == 0:
        return math.nan, math.nan, 0
    se = float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return float(v.mean()), se, n


def t95(df: int) -> float:
    if df < 1:
        return math.nan
    return _T95[max(k for k in _T95 if k <= df)]


def wasserstein1(u, v) -> float:
    """1-D Wasserstein-1 (earth mover's) distance between two samples: the integral of |F_u − F_v|."""
    u, v = np.sort(np.asarray(u, np.float64)), np.sort(np.asarray(v, np.float64))
    grid = np.sort(np.concatenate([u, v]))
    cu = np.searchsorted(u, grid[:-1], side="right") / u.size
    cv = np.searchsorted(v, grid[:-1], side="right") / v.size
    return float(np.sum(np.abs(cu - cv) * np.diff(grid)))


# ----------------------------------------------------------------------------- a colour-preserving VAE


@torch.no_grad()
def make_pixel_vae(vae, gain: float = 1.0) -> None:
    """Sets an AutoencoderKL's weights (block_out_channels (16, 32, 32), 8 groups) to a linear map.

    Every residual branch and attention output is zeroed (identity blocks), shortcuts copy channels,
    downsamplers average 2x2, upsamplers repeat. The only normalisations left on the main path are the
    two ``conv_norm_out`` GroupNorms; each of their groups holds a channel and its negation (zero group
    mean) and a huge eps makes the division by the group std a constant, and
    ``SiLU(y) - SiLU(-y) = y`` undoes the activation exactly. Result: latents = ``gain`` x the 4x4
    average of R, G, B (channel 3 zero); decode = nearest upsampling of latent channels 0-2.
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

    def zero(m: nn.Module) -> None:
        for p in m.parameters():
            p.zero_()

    def center(conv: nn.Conv2d, pairs: list[tuple[int, int, float]]) -> None:
        zero(conv)
        k = conv.kernel_size[0] // 2
        for o, i, w in pairs:
            conv.weight[o, i, k, k] = w

    for m in vae.modules():
        if isinstance(m, ResnetBlock2D):
            zero(m.conv2)
            if m.conv_shortcut is not None:
                n = min(m.conv_shortcut.in_channels, m.conv_shortcut.out_channels)
                center(m.conv_shortcut, [(c, c, 1.0) for c in range(n)])
        elif isinstance(m, Attention):
            zero(m.to_out[0])
        elif isinstance(m, Downsample2D):
            zero(m.conv)
            for c in range(m.conv.out_channels):
                m.conv.weight[c, c, :2, :2] = 0.25
        elif isinstance(m, Upsample2D):
            center(m.conv, [(c, c, 1.0) for c in range(m.conv.out_channels)])
    enc, dec = vae.encoder, vae.decoder
    big_eps = 1e8
    # Encoder: channel pairs (R,-R), (G,-G), (B,-B) at 0/1, 4/5, 8/9: one pair per 4-channel group of the
    # 32-channel conv_norm_out.
    center(enc.conv_in, [(4 * c, c, 1.0) for c in range(3)] + [(4 * c + 1, c, -1.0) for c in range(3)])
    enc.conv_norm_out.eps = big_eps
    enc.conv_norm_out.weight.fill_(math.sqrt(big_eps))
    enc.conv_norm_out.bias.zero_()
    zero(enc.conv_out)
    for c in range(3):
        enc.conv_out.weight[c, 4 * c, 1, 1] = gain
        enc.conv_out.weight[c, 4 * c + 1, 1, 1] = -gain
    enc.conv_out.bias[4:].fill_(-30.0)  # log-variance: a (practically) deterministic posterior
    if vae.quant_conv is not None:
        center(vae.quant_conv, [(c, c, 1.0) for c in range(vae.quant_conv.out_channels)])
    if vae.post_quant_conv is not None:
        center(vae.post_quant_conv, [(c, c, 1.0) for c in range(vae.post_quant_conv.out_channels)])
    # Decoder: pairs at 0/1, 2/3, 4/5: one pair per 2-channel group of the 16-channel conv_norm_out.
    center(dec.conv_in, [(2 * c, c, 1.0 / gain) for c in range(3)]
           + [(2 * c + 1, c, -1.0 / gain) for c in range(3)])
    dec.conv_norm_out.eps = big_eps
    dec.conv_norm_out.weight.fill_(math.sqrt(big_eps))
    dec.conv_norm_out.bias.zero_()
    zero(dec.conv_out)
    for c in range(3):
        dec.conv_out.weight[c, 2 * c, 1, 1] = 1.0
        dec.conv_out.weight[c, 2 * c + 1, 1, 1] = -1.0


# ----------------------------------------------------------------------------- study


def _config(args, out: Path, objective: str, seed: int = 0, **extra):
    from diffalign.config import load_config

    sets = [
        f"train.output_dir={out}", f"train.max_steps={extra.pop('steps', args.steps)}",
        "train.progress=false", "train.eval_every=0", "train.resume=false", "train.checkpoint_every=100000",
        f"train.seed={seed}", "guard.enabled=false", "tracking.mlflow=false", "model.finetune=full",
        f"optim.lr={args.lr}", f"optim.batch_size={args.batch_size}", "optim.warmup_steps=0",
        f"objective.name={objective}",
    ]
    sets += [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    return load_config(None, sets)


def _method_config(args, out: Path, spec: dict, seed: int):
    family, beta = spec["family"], spec["beta"]
    if family == "dpo_frozen":
        return _config(args, out, "dpo", seed, objective__beta=beta, reference__strategy="frozen")
    if family == "dpo_threshold":
        return _config(args, out, "dpo", seed, objective__beta=beta,
                       reference__strategy="periodic_threshold", reference__tau=args.tau,
                       reference__delta=args.delta, reference__on_exceed="freeze",
                       reference__divergence=args.divergence)
    if family == "mapo":
        # margin_weight is left to the objective (derived from beta)
        return _config(args, out, "mapo", seed, objective__beta=beta, reference__strategy="none")
    if family == "sft":
        return _config(args, out, "sft", seed, reference__strategy="none")
    raise ValueError(family)


class _RefHistory:
    """Trainer callback: the reference policy's drift estimate, its standard error, version and state at
    each check, up to the check that froze it."""

    def __init__(self, tau: int) -> None:
        self.tau, self.checks = tau, []

    def on_step(self, trainer, metrics: dict) -> None:
        if trainer.step % self.tau or "ref/divergence" not in metrics:
            return
        if self.checks and self.checks[-1]["frozen"]:
            return
        self.checks.append({"step": trainer.step, "kl": metrics["ref/divergence"],
                            "stderr": metrics.get("ref/divergence_stderr"),
                            "n": metrics.get("ref/divergence_n"),
                            "eps_mse": metrics.get("ref/divergence_eps_mse"),
                            "version": metrics["ref/version"], "frozen": bool(metrics["ref/frozen"])})


def _train(cfg, bundle, data) -> dict:
    from diffalign.train.driver import build_trainer
    from diffalign.train.setup import build_setup

    setup = build_setup(cfg, "cpu", bundle=bundle)
    history = _RefHistory(cfg.reference.tau)
    trainer = build_trainer(cfg, setup=setup, device="cpu", train_data=data, heldout_data=None,
                            callbacks=[history])
    t0 = time.perf_counter()
    summary = trainer.fit()
    summary["train_s"] = time.perf_counter() - t0
    summary["ref_checks"] = history.checks
    bundle.unet.eval()
    return summary


def _samples(bundle, prompts: list[str], seeds: list[int], args) -> torch.Tensor:
    """Seed-matched samples as a ``(N, 3, H, W)`` tensor in [-1, 1] (one pipeline call per
    ``--sample-batch`` items; each item's initial noise comes from its own seed)."""
    from diffalign.models.sampling import generate

    images = generate(bundle, bundle.unet, prompts, seeds, steps=args.sample_steps,
                      guidance_scale=args.guidance_scale, batch_size=args.sample_batch)
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in images])
    return x.permute(0, 3, 1, 2) / 127.5 - 1.0


def _chosen(data) -> torch.Tensor:
    return torch.stack([data[i]["chosen"] for i in range(len(data))])


def _contrast(x: torch.Tensor) -> float:
    """Texture contrast: the spatial pixel std per image and channel, averaged (a colour offset does not
    count; noise-like samples score high)."""
    return float(x.flatten(2).std(2).mean())


@torch.no_grad()
def _errors(bundle, data, n_draws: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element denoising errors on a dataset's chosen / rejected images under fixed noise and
    timesteps (the same draws for every model), ``(n_draws * len(data),)`` each."""
    from diffalign.data.collate import collate_pairs
    from diffalign.models.conditioning import PromptEncoder
    from diffalign.models.denoiser import Denoiser
    from diffalign.train.step import LatentEncoder, make_batch

    batch = make_batch(collate_pairs([data[i] for i in range(len(data))]), PromptEncoder(bundle),
                       LatentEncoder(bundle), "cpu")
    den = Denoiser(bundle.noise_scheduler)
    g = torch.Generator().manual_seed(0)
    ew, el = [], []
    for _ in range(n_draws):
        t = torch.randint(0, bundle.num_train_timesteps, (batch.chosen.shape[0],), generator=g)
        noise = torch.randn(batch.chosen.shape, generator=g)
        for lat, acc in ((batch.chosen, ew), (batch.rejected, el)):
            noisy, target = den.noisy_and_target(lat, noise, t)
            acc.append(den.errors(bundle.unet, noisy, t, batch.cond, target))
    return torch.cat(ew), torch.cat(el)


def _w1_floor(chosen: np.ndarray, n: int, draws: int = 200) -> float:
    """Mean W1 between ``n`` values drawn with replacement from ``chosen`` and ``chosen`` itself: the
    distance a model sampling the chosen distribution exactly would get from ``n`` samples."""
    rng = np.random.default_rng(0)
    return float(np.mean([wasserstein1(rng.choice(chosen, n), chosen) for _ in range(draws)]))


def _pretrained_base(args, bundle, base_data, work: Path) -> dict:
    cache = Path(args.base_cache) if args.base_cache else None
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=True)
        bundle.unet.load_state_dict(saved["unet"])
        print(f"base model loaded from {cache}", flush=True)
        return {"loss": saved["loss"], "train_s": 0.0, "cached": str(cache)}
    print(f"pretraining: SFT, {args.pretrain_steps} steps, batch {args.pretrain_batch_size}", flush=True)
    cfg = _config(args, work / "pretrain", "sft", 0, reference__strategy="none", steps=args.pretrain_steps,
                  optim__lr=args.pretrain_lr, optim__batch_size=args.pretrain_batch_size)
    pre = _train(cfg, bundle, base_data)
    if cache is not None:
        torch.save({"unet": bundle.unet.state_dict(), "loss": pre.get("loss")}, cache)
    return pre


def _hyperparameters(args, specs: list[dict], work: Path) -> dict:
    """What each configuration's objective and the threshold reference actually run with (from the
    built config and objective, so derived values such as MaPO's margin_weight are the library's)."""
    from diffalign.objectives import build_objective

    out = {}
    for spec in specs:
        cfg = _method_config(args, work / "hp", spec, 0)
        obj = build_objective(cfg.objective.name, **cfg.objective.hyperparameters)
        entry = {"objective": cfg.objective.name, **obj.hparams()}
        if spec["family"] == "dpo_threshold":
            entry["reference"] = dataclasses.asdict(cfg.reference)
        out[spec["run"]] = entry
    return out


def run(args) -> dict:
    from diffalign.data.synthetic import PROMPTS, SyntheticPairs, red_fraction
    from diffalign.models.tiny.diffusion import build_tiny_bundle
    from diffalign.train.step import LatentEncoder

    torch.set_num_threads(args.threads)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    work = Path(tempfile.mkdtemp(prefix="refmismatch-"))
    specs = run_specs(args)
    hparams = _hyperparameters(args, specs, work)
    bundle = build_tiny_bundle("sd15", seed=0, resolution=32)
    make_pixel_vae(bundle.vae)
    base_data = SyntheticPairs(args.num_pairs, 32, seed=100, chosen_color="gray", shift=BASE_SHIFT,
                               rejected_color="gray", rejected_shift=BASE_SHIFT)
    # Unit-variance latents for the diffusion model.
    lat = LatentEncoder(bundle)(_chosen(base_data))
    bundle.vae.register_to_config(scaling_factor=float(bundle.vae.config.scaling_factor / lat[:, :3].std()))

    pre = _pretrained_base(args, bundle, base_data, work)
    timing = {"pretrain_s": pre["train_s"]}
    base_state = {k: v.detach().clone() for k, v in bundle.unet.state_dict().items()}
    prompts = [p for p in PROMPTS for _ in range(args.eval_seeds)]
    seeds = [s for _ in PROMPTS for s in range(1000, 1000 + args.eval_seeds)]
    t0 = time.perf_counter()
    base_x = _samples(bundle, prompts, seeds, args)
    timing["sample_s_each"] = time.perf_counter() - t0
    base_red = red_fraction(base_x)
    base = {"red": float(base_red.mean()), "contrast": _contrast(base_x), "pretrain_loss": pre.get("loss"),
            "data_red": float(red_fraction(_chosen(base_data)).mean()),
            "data_contrast": _contrast(_chosen(base_data)), "n_samples": len(prompts)}
    print(f"base samples: red_fraction {base['red']:+.3f} contrast {base['contrast']:.3f}; base data "
          f"{base['data_red']:+.3f} / {base['data_contrast']:.3f}", flush=True)

    rows, levels = [], []
    n_runs, done = len(args.levels) * len(args.seeds) * len(specs), 0
    for level in args.levels:
        data = SyntheticPairs(args.num_pairs, 32, seed=1, chosen_color="red", shift=level,
                              rejected_color="gray", rejected_shift=BASE_SHIFT)
        held = SyntheticPairs(args.num_pairs // 2, 32, seed=2, chosen_color="red", shift=level,
                              rejected_color="gray", rejected_shift=BASE_SHIFT)
        chosen_red = red_fraction(_chosen(data))
        bundle.unet.load_state_dict(base_state)
        bw, bl = _errors(bundle, held)
        lv = {"level": level, "chosen_red": float(chosen_red.mean()),
              "chosen_red_std": float(chosen_red.std()), "gap": float(chosen_red.mean()) - base["red"],
              "base_w1": wasserstein1(base_red.numpy(), chosen_red.numpy()),
              "w1_floor": _w1_floor(chosen_red.numpy(), len(prompts)),
              "chosen_contrast": _contrast(_chosen(data)), "base_err_w": float(bw.mean()),
              "base_err_l": float(bl.mean()), "base_diff_std": float((bw - bl).std()),
              "base_diff_abs": float((bw - bl).abs().mean())}
        levels.append(lv)
        for seed in args.seeds:
            for spec in specs:
                bundle.unet.load_state_dict(base_state)
                cfg = _method_config(args, work / f"{spec['run']}-{level}-{seed}", spec, seed)
                summary = _train(cfg, bundle, data)
                t0 = time.perf_counter()
                x = _samples(bundle, prompts, seeds, args)
                ew, el = _errors(bundle, held)
                red = red_fraction(x)
                diff = red - base_red
                row = {
                    "level": level, "run": spec["run"], "family": spec["family"], "beta": spec["beta"],
                    "seed": seed, "policy_red": float(red.mean()), "policy_red_std": float(red.std()),
                    "w1": wasserstein1(red.numpy(), chosen_red.numpy()),
                    "bias": float(red.mean()) - lv["chosen_red"],
                    "gain": float(diff.mean()),
                    "gain_se_samples": float(diff.std() / math.sqrt(diff.numel())),
                    "gap_closed": float(diff.mean()) / lv["gap"], "contrast": _contrast(x),
                    "d_err_chosen": float(ew.mean()) - lv["base_err_w"],
                    "d_err_rejected": float(el.mean()) - lv["base_err_l"],
                    "final_loss": summary.get("loss"), "implicit_acc": summary.get("implicit_acc"),
                    "ref_version": summary.get("ref/version"), "ref_frozen": summary.get("ref/frozen"),
                    "ref_checks": summary["ref_checks"], "train_s": summary["train_s"],
                    "eval_s": time.perf_counter() - t0,
                }
                rows.append(row)
                done += 1
                print(f"[{done}/{n_runs} {time.perf_counter() - t_start:.0f}s] shift {level:.2f} seed {seed} "
                      f"{spec['run']:20s} W1 {row['w1']:.3f} bias {row['bias']:+.3f} gain {row['gain']:+.3f} "
                      f"d_err_w {row['d_err_chosen']:+.3f} contrast {row['contrast']:.3f} "
                      f"[{row['train_s']:.0f}+{row['eval_s']:.0f}s] {_checks(row)}", flush=True)
    timing["total_s"] = time.perf_counter() - t_start
    timing["cpu_s"] = time.process_time() - cpu_start
    return {"rows": rows, "levels": levels, "base": base, "timing": timing, "specs": specs,
            "hparams": hparams, "families": FAMILIES}


# ----------------------------------------------------------------------------- aggregation


CELL_METRICS = ("w1", "bias", "gain", "gap_closed", "d_err_chosen", "d_err_rejected", "contrast",
                "final_loss", "implicit_acc", "train_s")


def aggregate(result: dict) -> dict:
    """{(level, run): {metric: (mean, se, n), "seeds": {seed: row}}} over training seeds."""
    groups: dict = {}
    for r in result["rows"]:
        groups.setdefault((r["level"], r["run"]), {})[r["seed"]] = r
    cells = {}
    for key, by_seed in groups.items():
        rows = [by_seed[s] for s in sorted(by_seed)]
        cells[key] = {m: mean_se([r.get(m) for r in rows]) for m in CELL_METRICS}
        cells[key]["seeds"] = by_seed
    return cells


def paired(cells: dict, level: float, run_a: str, run_b: str, metric: str = "w1") -> tuple[float, float, int]:
    """Mean ± standard error over training seeds of (run_a − run_b), paired by seed."""
    a, b = cells[level, run_a]["seeds"], cells[level, run_b]["seeds"]
    return mean_se([a[s][metric] - b[s][metric] for s in sorted(set(a) & set(b))])


def interval(m: float, se: float, n: int) -> tuple[float, float] | None:
    """95% t-interval of a mean over n seeds (None without an error estimate)."""
    if n < 2 or not math.isfinite(se):
        return None
    h = t95(n - 1) * se
    return m - h, m + h


def sign_of(m: float, se: float, n: int) -> int | None:
    """-1 / +1 when the 95% interval excludes 0 below / above, 0 when it contains 0, None when n < 2."""
    ci = interval(m, se, n)
    if ci is None:
        return None
    return -1 if ci[1] < 0 else 1 if ci[0] > 0 else 0


def best_runs(result: dict, cells: dict) -> dict:
    """{(level, family): run with the lowest mean distance to target}."""
    out = {}
    for lv in result["levels"]:
        for fam in FAMILIES:
            runs = [s["run"] for s in result["specs"] if s["family"] == fam]
            if runs:
                out[lv["level"], fam] = min(runs, key=lambda r: cells[lv["level"], r]["w1"][0])
    return out


# ----------------------------------------------------------------------------- outputs


def _checks(row: dict) -> str:
    def one(c: dict) -> str:
        se = c.get("stderr")
        err = f"±{se:.2g}" if se is not None and math.isfinite(se) else ""
        return f"{c['step']}:{c['kl']:+.2g}{err}{'F' if c['frozen'] else ''}"

    return " ".join(one(c) for c in row["ref_checks"]) or "—"


def _f(v, digits: int = 3, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _pm(stat: tuple[float, float, int], digits: int = 3, sign: bool = False) -> str:
    m, se, n = stat
    if n == 0:
        return "—"
    return _f(m, digits, sign) + ("" if n < 2 else f" ± {se:.{digits}f}")


def _diff_text(stat: tuple[float, float, int], digits: int = 3) -> str:
    m, se, n = stat
    ci = interval(m, se, n)
    if ci is None:
        return f"{m:+.{digits}f} ({n} seed: no error estimate)"
    lo, hi = f"{ci[0]:+.{digits}f}", f"{ci[1]:+.{digits}f}"
    return f"{m:+.{digits}f} ± {se:.{digits}f} ({n} seeds, paired; 95% CI [{lo}, {hi}])"


STYLE = {"dpo_frozen": ("o-", ("#9ecae1", "#4292c6", "#08519c", "#08306b")),
         "mapo": ("^-", ("#fdae6b", "#f16913", "#a63603", "#7f2704")),
         "dpo_threshold": ("s--", ("#31a354",)), "sft": ("x:", ("#636363",))}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, specs = aggregate(result), result["specs"]
    levels = [lv["level"] for lv in result["levels"]]
    n_seeds = max(c["w1"][2] for c in cells.values())
    step = (min(np.diff(levels)) if len(levels) > 1 else 0.2) * 0.025  # spreads the error bars apart
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = (("w1", "distance to target: W1(sample red, chosen red)  (lower = better)"),
              ("bias", "sample red − chosen red  (> 0 overshoot, < 0 short)"),
              ("d_err_chosen", "Δ denoising error on held-out chosen images vs base"))
    for i, spec in enumerate(specs):
        fam = spec["family"]
        fmt, colors = STYLE[fam]
        k = [s["run"] for s in specs if s["family"] == fam].index(spec["run"])
        color = colors[min(k, len(colors) - 1)]
        label = FAMILIES[fam] + (f", beta {spec['beta']:g}" if spec["beta"] is not None else "")
        x = np.asarray(levels) + (i - (len(specs) - 1) / 2) * step
        for ax, (metric, _) in zip(axes, panels):
            stats = [cells[lv, spec["run"]][metric] for lv in levels]
            yerr = [0.0 if s[2] < 2 else s[1] for s in stats]
            ax.errorbar(x, [s[0] for s in stats], yerr=yerr, fmt=fmt, color=color, label=label, capsize=3,
                        ms=5, lw=1.2)
    axes[0].plot(levels, [lv["base_w1"] for lv in result["levels"]], "k--", lw=1,
                 label="base model's samples")
    floors = [lv.get("w1_floor") for lv in result["levels"]]
    if all(f is not None for f in floors):
        axes[0].plot(levels, floors, color="0.5", ls=":", lw=1, label="floor (chosen-data subsample)")
    axes[1].plot(levels, [-lv["gap"] for lv in result["levels"]], "k--", lw=1, label="base model's samples")
    for ax, (_, ylabel) in zip(axes, panels):
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xlabel("mismatch level (red tint `shift` of the chosen images)")
        ax.axhline(0, color="gray", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)
    axes[0].legend(fontsize=6.5)
    fig.suptitle("Reference mismatch, tiny model: equal budgets, seed-matched samples; mean ± standard "
                 f"error over {n_seeds} training seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(run: str) -> str:
    fam, _, beta = run.partition("@")
    return {"dpo_frozen": "DPO frozen", "mapo": "MaPO", "dpo_threshold": "DPO threshold",
            "sft": "SFT"}[fam] + (f" (beta {beta})" if beta else "")


def _names(some: list[str], runs: list[str]) -> str:
    return f"all {len(runs)} configurations" if len(some) == len(runs) else ", ".join(map(_label, some))


def _summary(result: dict) -> list[str]:
    """Statements computed from the tables; a difference counts when its 95% t-interval excludes 0."""
    cells = aggregate(result)
    best = best_runs(result, cells)
    levels = [lv["level"] for lv in result["levels"]]
    runs = [s["run"] for s in result["specs"]]
    fams = [f for f in FAMILIES if any(s["family"] == f for s in result["specs"])]
    out = []
    diffs = {}
    for lv in result["levels"]:
        level = lv["level"]
        bests = []
        for fam in fams:
            run = best[level, fam]
            others = [s["run"] for s in result["specs"] if s["family"] == fam and s["run"] != run]
            text = f"{_label(run)} {_pm(cells[level, run]['w1'])}"
            if others:
                nxt = min(others, key=lambda r: cells[level, r]["w1"][0])
                d = paired(cells, level, nxt, run)
                sep = sign_of(*d)
                text += (f", next best beta {nxt.partition('@')[2]}: {_pm(d, 3, True)} farther"
                         + ("" if sep is None else " (resolved)" if sep else " (not resolved)"))
                betas = [s["beta"] for s in result["specs"] if s["family"] == fam]
                if float(run.partition("@")[2]) in (min(betas), max(betas)):
                    text += ", at the edge of the sweep"
            bests.append(text)
        out.append(f"- **shift {level:g}** (chosen red {lv['chosen_red']:+.3f}; base samples' distance "
                   f"{lv['base_w1']:.3f}). Lowest distance per method: " + "; ".join(bests) + ".")
        if "mapo" in fams and "dpo_frozen" in fams:
            d = paired(cells, level, best[level, "mapo"], best[level, "dpo_frozen"])
            diffs[level] = d
            s = sign_of(*d)
            who = (f"MaPO (beta {best[level, 'mapo'].partition('@')[2]}) vs DPO's best beta "
                   f"({best[level, 'dpo_frozen'].partition('@')[2]}, frozen reference)")
            if s is None:
                out.append(f"  - {who}: distance difference {_diff_text(d)}.")
            elif s:
                lo, hi = interval(*d)
                out.append(f"  - At shift {level:g}, MaPO's distance to target is "
                           f"{'lower' if s < 0 else 'higher'} than DPO's best beta by {abs(d[0]):.3f} ± "
                           f"{d[1]:.3f} ({d[2]} seeds, paired; 95% CI of MaPO − DPO [{lo:+.3f}, {hi:+.3f}]).")
            else:
                out.append(f"  - {who}: no difference within error, MaPO − DPO = {_diff_text(d)}.")
            for fam in ("dpo_threshold", "sft"):
                if fam in fams:
                    d2 = paired(cells, level, best[level, "mapo"], best[level, fam])
                    s2 = sign_of(*d2)
                    verdict = {None: "", -1: ": MaPO closer", 1: f": {_label(best[level, fam])} closer",
                               0: ": no difference within error"}[s2]
                    out.append(f"  - MaPO (beta {best[level, 'mapo'].partition('@')[2]}) − "
                               f"{_label(best[level, fam])}: {_diff_text(d2)}{verdict}.")
        over = [r for r in runs if sign_of(*cells[level, r]["bias"]) == 1]
        short = [r for r in runs if sign_of(*cells[level, r]["bias"]) == -1]
        if over:
            out.append(f"  - Overshoot past the chosen red (bias 95% CI above 0): {_names(over, runs)}.")
        if short:
            out.append(f"  - Short of the chosen red (bias 95% CI below 0): {_names(short, runs)}.")
        top_gain = max(runs, key=lambda r: cells[level, r]["gain"][0])
        rank = sorted(runs, key=lambda r: cells[level, r]["w1"][0]).index(top_gain) + 1
        out.append(f"  - Largest gain: {_label(top_gain)} ({_pm(cells[level, top_gain]['gain'], 3, True)} "
                   f"for a gap of {lv['gap']:+.3f}); by distance it ranks {rank} of {len(runs)}.")
    if len(diffs) > 1 and levels[0] in diffs and levels[-1] in diffs:
        seq = " → ".join(f"{diffs[lv][0]:+.3f}" for lv in levels if lv in diffs)
        a = cells[levels[0], best[levels[0], "mapo"]]["seeds"]
        b = cells[levels[0], best[levels[0], "dpo_frozen"]]["seeds"]
        c = cells[levels[-1], best[levels[-1], "mapo"]]["seeds"]
        e = cells[levels[-1], best[levels[-1], "dpo_frozen"]]["seeds"]
        common = sorted(set(a) & set(b) & set(c) & set(e))
        change = mean_se([(c[s]["w1"] - e[s]["w1"]) - (a[s]["w1"] - b[s]["w1"]) for s in common])
        sc = sign_of(*change)
        verdict = {None: "", 0: "no change within error",
                   -1: f"resolved: MaPO − DPO is lower at shift {levels[-1]:g} than at {levels[0]:g}",
                   1: f"resolved: MaPO − DPO is higher at shift {levels[-1]:g} than at {levels[0]:g}"}[sc]
        out.append(f"- MaPO − DPO (each at its best beta per level), distance: {seq} from shift "
                   f"{levels[0]:g} to {levels[-1]:g}; change from the first to the last level "
                   f"{_diff_text(change)}"
                   + (f": {verdict}." if verdict else "."))
    thr = [s["run"] for s in result["specs"] if s["family"] == "dpo_threshold"]
    for run in thr:
        parts = []
        for level in levels:
            seeds = cells[level, run]["seeds"]
            frozen = [next((c["step"] for c in r["ref_checks"] if c["frozen"]), None) for r in seeds.values()]
            steps = [st for st in frozen if st is not None]
            kl = [c["kl"] for r in seeds.values() for c in r["ref_checks"]]
            delta = result["hparams"][run].get("reference", {}).get("delta")
            eps = [next((c["step"] for c in r["ref_checks"] if (c.get("eps_mse") or 0) > delta), None)
                   for r in seeds.values()] if delta is not None else []
            eps_steps = [st for st in eps if st is not None]
            parts.append(f"shift {level:g}: froze in {len(steps)}/{len(frozen)} runs"
                         + (f" (at step {', '.join(str(x) for x in steps)})" if steps else "")
                         + (f", estimates {min(kl):+.3g} to {max(kl):+.3g}" if kl else "")
                         + (f"; eps_mse (logged only) above delta in {len(eps_steps)}/{len(eps)} runs, "
                            f"first at step {', '.join(str(x) for x in eps_steps)}" if eps_steps else ""))
        out.append(f"- {_label(run)}, reference checks: " + "; ".join(parts) + ".")
    edges = []
    for level in levels:
        for fam in fams:
            betas = [s["beta"] for s in result["specs"] if s["family"] == fam]
            if len(betas) > 1 and float(best[level, fam].partition("@")[2]) in (min(betas), max(betas)):
                edges.append(f"{_label(best[level, fam])} at shift {level:g}")
    if edges:
        swept = sum(1 for f in fams if sum(s["family"] == f for s in result["specs"]) > 1)
        out.append(f"- The best beta lies at the edge of its sweep in {len(edges)} of {len(levels) * swept} "
                   f"(level, method) cells ({'; '.join(edges)}): there a beta outside the sweep may be "
                   "closer still, so the comparisons at those levels are between sweep-edge values.")
    return out


def _table(result: dict, cells: dict, best: dict, metric: str, digits: int, sign: bool,
           extra: list) -> list[str]:
    specs = result["specs"]
    head = ["shift", *[h for h, _ in extra], *[_label(s["run"]) for s in specs]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lv in result["levels"]:
        level = lv["level"]
        cols = []
        for s in specs:
            txt = _pm(cells[level, s["run"]][metric], digits, sign)
            multi = sum(1 for t in specs if t["family"] == s["family"]) > 1
            cols.append(f"**{txt}**" if multi and best[level, s["family"]] == s["run"] else txt)
        lines.append(f"| {level:.2f} | " + " | ".join(f(lv) for _, f in extra) + (" | " if extra else "")
                     + " | ".join(cols) + " |")
    return lines


def markdown(result: dict, args) -> str:
    from diffalign.data.synthetic import PROMPTS

    cells = aggregate(result)
    best = best_runs(result, cells)
    levels, base, specs, hp = result["levels"], result["base"], result["specs"], result["hparams"]
    n_seeds = len(args.seeds)
    dist = _table(result, cells, best, "w1", 3, False,
                  [("chosen red", lambda lv: f"{lv['chosen_red']:+.3f}"),
                   ("base samples", lambda lv: f"{lv['base_w1']:.3f}"),
                   ("floor", lambda lv: _f(lv.get("w1_floor")))])
    bias = _table(result, cells, best, "bias", 3, True,
                  [("base samples", lambda lv: f"{-lv['gap']:+.3f}")])
    gain = _table(result, cells, best, "gain", 3, True,
                  [("chosen − base", lambda lv: f"{lv['gap']:+.3f}")])
    detail = ["| shift | configuration | distance per seed | gain / gap | Δerr chosen | Δerr rejected "
              "| contrast | final loss | implicit acc | train s |", "|---" * 10 + "|"]
    for lv in levels:
        for s in specs:
            c = cells[lv["level"], s["run"]]
            per_seed = " / ".join(f"{c['seeds'][k]['w1']:.3f}" for k in sorted(c["seeds"]))
            detail.append(f"| {lv['level']:.2f} | {_label(s['run'])} | {per_seed} "
                          f"| {_pm(c['gap_closed'], 2)} | {_pm(c['d_err_chosen'], 3, True)} "
                          f"| {_pm(c['d_err_rejected'], 3, True)} "
                          f"| {_pm(c['contrast'])} | {_f(c['final_loss'][0], 4)} "
                          f"| {_f(c['implicit_acc'][0], 2)} | {c['train_s'][0]:.0f} |")
    thr_runs = [s["run"] for s in specs if s["family"] == "dpo_threshold"]
    checks = ["| shift | seed | checks (step:estimate±stderr, F = frozen) | eps_mse estimate at the same "
              "checks | reference version at the end |", "|---|---|---|---|---|"]
    for lv in levels:
        for run in thr_runs:
            for seed, r in sorted(cells[lv["level"], run]["seeds"].items()):
                eps = " ".join(f"{c['eps_mse']:.2g}" for c in r["ref_checks"] if c.get("eps_mse") is not None)
                checks.append(f"| {lv['level']:.2f} | {seed} | {_checks(r)} | {eps or '—'} "
                              f"| {_f(r['ref_version'], 0)} |")
    lv0 = levels[0]
    n_samples = len(PROMPTS) * args.eval_seeds
    dpo_betas = [s["beta"] for s in specs if s["family"] == "dpo_frozen"]
    mapo_runs = [s["run"] for s in specs if s["family"] == "mapo"]
    thr = hp.get(thr_runs[0], {}) if thr_runs else {}
    ref = thr.get("reference", {})
    snr = hp[mapo_runs[0]]["snr_value"] if mapo_runs else 0.5
    mapo_betas = ", ".join(f"{hp[r]['beta']:g}" for r in mapo_runs)
    mapo_text = ", ".join(
        f"beta {hp[r]['beta']:g}: omega {hp[r]['margin_weight']:.4g}, z ≈ "
        f"{hp[r]['beta'] * snr / 2 * lv0['base_diff_std']:.2g}" for r in mapo_runs)
    timing = result["timing"]
    setup = [
        "## Setup",
        "",
        f"- Model: the tiny SD1.5-style model (32 px, 8x8x4 latents), full fine-tune, CPU, {args.threads} "
        "torch thread(s).",
        "- VAE: the tiny random VAE normalises global colour away, so its weights are set to a fixed linear "
        "map (encoder: 4x4 average pooling of RGB into latent channels 0-2, channel 3 zero; decoder: nearest "
        "upsampling; see the script's docstring). red_fraction of a decoded sample is exactly that of the "
        "latent the UNet generated.",
        f"- Base model: the tiny model pretrained with SFT for {args.pretrain_steps} steps (batch "
        f"{args.pretrain_batch_size}, lr {args.pretrain_lr:g}, seed 0) on gray-tinted textures "
        f"(SyntheticPairs, gray tint {BASE_SHIFT}); the starting point of every run and the frozen "
        f"reference, shared by all seeds. Its samples: red_fraction {base['red']:+.3f}, contrast "
        f"{base['contrast']:.3f} (its data: "
        f"{base['data_red']:+.3f} / {base['data_contrast']:.3f}).",
        f"- Preference data per level: {args.num_pairs} pairs; chosen = red tint of strength `shift` (the "
        f"mismatch level), rejected = the base's gray tint ({BASE_SHIFT}) of the same texture. Held-out "
        f"errors use {args.num_pairs // 2} other pairs of the same level.",
        f"- Equal budgets: {args.steps} steps, batch {args.batch_size} pairs, AdamW lr {args.lr:g}, constant "
        "schedule, grad clip 1, uniform timesteps, constant reward scale. Training seeds "
        f"{', '.join(str(s) for s in args.seeds)} (`train.seed`: data order and the timestep / noise draws; "
        "every configuration gets the same draws for a given seed).",
        f"- DPO, frozen reference, beta {', '.join(f'{b:g}' for b in dpo_betas)}. The base model's "
        f"per-element error on the pairs is {lv0['base_err_w']:.3f} (chosen) / {lv0['base_err_l']:.3f} "
        f"(rejected) and err_w − err_l across pairs has std {lv0['base_diff_std']:.3f} at shift "
        f"{lv0['level']:g} (up to "
        f"{levels[-1]['base_diff_std']:.3f} at {levels[-1]['level']:g}). DPO's logit is −beta/2 × the change "
        "of that difference against the reference, so it reaches 1 at a change of 2/beta = "
        + ", ".join(f"{2 / b:.2g}" for b in dpo_betas) + ".",
        f"- MaPO, beta {mapo_betas} (beta as in the paper's Table 4; snr_value s = {snr:g}; margin_weight "
        "omega not set, so the objective derives it from beta). Its margin is z = beta × (psi(s·err_w) − "
        "psi(s·err_l)) ≈ beta × s/2 × (err_l − err_w) for small errors; for one standard deviation of the "
        f"base's err_w − err_l at shift {lv0['level']:g}: {mapo_text}.",
    ]
    if thr_runs:
        setup.append(
            f"- DPO + periodic_threshold: beta {thr.get('beta', math.nan):g}, tau = {ref.get('tau')}, "
            f"delta = {ref.get('delta')} (on this model's error scale), on_exceed = {ref.get('on_exceed')}, "
            f"estimator `{ref.get('divergence', 'signed')}` (`reference.divergence`) on "
            f"{ref.get('divergence_samples', '?')} chosen probe latents (`reference.divergence_samples`), "
            "as `diffalign.reference.divergence` computes it: a probe set "
            "with fresh uniform timesteps and noise, fixed for the run; each check's standard error is "
            "listed with its estimate. The signed estimate (Kang et al. eq. 8) is "
            "E[err_candidate − err_init], negative when the candidate denoises the chosen images better than "
            "the base.")
    setup.append(
        f"- Measurement: {len(PROMPTS)} prompts × {args.eval_seeds} seeds = {n_samples} samples per model, "
        f"{args.sample_steps} DDIM steps, guidance {args.guidance_scale:g}, the same initial noise for every "
        "model; red_fraction = (mean R − mean B) / 2 of the image in [-1, 1]. **Distance to target** = "
        f"Wasserstein-1 distance between the {n_samples} samples' red_fraction values and the "
        f"{args.num_pairs} chosen images' (lower = better; it counts overshoot and undershoot alike, and a "
        "wrong spread too). Its floor (table column) is the mean W1 between "
        f"{n_samples} values drawn with replacement from the chosen images' and all of them: what a model "
        "sampling the chosen distribution exactly would score. Every cell: mean over "
        f"{n_seeds} training seed(s) ± standard error across seeds; bold = the lowest mean distance within "
        "a beta sweep (the best beta at that level).")
    limits = [
        "## What these numbers do not show",
        "",
        f"- {n_seeds} training seeds per cell: the standard errors are themselves rough, and the 95% "
        f"t-intervals are wide (t = {t95(max(n_seeds - 1, 1)):.2f} × SE). The best beta is picked on the "
        "same runs it is reported from, which flatters each swept method a little; DPO with a threshold "
        "reference and SFT get no sweep.",
        f"- One tiny model, one synthetic property (a global colour statistic), {args.steps} steps at lr "
        f"{args.lr:g}: no statement here carries over to real models, budgets or rewards without a run "
        "there.",
        "- The rejected images are the base's own distribution, so `far from the reference` and `far from "
        "the rejected images` grow together with the level.",
    ]
    return "\n".join([
        *setup,
        "",
        f"## Distance to target (W1 of sample vs chosen red_fraction; lower = better; {n_seeds} seeds)",
        "",
        "\n".join(dist),
        "",
        "## Computed summary",
        "",
        *_summary(result),
        "",
        "## Signed error of the mean: sample red − chosen red (> 0 overshoot, < 0 short)",
        "",
        "\n".join(bias),
        "",
        "## Property gain: Δ red_fraction of the samples vs the base model's (rewards overshoot)",
        "",
        "\n".join(gain),
        "",
        "## Per configuration",
        "",
        "Means over seeds (± standard error where given). gain / gap: share of the chosen − base gap the "
        "samples moved (> 1: past the chosen images). Δerr: change of the mean per-element denoising error "
        "on held-out chosen / rejected images (same noise and timesteps for every model); negative Δerr "
        "chosen = the policy models the chosen images better. contrast: spatial pixel std per image and "
        f"channel (base samples {base['contrast']:.3f}; chosen data "
        + ", ".join(f"{lv['chosen_contrast']:.3f}" for lv in levels) + " by level).",
        "",
        "\n".join(detail),
        "",
        *(["## Reference checks (DPO + periodic_threshold)", "", "\n".join(checks), ""] if thr_runs else []),
        f"Runtime: {timing['total_s']:.0f} s wall, {timing.get('cpu_s', math.nan):.0f} s CPU "
        f"({len(result['rows'])} training runs; pretraining {timing['pretrain_s']:.0f} s; sampling "
        f"{timing['sample_s_each']:.1f} s per model).",
        "",
        *limits,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=_floats, default=[0.15, 0.4, 0.65, 0.9],
                        help="red tint strengths of the chosen images (mismatch levels)")
    parser.add_argument("--seeds", type=_seeds, default=[0, 1, 2, 3],
                        help="training seeds (train.seed) per cell: '0,1,2' or '0-2'")
    parser.add_argument("--dpo-betas", type=_floats, default=[5.0, 50.0, 500.0, 5000.0],
                        help="betas of DPO with a frozen reference")
    parser.add_argument("--mapo-betas", type=_floats, default=[1.0, 8.0, 64.0, 1024.0],
                        help="MaPO betas (paper Table 4 scale; margin_weight derived by the objective)")
    parser.add_argument("--threshold-beta", type=float, default=500.0,
                        help="beta of DPO with the periodic_threshold reference")
    parser.add_argument("--with-threshold", action=argparse.BooleanOptionalAction, default=True,
                        help="also train DPO with the periodic_threshold reference")
    parser.add_argument("--with-sft", action=argparse.BooleanOptionalAction, default=True,
                        help="also train SFT on the chosen images (an imitation line for scale)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (same for all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--pretrain-batch-size", type=int, default=16)
    parser.add_argument("--num-pairs", type=int, default=64)
    parser.add_argument("--tau", type=int, default=8)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--divergence", default="signed", help="reference.divergence of the threshold runs")
    parser.add_argument("--eval-seeds", type=int, default=4, help="sampling seeds per prompt (8 prompts)")
    parser.add_argument("--sample-steps", type=int, default=8)
    parser.add_argument("--sample-batch", type=int, default=32, help="samples per pipeline call")
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 suits a busy 2-core box)")
    parser.add_argument("--base-cache", default=None,
                        help="file to save the pretrained base UNet to, or to load it from if it exists")
    parser.add_argument("--out", "--out-dir", dest="out", default=str(RESULTS_DIR))
    parser.add_argument("--name", default="reference_mismatch")
    parser.add_argument("--from-json", default=None,
                        help="rebuild the markdown and the plot from a saved result JSON (no training)")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        payload = json.loads(Path(args.from_json).read_text())
        args = argparse.Namespace(**{**vars(args), **payload["args"], "out": str(out)})
        result = {k: payload[k] for k in ("rows", "levels", "base", "timing", "specs", "hparams", "families")}
        info = payload["machine"]
    else:
        result = run(args)
        info = machine("cpu")
        payload = {"benchmark": args.name, "command": command_line(), "machine": info,
                   "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "args": vars(args), **result}
        (out / f"{args.name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    plot(result, out / f"{args.name}.png")
    text = ["# Reference mismatch: DPO (frozen / threshold-updated reference) vs MaPO", "",
            markdown(result, args), "", "## Machine", describe_machine(info), f"- Date: {payload['date']}",
            "", "## Command", "```", payload["command"], "```", ""]
    (out / f"{args.name}.md").write_text("\n".join(text))
    total = result["timing"]["total_s"]
    print(f"wrote {out / args.name}.{{json,md,png}} ({total:.0f}s of study)", file=sys.stderr)


if __name__ == "__main__":
    main()
