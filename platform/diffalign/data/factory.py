"""The configured pair dataset for offline training, as (train, held-out) map-style datasets.

Raw files are read lazily (`diffalign.data.lazy.LazyPairs`): opening reads only the files' metadata,
and each rank reads, checks and decodes the rows it trains on when it trains on them, a block at a
time, so memory is bounded by the blocks in flight, not by the dataset (Pick-a-Pic v2: ~1M pairs).
Ties, bad images, missing values and out-of-range labels are counted in `.issues` as they are read
(logged, and logged to MLflow by the tracker at the start and end of the run) or raised with
`data.on_error: raise`. A pair store (`data.kind: store`, `diffalign.data.store`) is opened in
`diffalign.train.setup.build_datasets`, where the run's models are known.
"""

from __future__ import annotations

import logging

from diffalign.config import RunConfig
from diffalign.data.files import PairFileDataset
from diffalign.data.lazy import LazyPairs
from diffalign.data.pickapic import PickAPicPairs
from diffalign.data.stream import PairStream

log = logging.getLogger(__name__)


def open_pair_stream(cfg: RunConfig) -> PairStream:
    d = cfg.data
    common = dict(resolution=cfg.model.resolution, random_crop=not d.center_crop, random_flip=d.random_flip,
                  seed=cfg.train.seed, max_samples=d.max_samples, on_error=d.on_error)
    if d.kind in ("pickapic", "hf_disk"):
        return PickAPicPairs(d.path, format="hf" if d.kind == "hf_disk" else "auto", split=d.split, **common)
    if d.kind in ("jsonl", "csv"):
        return PairFileDataset(d.path, format=d.kind, **common)
    if d.kind == "folder":
        raise ValueError("data.kind=folder holds target images only (no rejected images): train it with "
                         "online.enabled=true, where the sampler actors make the rejected samples")
    raise ValueError(f"data.kind={d.kind!r} is not a pair file format")


def open_pair_dataset(cfg: RunConfig) -> tuple[LazyPairs, LazyPairs | None]:
    """(train, held-out) lazy views of the source rows: the last `data.heldout_pairs` rows are held out
    (0: none). Nothing is read here but the files' metadata; rows are checked as training reads them."""
    d = cfg.data
    stream = open_pair_stream(cfg)
    n, n_held = stream.num_rows, d.heldout_pairs
    if n == 0:
        raise ValueError(f"no rows in {d.path} (data.kind={d.kind})")
    if n_held and n <= n_held:
        raise ValueError(f"data.heldout_pairs={n_held} leaves no training pairs: {d.path} has {n} rows")
    common = dict(block_rows=d.read_block_rows, cache_blocks=d.shuffle_blocks + 1)
    train = LazyPairs(stream, 0, n - n_held, **common)
    held = LazyPairs(stream, n - n_held, n, seed=stream.seed + 7919, **common) if n_held else None
    log.info("%s: %d training rows, %d held out (rows are checked as they are read)", d.path, len(train),
             n_held)
    return train, held
