"""Policy-versus-base evaluation on a prompt set, seed-matched.

``evaluate_policy`` generates one image per (prompt, seed) with the base model (the baseline) and with
the base model plus trained weights (the policy: a diffusers LoRA folder or a full UNet folder), from
the same initial noise, scores both with the configured reward scorers and reports mean scores and
seed-matched win rates, as Kang et al. (AAAI 2026) Table 1 reports them against the base model. It
writes ``evaluation.md``, ``evaluation.json`` and ``grid.png`` (rows = prompts, columns = baseline |
policy per seed) and logs them to MLflow when the config enables tracking.
"""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from diffalign.config import RunConfig
from diffalign.eval.base_model import default_guidance, default_steps, load_base_model, resolve_device
from diffalign.eval.policy_weights import apply_weights, resolve_weights
from diffalign.eval.scorers import ScorerSpec, build_scorers, score_all
from diffalign.eval.winrate import to_markdown, win_rate_table
from diffalign.models.sampling import generate_images
from diffalign.specs import load_prompts, parse_seeds

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_images(directory: str | os.PathLike[str]) -> list[Image.Image]:
    """Every image file directly in ``directory`` (sorted by name), as RGB."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"reference image folder {str(d)!r} does not exist")
    files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {str(d)!r}")
    images = []
    for f in files:
        with Image.open(f) as im:
            images.append(im.convert("RGB"))
    return images



def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def comparison_grid(
    prompts: Sequence[str],
    seeds: Sequence[int],
    baseline: Sequence[Image.Image],
    policy: Sequence[Image.Image],
    tile: int = 128,
    max_prompts: int | None = 16,
    label_width: int = 160,
) -> Image.Image:
    """Rows = prompts, columns = (baseline, policy) for each seed; images are prompt-major, seed-minor.

    A header row names the columns, a left column holds each prompt. Only the first ``max_prompts``
    rows are drawn.
    """
    n_seeds = len(seeds)
    if len(baseline) != len(prompts) * n_seeds or len(policy) != len(baseline):
        raise ValueError(
            f"expected {len(prompts)} prompts x {n_seeds} seeds images per model, got "
            f"{len(baseline)} baseline and {len(policy)} policy"
        )
    rows = len(prompts) if max_prompts is None else min(len(prompts), max_prompts)
    header = 20
    grid = Image.new("RGB", (label_width + 2 * n_seeds * tile, header + rows * tile), "white")
    draw = ImageDraw.Draw(grid)
    font = _font(11)
    for j, seed in enumerate(seeds):
        for k, name in enumerate(("baseline", "policy")):
            x = label_width + (2 * j + k) * tile
            draw.text((x + 4, 4), f"{name} s{seed}", fill="black", font=font)
    resample = Image.NEAREST if baseline and baseline[0].width < tile else Image.BICUBIC
    for i in range(rows):
        y = header + i * tile
        lines = textwrap.wrap(prompts[i], width=max(8, label_width // 7))[: max(1, tile // 14)]
        draw.multiline_text((4, y + 4), "\n".join(lines), fill="black", font=font, spacing=2)
        for j in range(n_seeds):
            idx = i * n_seeds + j
            for k, im in enumerate((baseline[idx], policy[idx])):
                x = label_width + (2 * j + k) * tile
                grid.paste(im.convert("RGB").resize((tile, tile), resample), (x, y))
    return grid


def _markdown(result: dict[str, Any]) -> str:
    seeds = ", ".join(map(str, result["seeds"]))
    head = [
        "# Policy vs base model",
        "",
        f"- policy weights: `{result['weights']}` ({result['weights_kind']})",
        f"- base model: `{result['base_model']}` ({result['family']}, {result['resolution']} px)",
        f"- prompts: {result['num_prompts']} from `{result['prompt_source']}`; seeds: {seeds}; "
        f"{result['num_items']} seed-matched (prompt, seed) items",
        f"- sampling: {result['steps']} steps, guidance {result['guidance_scale']}",
        "",
        "Win rate = share of items where the policy's score beats the baseline's from the same prompt and "
        "initial noise; ties count one half. 95% CI: Wilson.",
        "",
    ]
    return "\n".join(head) + "\n" + to_markdown(result["win_rates"])


def _log_mlflow(cfg: RunConfig, result: dict[str, Any], files: dict[str, Path]) -> str:
    from diffalign.tracking import MlflowTracker

    # The tracker logs the config's fields as params, and MLflow params are write-once: its eval section
    # must already hold what this evaluation used, not the config's (possibly unset) values.
    used = dataclasses.replace(
        cfg.eval, weights=result["weights"], prompts=result["prompt_source"],
        seeds=",".join(map(str, result["seeds"])), scorers=",".join(result["win_rates"]),
        steps=result["steps"], guidance_scale=result["guidance_scale"],
    )
    name = cfg.tracking.run_name or Path(result["weights"]).parent.name or "policy"
    tracker = MlflowTracker(dataclasses.replace(cfg, eval=used), run_name=f"eval-{name}",
                            tags={"diffalign.kind": "evaluation"})
    status = "FAILED"
    try:
        mlflow = tracker.mlflow
        mlflow.log_params({"eval.weights_kind": result["weights_kind"],
                           "eval.num_prompts": result["num_prompts"]})
        metrics = {}
        for scorer, r in result["win_rates"].items():
            metrics[f"win_rate.{scorer}"] = r["win_rate"]
            metrics[f"win_rate_ci_low.{scorer}"] = r["ci_low"]
            metrics[f"win_rate_ci_high.{scorer}"] = r["ci_high"]
            metrics[f"score_policy.{scorer}"] = r["policy_mean"]
            metrics[f"score_baseline.{scorer}"] = r["baseline_mean"]
        mlflow.log_metrics(metrics)
        for path in files.values():
            mlflow.log_artifact(str(path), "evaluation")
        status = "FINISHED"
        return tracker.run_id
    finally:
        tracker.close(status)


def evaluate_policy(
    cfg: RunConfig,
    weights: str | os.PathLike[str],
    prompts: Sequence[str] | str | os.PathLike[str],
    seeds: Sequence[int] | str,
    scorers: ScorerSpec,
    out_dir: str | os.PathLike[str],
    references: Sequence[Image.Image] | str | os.PathLike[str] | None = None,
    *,
    steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    max_prompts: int | None = None,
    grid_prompts: int | None = 16,
    save_images: bool = False,
    progress: bool = True,
    mlflow: bool | None = None,
) -> dict[str, Any]:
    """Seed-matched evaluation of ``weights`` (on top of ``cfg.model``) against the base model.

    ``prompts``: a list, or a prompt file (see ``load_prompts``), cut to the first ``max_prompts``.
    ``seeds``: ints or ``"0,1"``.
    ``scorers``: ``{name: Scorer | path | None}`` or ``"clip:PATH,pickscore:PATH"``. ``references``:
    images or a folder of them, needed by the ``dino`` scorer. ``steps`` defaults to 50 for a
    pretrained model and ``cfg.tracking.sample_steps`` for the tiny one; ``guidance_scale`` to 7.5
    (SD1.5) or 5.0 (SDXL). ``mlflow`` defaults to ``cfg.tracking.mlflow``.

    Returns the result dict also written to ``out_dir/evaluation.json``: ``win_rates`` (per scorer,
    ``win_rate_stats``), per-item ``scores`` for both models, the run's settings and ``files``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    prompt_source = "given list"
    if isinstance(prompts, (str, os.PathLike)):
        prompt_source = os.fspath(prompts)
        prompts = load_prompts(prompts)
    prompts = [str(p) for p in prompts][:max_prompts]
    seeds = parse_seeds(seeds)
    if not prompts:
        raise ValueError("no prompts to evaluate")
    if isinstance(references, (str, os.PathLike)):
        references = load_images(references)
    n_steps, guidance = default_steps(cfg, steps), default_guidance(cfg, guidance_scale)
    resolve_weights(weights)  # fail on bad weights before any image is generated

    item_prompts = [p for p in prompts for _ in seeds]
    item_seeds = [s for _ in prompts for s in seeds]
    bundle = load_base_model(cfg, dev)
    pipe = bundle.pipeline()
    gen_kw = dict(steps=n_steps, guidance_scale=guidance, resolution=bundle.resolution, batch_size=batch_size,
                  progress=progress)
    resolution = bundle.resolution
    baseline = generate_images(pipe, item_prompts, item_seeds, desc="baseline", **gen_kw)
    kind, pipe = apply_weights(pipe, weights)
    policy = generate_images(pipe, item_prompts, item_seeds, desc="policy", **gen_kw)
    del pipe, bundle
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    built = build_scorers(scorers, dev, references)
    policy_scores = score_all(built, policy, item_prompts)
    baseline_scores = score_all(built, baseline, item_prompts)
    higher = {k: bool(s.higher_is_better) for k, s in built.items()}
    table = win_rate_table(policy_scores, baseline_scores, higher_is_better=higher)

    files = {"markdown": out / "evaluation.md", "json": out / "evaluation.json", "grid": out / "grid.png"}
    result: dict[str, Any] = {
        "weights": os.fspath(weights),
        "weights_kind": kind,
        "base_model": cfg.model.pretrained or f"tiny random (seed {cfg.model.tiny_seed})",
        "family": cfg.model.family,
        "resolution": resolution,
        "prompt_source": prompt_source,
        "num_prompts": len(prompts),
        "seeds": seeds,
        "num_items": len(item_prompts),
        "steps": n_steps,
        "guidance_scale": guidance,
        "win_rates": table,
        "items": [{"prompt": p, "seed": s} for p, s in zip(item_prompts, item_seeds)],
        "scores": {"policy": policy_scores, "baseline": baseline_scores},
        "files": {k: str(v) for k, v in files.items()},
    }
    comparison_grid(prompts, seeds, baseline, policy, max_prompts=grid_prompts).save(files["grid"])
    if save_images:
        for name, images in (("baseline", baseline), ("policy", policy)):
            d = out / "images" / name
            d.mkdir(parents=True, exist_ok=True)
            for i, (im, s) in enumerate(zip(images, item_seeds)):
                im.save(d / f"{i // len(seeds):05d}_s{s}.png")
    files["markdown"].write_text(_markdown(result))
    files["json"].write_text(json.dumps(result, indent=2))
    if cfg.tracking.mlflow if mlflow is None else mlflow:
        result["mlflow_run_id"] = _log_mlflow(cfg, result, files)
        files["json"].write_text(json.dumps(result, indent=2))
    return result


