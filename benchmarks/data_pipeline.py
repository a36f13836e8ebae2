"""A full training step including its data, with and without the caches (tiny config, CPU).

All rows are the real `Trainer.train_step` of the tiny config (`configs/tiny/<objective>.yaml`):
reading the items, collating, conditioning, then the step.
- cached: `data.cache_latents=true`, `data.cache_prompt_embeds=true` (the defaults): the images are
  VAE-encoded once when the Trainer is built (`CachedPairs`) and the prompts text-encoded once per
  unique prompt (`CachedPromptEncoder`), so each step reads latents and embeddings from memory;
- latents only: `data.cache_prompt_embeds=false`: the text encoder runs every step;
- naive: neither cache: each step re-encodes its pixel batch ([chosen; rejected]) with the VAE and
  its prompts with the text encoder, as a loop without a cache does;
- naive + readers: the same with `data.num_workers=2`: background threads decode and transform the
  next micro-batches while the step computes (`diffalign.train.read_ahead`).

Sources (`--sources`, default both):
- `synthetic`: the tiny config's in-memory synthetic pairs (pixels already at 32 px, nothing to decode);
- `pickapic`: a Pick-a-Pic v2-style parquet (`caption`, `jpg_0`, `jpg_1`, `label_0`) written by this
  script with `--source-px` JPEGs (smooth random textures, quality 90), read through
  `data.kind=pickapic` as a real run reads it: without the latent cache every step decodes both
  JPEGs of each pair and resizes / crops them to the training resolution before the VAE.

The Trainers live in one process and are stepped round-robin (the order rotates every round), so
the ratios are measured under the same machine load. The per-step costs of the data stages
(VAE encode of one pixel batch, text encode of its prompts, the cached-embedding lookup) are timed
on their own as well.

    python benchmarks/data_pipeline.py --steps 60 --sources synthetic,pickapic --source-px 512
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import fixtures
import measure
import torch

REPO = Path(__file__).resolve().parent.parent

# variant -> (label, data.cache_latents, data.cache_prompt_embeds, data.num_workers)
VARIANTS = {
    "cached": ("cached latents + prompt embeddings", True, True, 0),
    "latents_only": ("cached latents, text encoder every step", True, False, 0),
    "naive": ("naive: VAE + text encoder every step", False, False, 0),
    "naive_readers": ("VAE + text encoder every step, 2 reader threads decoding ahead", False, False, 2),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", default="dpo", choices=["sft", "dpo", "mapo", "xdpo"])
    p.add_argument("--config", default=None, help="default configs/tiny/<objective>.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--sources", default="synthetic,pickapic", help="comma list of synthetic, pickapic")
    p.add_argument("--source-px", type=int, default=512, help="side of the pickapic source JPEGs")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    args.sources = [x.strip() for x in args.sources.split(",") if x.strip()]
    unknown = set(args.sources) - {"synthetic", "pickapic"}
    if unknown or not args.sources:
        p.error(f"--sources takes synthetic and/or pickapic, got {args.sources}")
    measure.set_threads(args.threads, "cpu")
    return args


def write_pickapic_parquet(path: Path, pairs: int, px: int, seed: int = 0) -> int:
    """A Pick-a-Pic v2-style parquet of `pairs` rows with px x px JPEGs; returns its size in bytes.

    The images are smooth random textures plus mild noise, so they compress like photographs
    (about 70 KiB at 512 px) rather than like flat colours or white noise."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)

    def jpeg() -> bytes:
        return fixtures.photo_like_jpeg(px, rng)

    rows = {"caption": [f"a photo of texture {i % 16}" for i in range(pairs)],
            "jpg_0": [jpeg() for _ in range(pairs)], "jpg_1": [jpeg() for _ in range(pairs)],
            "label_0": [float(i % 2) for i in range(pairs)]}
    pq.write_table(pa.table(rows), path)
    return path.stat().st_size


def make_trainer(args, name: str, out: str, data_overrides: list[str]):
    from diffalign.config import load_config
    from diffalign.train.driver import build_trainer

    _, latents, text, workers = VARIANTS[name]
    path = args.config or str(REPO / "configs" / "tiny" / f"{args.objective}.yaml")
    overrides = [f"train.output_dir={out}", "train.progress=false", "train.eval_every=0",
                 "tracking.mlflow=false", "guard.spike_sigmas=1e12", "train.max_steps=1000000",
                 f"data.cache_latents={str(latents).lower()}",
                 f"data.cache_prompt_embeds={str(text).lower()}", f"data.num_workers={workers}",
                 *data_overrides, *args.overrides]
    cfg = load_config(path, overrides)
    t0 = time.perf_counter()
    trainer = build_trainer(cfg, device="cpu", checkpoint_dir=str(Path(out) / "checkpoints"))
    return trainer, time.perf_counter() - t0, cfg


def stage_costs(naive, cached, reps: int = 30) -> dict:
    """Per-step cost of reading + decoding + collating one pixel batch, of its VAE encode, of the
    text encode of its prompts, and of reading the same prompts' embeddings from the cache."""
    from diffalign.data.collate import collate_pairs

    data = naive.train_data
    idx = naive.order.indices(0)
    raw = collate_pairs([data[i] for i in idx])
    setup = naive.setup
    pixels = torch.cat([raw["chosen"], raw["rejected"]])
    vae = [measure.timed(lambda: setup.latent_encoder(pixels), "cpu") for _ in range(reps)]
    text = [measure.timed(lambda: setup.prompt_encoder(raw["prompts"]), "cpu") for _ in range(reps)]
    cache = cached.setup.prompt_encoder
    lookup = [measure.timed(lambda: cache(raw["prompts"]), "cpu") for _ in range(reps)]
    read = [measure.timed(lambda: collate_pairs([data[i] for i in idx]), "cpu") for _ in range(reps)]
    return {"vae_encode_ms": measure.median_ms(vae), "text_encode_ms": measure.median_ms(text),
            "cached_embeddings_ms": measure.median_ms(lookup), "read_and_collate_ms": measure.median_ms(read),
            "images_per_vae_call": int(pixels.shape[0]), "cached_prompts": len(cache),
            "cached_embedding_bytes": cache.nbytes}


def _count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def _unet_and_vae_flops(model: str, px: int) -> tuple[int, int]:
    """FLOPs of one UNet forward and one VAE encode for a single image."""
    from diffalign.models.tiny.diffusion import build_tiny_bundle
    from diffusers import AutoencoderKL, UNet2DConditionModel

    meta = model != "tiny"
    with torch.device("meta" if meta else "cpu"):
        if meta:
            unet = UNet2DConditionModel(**(fixtures.SD15_UNET if model == "sd15" else fixtures.SDXL_UNET))
            vae = AutoencoderKL(**fixtures.SD_VAE)
        else:
            bundle = build_tiny_bundle("sd15")
            unet, vae = bundle.unet, bundle.vae
        tokens, hidden, pooled = fixtures.TEXT_SHAPES[model]
        kw = {"encoder_hidden_states": torch.randn(1, tokens, hidden)}
        if pooled:
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled), "time_ids": torch.randn(1, 6)}
        latents = torch.randn(1, *fixtures.latent_shape(model))
        unet_f = _count_flops(lambda: unet(latents, torch.tensor([500]), **kw))
        vae_f = _count_flops(lambda: vae.encode(torch.randn(1, 3, px, px)))
    return unet_f, vae_f


def flop_bound() -> list[dict]:
    """Counted FLOPs of one VAE encode vs one UNet forward per image, and the largest naive / cached
    step ratio that skipping the encode can give (the step's UNet work in forward units: DPO = policy
    forward + backward (~2 forwards) + reference forward = 4; MaPO / SFT = 3; with gradient
    checkpointing the policy forward runs twice: +1). Real SD1.5 / SDXL configs on the meta device
    (no weights, no compute); text encoders, decode and the optimizer left out."""
    out = []
    for model, px in (("tiny", 32), ("sd15", 512), ("sdxl", 1024)):
        unet_f, vae_f = _unet_and_vae_flops(model, px)
        r = vae_f / unet_f
        out.append({"model": model, "px": px, "unet_forward_gflop": unet_f / 1e9,
                    "vae_encode_gflop": vae_f / 1e9, "vae_over_unet_forward": r,
                    "dpo_bound": (4 + r) / 4, "mapo_bound": (3 + r) / 3, "dpo_ckpt_bound": (5 + r) / 5})
    return out


SOURCE_LABELS = {"synthetic": "synthetic (in memory, 32 px)", "pickapic": "Pick-a-Pic parquet ({px} px JPEG)"}


def main(argv=None) -> None:
    from diffalign.config import load_config

    args = parse_args(argv)
    path = args.config or str(REPO / "configs" / "tiny" / f"{args.objective}.yaml")
    base = load_config(path, args.overrides)
    sources = {}
    with tempfile.TemporaryDirectory(prefix="diffalign-datapipe-") as tmp:
        trainers, build_s = {}, {}
        for source in args.sources:
            data_overrides, label = [], SOURCE_LABELS[source].format(px=args.source_px)
            if source == "pickapic":
                pq_path = Path(tmp) / "pairs.parquet"
                nbytes = write_pickapic_parquet(pq_path, base.data.num_pairs, args.source_px)
                data_overrides = ["data.kind=pickapic", f"data.path={pq_path}"]
                label += f", {nbytes / base.data.num_pairs / 2048:.0f} KiB per image"
            sources[source] = label
            for name in VARIANTS:
                key = (source, name)
                trainers[key], build_s[key], cfg = make_trainer(args, name, f"{tmp}/{source}-{name}",
                                                                data_overrides)
        for _ in range(args.warmup):
            for t in trainers.values():
                t.train_step()
        times = {k: [] for k in trainers}
        order = list(trainers)
        for r in range(args.steps):
            k = r % len(order)
            for key in order[k:] + order[:k]:
                times[key].append(measure.timed(trainers[key].train_step, "cpu"))
        stages = {s: stage_costs(trainers[(s, "naive")], trainers[(s, "cached")]) for s in sources}
    bound = flop_bound()

    rows, speedups = [], {}
    for source in sources:
        med = {name: measure.median_ms(times[(source, name)]) for name in VARIANTS}
        speedups[source] = {"cached": med["naive"] / med["cached"],
                            "latents_only": med["naive"] / med["latents_only"]}
        for name, (label, *_) in VARIANTS.items():
            q1, q3 = measure.iqr_ms(times[(source, name)])
            rows.append({"source": source, "variant": name, "label": label, "median_ms": med[name],
                         "q1_ms": q1, "q3_ms": q3, "pairs_per_s": 1000.0 * cfg.optim.batch_size / med[name],
                         "naive_over_this": med["naive"] / med[name],
                         "trainer_build_s": build_s[(source, name)]})
    cols = [("source", "data"), ("label", "step incl. data"), ("median_ms", "median ms"), ("q1_ms", "q1"),
            ("q3_ms", "q3"), ("pairs_per_s", "pairs/s"), ("naive_over_this", "naive / this", 2),
            ("trainer_build_s", "Trainer build s (incl. cache fill)")]
    md = [f"Tiny config `{args.config or f'configs/tiny/{args.objective}.yaml'}` ({cfg.objective.name}, "
          f"{cfg.model.finetune} fine-tune, {cfg.model.resolution} px, batch {cfg.optim.batch_size} pairs, "
          f"{base.data.num_pairs} pairs per source of which {base.data.heldout_pairs} held out), CPU, "
          f"torch threads {torch.get_num_threads()}; {args.steps} timed steps each after {args.warmup} "
          "warm-up, all rows round-robin in one process.", "",
          "Data: " + "; ".join(f"`{s}` = {label}" for s, label in sources.items()) + ".", "",
          measure.markdown_table(rows, cols), ""]
    for source, sp in speedups.items():
        st = stages[source]
        md += [f"**`{source}`: cached is {sp['cached']:.2f}x faster per step than naive** (target >= 3x: "
               f"{'met' if sp['cached'] >= 3 else 'not met'}); "
               f"caching latents alone: {sp['latents_only']:.2f}x. "
               "Per-step data stages on their own (median of 30): "
               f"read + decode + collate {st['read_and_collate_ms']:.1f} ms, "
               f"VAE encode of {st['images_per_vae_call']} images {st['vae_encode_ms']:.1f} ms, "
               f"text encode of the prompts {st['text_encode_ms']:.1f} ms, the same prompts' embeddings "
               f"from the cache {st['cached_embeddings_ms']:.2f} ms ({st['cached_prompts']} prompts "
               f"cached, {st['cached_embedding_bytes'] / 1024:.0f} KiB).", ""]
    bcols = [("model", "model"), ("px", "image px"), ("unet_forward_gflop", "UNet forward GFLOP / image", 2),
             ("vae_encode_gflop", "VAE encode GFLOP / image", 2),
             ("vae_over_unet_forward", "VAE / UNet forward", 2),
             ("dpo_bound", "naive / cached at most: DPO", 2), ("mapo_bound", "MaPO, SFT", 2),
             ("dpo_ckpt_bound", "DPO + grad checkpointing", 2)]
    md += ["What skipping the VAE can buy at most, from counted FLOPs (`flop_bound`: real SD1.5 / SDXL "
           "configs on the meta device; the step's UNet work is 4 forwards for DPO, 3 for MaPO / SFT, "
           "+1 with gradient checkpointing; decode, text encoders and the optimizer left out):", "",
           measure.markdown_table(bound, bcols)]
    md = "\n".join(md)
    print(md, flush=True)
    payload = {"flop_bound": bound, "objective": cfg.objective.name, "batch": cfg.optim.batch_size,
               "steps": args.steps, "warmup": args.warmup, "source_px": args.source_px, "sources": sources,
               "rows": rows, "speedups": speedups, "stages": stages, "threads": torch.get_num_threads()}
    title = "Data pipeline: cached latents and prompt embeddings vs encoding each step"
    paths = measure.write_results("data_pipeline-tiny", "cpu", payload, md, args.out_dir, title=title)
    print(f"wrote {paths[0]} and {paths[1]}", flush=True)


if __name__ == "__main__":
    main()
