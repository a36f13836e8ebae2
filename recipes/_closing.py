"""The closing block a training recipe prints last: where the weights are, the diffusers code that loads
them, the final sample grid, and the commands that show the run (MLflow UI, the one-page report)."""

from __future__ import annotations

import os
from pathlib import Path

from diffalign.data.uri import exists, is_uri, join

RECIPES = Path(__file__).resolve().parent
TINY_ASSETS = "runs/tiny-assets"  # where `python -m diffalign.models.tiny.export` writes by default
# Class names only: the closing block is printed without importing diffusers.
PIPELINE_CLASSES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                    "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline",
                    "qwenimage": "QwenImagePipeline"}
TRAINED_NETWORKS = {"sd3": ("SD3Transformer2DModel", "transformer"),
                    "flux": ("FluxTransformer2DModel", "transformer"),
                    "qwenimage": ("QwenImageTransformer2DModel", "transformer")}


def _show(path: str | Path) -> str:
    """A path as the user can type it here: relative to the current directory when under it; a URI
    (s3://...) as it is."""
    if is_uri(str(path)):
        return str(path)
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _exists(path: str) -> bool:
    try:
        return exists(path)
    except OSError:  # storage that does not answer here: the block names what it knows
        return False


def _base_model(cfg) -> tuple[str, list[str]]:
    """What `from_pretrained` loads as the base model, and how to make it when it is the tiny one."""
    m = cfg.model
    if m.pretrained:
        return m.pretrained, []
    seed = f" --seed {m.tiny_seed}" if m.tiny_seed else ""
    family = f" --family {m.family}" if m.family != "sd15" else ""
    path = f"{TINY_ASSETS}/{m.family}"
    return path, [f"    # {path}: the tiny random base model of this run, written by",
                  f"    #   python -m diffalign.models.tiny.export --out {TINY_ASSETS}{family}{seed}"]


def closing_block(cfg, summary: dict, extra: tuple[str, ...] = ()) -> str:
    out = cfg.train.output_dir
    lines = [f"==== done: {_show(out)} ===="]
    weights = summary.get("weights")
    pipe_cls = PIPELINE_CLASSES[cfg.model.family]
    net_cls, net_arg = TRAINED_NETWORKS.get(cfg.model.family, ("UNet2DConditionModel", "unet"))
    base, note = _base_model(cfg)
    if weights:
        w = _show(weights)
        if is_uri(w):  # diffusers loads local folders: fetch a copy first
            local = f"runs/{w.rstrip('/').rsplit('/', 1)[-1]}-{Path(str(out).rstrip('/')).name}"
            lines += [f"weights on storage: {w}", "copy them here:",
                      f"    python -m diffalign.data.uri copy {w} {local}"]
            w = local
        if cfg.model.finetune == "lora":
            lines += [f"weights (LoRA, diffusers format): {w}", "load them in diffusers:",
                      f"    from diffusers import {pipe_cls}",
                      f'    pipe = {pipe_cls}.from_pretrained("{base}")',
                      f'    pipe.load_lora_weights("{w}")']
        else:
            what = "UNet" if net_arg == "unet" else "transformer"
            lines += [f"weights (full {what}, diffusers format): {w}", "load them in diffusers:",
                      f"    from diffusers import {pipe_cls}, {net_cls}",
                      f'    {net_arg} = {net_cls}.from_pretrained("{w}")',
                      f'    pipe = {pipe_cls}.from_pretrained("{base}", {net_arg}={net_arg})']
        lines += note
    else:
        lines.append("weights: none saved by this run")
    final = join(out, "samples", "final.png")
    if _exists(final):
        lines.append(f"final samples: {_show(final)}")
    lines += list(extra)
    run_id = summary.get("mlflow_run_id")
    if cfg.tracking.mlflow and run_id:
        from diffalign.tracking import tracking_uri

        uri = tracking_uri(cfg)
        if uri.startswith("sqlite:///"):
            uri = "sqlite:///" + _show(uri[len("sqlite:///"):])
        # The report is a local file; next to a URI output dir it goes to the current directory.
        report = _show(RECIPES / "report.py")
        png = "report.png" if is_uri(out) else _show(Path(out) / "report.png")
        lines.append(f"look at the run (MLflow run {run_id}):")
        if uri.startswith(("http://", "https://")):  # a tracking server: its own UI
            lines.append(f"    open {uri} (experiment {cfg.tracking.experiment!r}, run {run_id})")
        else:
            lines.append(f"    mlflow ui --backend-store-uri {uri}")
        lines.append(f"    python {report} --run {run_id} --tracking-uri {uri} --out {png}")
    elif not cfg.tracking.mlflow:
        lines.append("MLflow tracking was off (tracking.mlflow=false)")
    return os.linesep.join(lines)


def print_closing_block(cfg, summary: dict, extra: tuple[str, ...] = ()) -> None:
    print(closing_block(cfg, summary, extra), flush=True)
