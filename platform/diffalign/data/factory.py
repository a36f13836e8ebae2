"""The configured pair dataset for offline training, as (train, held-out) map-style datasets.

The trainer reads items by index (its batch order is a function of the step, which is what makes
resume exact), so rows are validated once and kept *encoded* (JPEG bytes / file paths) in memory;
decoding and the random crop / flip run per item. `data.max_samples` bounds that memory on large
sets (Pick-a-Pic v2: ~1M pairs). Ties, bad images, missing values and out-of-range labels are
counted in `.issues` (logged here, logged to MLflow by the tracker) or raised with
`data.on_error: raise`.
"""

from __future__ import annotations

import logging

from diffalign.config import RunConfig
from diffalign.data.files import PairFileDataset
from diffalign.data.pickapic import PickAPicPairs
from diffalign.data.stream import MaterializedPairs, PairStream

log = logging.getLogger(__name__)


def open_pair_stream(cfg: RunConfig) -> PairStream:
    d = cfg.data
    common = dict(resolution=cfg.model.resolution, random_crop=not d.center_crop, random_flip=d.random_flip,
                  seed=cfg.train.seed, max_samples=d.max_samples, on_error=d.on_error)
    if d.kind in ("pickapic", "hf_disk"):
        return PickAPicPairs(d.path, format="hf" if d.kind == "hf_disk" else "auto", **common)
    if d.kind in ("jsonl", "csv"):
        return PairFileDataset(d.path, format=d.kind, **common)
    if d.kind == "folder":
        raise ValueError("data.kind=folder holds target images only (no rejected images): train it with "
                         "online.enabled=true, where the sampler actors make the rejected samples")
    raise ValueError(f"data.kind={d.kind!r} is not a pair file format")


def open_pair_dataset(cfg: RunConfig) -> tuple[MaterializedPairs, MaterializedPairs | None]:
    """(train, held-out): the last `data.heldout_pairs` valid pairs are held out (0: none)."""
    d = cfg.data
    pairs = open_pair_stream(cfg).materialize()
    n_held = d.heldout_pairs
    if len(pairs) == 0:
        raise ValueError(f"no usable pairs in {d.path} (data.kind={d.kind}): {pairs.issues.report()}")
    if n_held and len(pairs) <= n_held:
        raise ValueError(f"data.heldout_pairs={n_held} leaves no training pairs: {d.path} has {len(pairs)} "
                         "usable pairs")
    cut = len(pairs) - n_held
    train = MaterializedPairs(pairs.records[:cut], pairs.transform, seed=pairs.seed, issues=pairs.issues)
    held = (MaterializedPairs(pairs.records[cut:], pairs.transform, seed=pairs.seed + 7919)
            if n_held else None)
    log.info("%s: %d training pairs, %d held out; %s", d.path, len(train), n_held, pairs.issues.summary())
    return train, held
