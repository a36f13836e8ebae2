"""A full training step including its data, with and without the caches (tiny config, CPU).

All rows are the real `Trainer.train_step` on the synthetic pair dataset of the tiny config
(`configs/tiny/<objective>.yaml`): reading the items, collating, conditioning, then the step.
- cached: `data.cache_latents=true`, `data.cache_prompt_embeds=true` (the defaults): the images are
  VAE-encoded once when the Trainer is built (`CachedPairs`) and the prompts text-encoded once per
  unique prompt (`CachedPromptEncoder`), so each step reads latents and embeddings from memory;
- latents only: `data.cache_prompt_embeds=false`: the text encoder runs every step;
- naive: neither cache: each step re-encodes its pixel batch ([chosen; rejected]) with the VAE and
  its prompts with the text encoder, as a loop without a cache does.

The Trainers live in one process and are stepped round-robin (the order rotates every round), so
the ratios are measured under the same machine load. The per-step costs of the data stages
(VAE encode of one pixel batch, text encode of its prompts, the cached-embedding lookup) are timed
on their own as well.

    python benchmarks/data_pipeline.py --steps 60
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common
import torch

REPO = Path(__file__).resolve().parent.parent

# variant -> (label, data.cache_latents, data.cache_prompt_embeds)
VARIANTS = {
    "cached": ("cached latents + prompt embeddings", True, True),
    "latents_only": ("cached latents, text encoder every step", True, False),
    "naive": ("naive: VAE + text encoder every step", False, False),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", default="dpo", choices=["sft", "dpo", "mapo", "xdpo"])
    p.add_argument("--config", default=None, help="default configs/tiny/<objective>.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    common.set_threads(args.threads, "cpu")
    return args


def make_trainer(args, name: str, out: str):
    from diffalign.config import load_config
    from diffalign.train.loop import Trainer

    _, latents, text = VARIANTS[name]
    path = args.config or str(REPO / "configs" / "tiny" / f"{args.objective}.yaml")
    overrides = [f"train.output_dir={out}", "train.progress=false", "train.eval_every=0",
                 "tracking.mlflow=false", "guard.spike_sigmas=1e12", "train.max_steps=1000000",
                 f"data.cache_latents={str(latents).lower()}",
                 f"data.cache_prompt_embeds={str(text).lower()}", *args.overrides]
    cfg = load_config(path, overrides)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, device="cpu", checkpoint_dir=str(Path(out) / "checkpoints"))
    return trainer, time.perf_counter() - t0, cfg


def stage_costs(naive, cached, reps: int = 30) -> dict:
    """Per-step cost of the VAE encode of one pixel batch, of the text encode of its prompts, and of
    reading the same prompts' embeddings from the cache."""
    from diffalign.data.collate import collate_pairs

    data = naive.train_data
    idx = naive.order.indices(0)
    raw = collate_pairs([data[i] for i in idx])
    setup = naive.setup
    pixels = torch.cat([raw["chosen"], raw["rejected"]])
    vae = [common.timed(lambda: setup.latent_encoder(pixels), "cpu") for _ in range(reps)]
    text = [common.timed(lambda: setup.prompt_encoder(raw["prompts"]), "cpu") for _ in range(reps)]
    cache = cached.setup.prompt_encoder
    lookup = [common.timed(lambda: cache(raw["prompts"]), "cpu") for _ in range(reps)]
    read = [common.timed(lambda: collate_pairs([data[i] for i in idx]), "cpu") for _ in range(reps)]
    return {"vae_encode_ms": common.median_ms(vae), "text_encode_ms": common.median_ms(text),
            "cached_embeddings_ms": common.median_ms(lookup), "read_and_collate_ms": common.median_ms(read),
            "images_per_vae_call": int(pixels.shape[0]), "cached_prompts": len(cache),
            "cached_embedding_bytes": cache.nbytes}


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="diffalign-datapipe-") as tmp:
        variants, build_s = {}, {}
        for name in VARIANTS:
            variants[name], build_s[name], cfg = make_trainer(args, name, f"{tmp}/{name}")
        for _ in range(args.warmup):
            for t in variants.values():
                t.train_step()
        times = {k: [] for k in variants}
        order = list(variants)
        for r in range(args.steps):
            k = r % len(order)
            for name in order[k:] + order[:k]:
                times[name].append(common.timed(variants[name].train_step, "cpu"))
        stages = stage_costs(variants["naive"], variants["cached"])

    rows = []
    for name, (label, _, _) in VARIANTS.items():
        q1, q3 = common.iqr_ms(times[name])
        ms = common.median_ms(times[name])
        rows.append({"variant": name, "label": label, "median_ms": ms, "q1_ms": q1, "q3_ms": q3,
                     "pairs_per_s": 1000.0 * cfg.optim.batch_size / ms, "trainer_build_s": build_s[name]})
    med = {r["variant"]: r["median_ms"] for r in rows}
    for r in rows:
        r["naive_over_this"] = med["naive"] / r["median_ms"]
    speedup, latents_only = med["naive"] / med["cached"], med["naive"] / med["latents_only"]
    cols = [("label", "step incl. data"), ("median_ms", "median ms"), ("q1_ms", "q1"), ("q3_ms", "q3"),
            ("pairs_per_s", "pairs/s"), ("naive_over_this", "naive / this"),
            ("trainer_build_s", "Trainer build s (incl. cache fill)")]
    md = [f"Tiny config `{args.config or f'configs/tiny/{args.objective}.yaml'}` ({cfg.objective.name}, "
          f"{cfg.model.finetune} fine-tune, {cfg.model.resolution} px, batch {cfg.optim.batch_size} pairs, "
          f"{cfg.data.num_pairs} pairs in the dataset), CPU, torch threads {torch.get_num_threads()}; "
          f"{args.steps} timed steps each after {args.warmup} warm-up, round-robin.", "",
          common.markdown_table(rows, cols), "",
          f"**Cached is {speedup:.2f}x faster per step than naive** (target >= 3x: "
          f"{'met' if speedup >= 3 else 'not met'}); caching latents alone: {latents_only:.2f}x.", "",
          "Per-step data stages on their own (median of 30): "
          f"VAE encode of {stages['images_per_vae_call']} images {stages['vae_encode_ms']:.1f} ms, "
          f"text encode of the prompts {stages['text_encode_ms']:.1f} ms, the same prompts' embeddings "
          f"from the cache {stages['cached_embeddings_ms']:.2f} ms ({stages['cached_prompts']} prompts "
          f"cached, {stages['cached_embedding_bytes'] / 1024:.0f} KiB), read + collate "
          f"{stages['read_and_collate_ms']:.2f} ms."]
    md = "\n".join(md)
    print(md, flush=True)
    payload = {"objective": cfg.objective.name, "batch": cfg.optim.batch_size, "steps": args.steps,
               "warmup": args.warmup, "rows": rows, "cached_speedup": speedup,
               "latents_only_speedup": latents_only, "stages": stages, "threads": torch.get_num_threads()}
    title = "Data pipeline: cached latents and prompt embeddings vs encoding each step"
    paths = common.write_results("data_pipeline-tiny", "cpu", payload, md, args.out_dir, title=title)
    print(f"wrote {paths[0]} and {paths[1]}", flush=True)


if __name__ == "__main__":
    main()
