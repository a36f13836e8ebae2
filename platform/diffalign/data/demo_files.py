"""Pick-a-Pic v2 style parquet made on the spot, for demos, tests and benchmarks (nothing can be
downloaded): the real columns (`caption`, `jpg_0`, `jpg_1`, `label_0`), JPEG bytes, row groups,
ties, and a learnable signal (the preferred image is the redder one).

`python -m diffalign.data.demo_files OUT.parquet --pairs 2000` writes one.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np

from diffalign.data import uri


def _jpeg(rgb: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def demo_images(n: int, size: int, *, red: bool, seed: int, quality: int = 90) -> list[bytes]:
    """`n` distinct JPEGs of size x size: noise around red (preferred) or blue (rejected)."""
    rng = np.random.default_rng(seed)
    base = np.array([200, 40, 40] if red else [40, 40, 200], dtype=np.float32)
    out = []
    for _ in range(n):
        noise = rng.normal(0, 40, size=(size, size, 3))
        out.append(_jpeg(np.clip(base + noise, 0, 255).astype(np.uint8), quality))
    return out


def write_pickapic_parquet(path: str | Path, pairs: int, *, image_size: int = 16, row_group_size: int = 256,
                           tie_every: int = 0, distinct_images: int = 64, seed: int = 0) -> dict:
    """Writes `pairs` rows (plus a tie every `tie_every` rows when > 0) and returns {rows, bytes,
    bytes_per_pair}. Images cycle through `distinct_images` per side, stored without dictionary
    encoding or compression, so every row holds its own bytes as in the real dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    chosen = demo_images(distinct_images, image_size, red=True, seed=seed)
    rejected = demo_images(distinct_images, image_size, red=False, seed=seed + 1)
    rng = np.random.default_rng(seed)
    first_preferred = rng.random(pairs) < 0.5
    captions, jpg0, jpg1, labels = [], [], [], []
    for i in range(pairs):
        w, lose = chosen[i % distinct_images], rejected[(i * 7) % distinct_images]
        captions.append(f"a red thing, number {i}")
        if first_preferred[i]:
            jpg0.append(w), jpg1.append(lose), labels.append(1.0)
        else:
            jpg0.append(lose), jpg1.append(w), labels.append(0.0)
        if tie_every and (i + 1) % tie_every == 0:
            captions.append(f"a tie, number {i}")
            jpg0.append(w), jpg1.append(lose), labels.append(0.5)
    table = pa.table({"caption": captions, "jpg_0": pa.array(jpg0, pa.binary()),
                      "jpg_1": pa.array(jpg1, pa.binary()), "label_0": labels})
    if uri.is_uri(path):  # object storage: the whole file in one write
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, row_group_size=row_group_size, use_dictionary=False, compression="none")
        uri.write_bytes_atomic(path, sink.getvalue().to_pybytes())
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, str(path), row_group_size=row_group_size, use_dictionary=False,
                       compression="none")
    nbytes = sum(map(len, jpg0)) + sum(map(len, jpg1))
    return {"rows": len(captions), "pairs": pairs, "bytes": nbytes,
            "bytes_per_pair": nbytes / max(1, len(captions))}


def write_demo_store(root: str, bundle, *, pairs: int, resolution: int, shard_rows: int = 4096,
                     unique_prompts: int | None = None, views: int = 2, dtype: str = "bfloat16",
                     center_crop: bool = True, seed: int = 0) -> dict:
    """A pair store of `pairs` random latents (and random prompt embeddings) carrying `bundle`'s
    identity: what a prepared store of that size looks like to a learner, made in seconds, for
    measuring reads at scale (it teaches nothing: the latents are noise). Returns the manifest."""
    import torch

    from diffalign.data import store

    g = torch.Generator().manual_seed(seed)
    h = resolution // bundle.latent_scale
    channels = bundle.vae.config.latent_channels
    n_prompts = unique_prompts or pairs
    tdtype = store.STORE_DTYPES[dtype]
    with torch.no_grad():
        embeds, pooled = _embedding_shapes(bundle)
    prompt_shards = []
    for k, lo in enumerate(range(0, n_prompts, shard_rows)):
        m = min(shard_rows, n_prompts - lo)
        e = torch.randn((m, *embeds), generator=g).to(tdtype)
        p = torch.randn((m, *pooled), generator=g).to(tdtype) if pooled is not None else None
        prompt_shards.append(store.write_prompt_shard(root, k, e, p))
    shards = []
    for k, lo in enumerate(range(0, pairs, shard_rows)):
        m = min(shard_rows, pairs - lo)
        lat = torch.randn((m, views, 2, 2, channels, h, h), generator=g)
        lat[:, :, :, 1] = lat[:, :, :, 1].abs() * 0.1  # a std is positive
        full = torch.tensor([resolution, resolution, 0, 0])
        sizes = full.repeat(m, views, 1) if pooled is not None else None
        shards.append(store.write_pair_shard(
            root, k, prompts=[f"prompt {(lo + i) % n_prompts}" for i in range(m)],
            prompt_ids=[(lo + i) % n_prompts for i in range(m)], source_index=list(range(lo, lo + m)),
            latents=lat.to(tdtype), sizes=sizes))
    manifest = {
        "format": store.STORE_FORMAT, "pairs": pairs, "shards": shards, "prompt_shards": prompt_shards,
        "encoding": {"latents": True, "moments": 2, "views": views, "dtype": dtype, "resolution": resolution,
                     "center_crop": center_crop, "random_flip": views == 2, "seed": seed,
                     "sizes": pooled is not None, "embeddings": True},
        "model": store.model_identity(bundle), "source": {"kind": "demo", "note": "random latents"},
        "issues": {},
    }
    store.write_json(store.uri.join(root, store.MANIFEST), manifest)
    return manifest


def _embedding_shapes(bundle) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    from diffalign.models.conditioning import PromptEncoder

    embeds, pooled = PromptEncoder(bundle).text_embeddings(["x"])
    return tuple(embeds.shape[1:]), (tuple(pooled.shape[1:]) if pooled is not None else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="parquet file to write (a local path or a URI: s3://...)")
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--row-group-size", type=int, default=64)
    p.add_argument("--tie-every", type=int, default=16, help="a tie row after every N pairs (0: none)")
    args = p.parse_args()
    info = write_pickapic_parquet(args.out, args.pairs, image_size=args.image_size,
                                  row_group_size=args.row_group_size, tie_every=args.tie_every)
    print(f"wrote {args.out}: {info['rows']} rows ({info['pairs']} pairs), "
          f"{info['bytes_per_pair']:.0f} bytes/pair")


if __name__ == "__main__":
    main()
