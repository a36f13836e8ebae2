"""Seed-matched image generation and image grids, shared by training (sample grids, reward scores),
evaluation (policy vs base) and the benchmarks.

Item ``i`` always starts from the noise of its own CPU generator seeded with ``seeds[i]``, whatever its
batch, so two models sampled with the same prompt and seed lists are compared on the same initial noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from diffalign.models.bundle import ModelBundle


@torch.no_grad()
def generate_images(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance_scale: float,
    resolution: int,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "generate",
) -> list[Image.Image]:
    """One image per (prompt, seed) item, ``batch_size`` items per pipeline call."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images: list[Image.Image] = []
    with tqdm(total=len(prompts), desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start : start + batch_size]]
            out = pipe(chunk, num_inference_steps=steps, generator=gens, height=resolution, width=resolution,
                       output_type="pil", **call_kwargs(pipe, guidance_scale, len(chunk)))
            images.extend(out.images)
            bar.update(len(chunk))
    return images


def call_kwargs(pipe: DiffusionPipeline, guidance_scale: float, n: int) -> dict:
    """The guidance (and text budget) arguments of a pipeline call for `n` prompts. Qwen-Image does
    classifier-free guidance through `true_cfg_scale` with a negative prompt (" " as its model card
    uses), its `guidance_scale` being for guidance-distilled models; FLUX.1-dev's `guidance_scale` is
    its guidance embedding; the others do classifier-free guidance with `guidance_scale`."""
    kw: dict = {}
    tokens = getattr(pipe, "diffalign_max_sequence_length", None)
    if tokens:
        kw["max_sequence_length"] = int(tokens)
    if type(pipe).__name__ == "QwenImagePipeline":
        kw.update(true_cfg_scale=guidance_scale, negative_prompt=[" "] * n, guidance_scale=None)
    else:
        kw["guidance_scale"] = guidance_scale
    return kw


def generate(bundle: ModelBundle, unet: torch.nn.Module, prompts: Sequence[str], seeds: Sequence[int],
             steps: int = 8, guidance_scale: float = 5.0, resolution: int | None = None,
             batch_size: int = 1) -> list[Image.Image]:
    """`generate_images` with `unet` in `bundle`'s pipeline, in eval mode for the call (its training
    mode is restored). One item per call by default, as the training sample grids have always used."""
    was = unet.training
    unet.eval()
    try:
        return generate_images(bundle.pipeline(unet), prompts, seeds, steps=steps,
                               guidance_scale=guidance_scale, resolution=resolution or bundle.resolution,
                               batch_size=batch_size, progress=False)
    finally:
        unet.train(was)


def image_grid(images: list[Image.Image], cols: int | None = None, scale: int = 1) -> Image.Image:
    """Images in rows of ``cols`` (default: one row), each resized to the first one's size."""
    if not images:
        raise ValueError("no images for the grid")
    cols = cols or len(images)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB").resize((w, h)), ((i % cols) * w, (i // cols) * h))
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    return grid
