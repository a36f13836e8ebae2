"""Data at scale: the block order, lazy raw reads and the pair store read what each rank trains on and
no more; a learner's memory does not grow with the dataset; training from a store resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffalign.data.demo_files import write_demo_store, write_pickapic_parquet
from diffalign.train.data_order import BlockOrder, batch_order

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the block order

def test_block_order_gives_each_rank_its_own_blocks_and_every_row_once_per_epoch():
    blocks = [5, 3, 7, 1, 4, 6, 2, 8, 3, 5]
    n, world, bsz = sum(blocks), 3, 2
    starts = [sum(blocks[:i]) for i in range(len(blocks))]
    block_of = {r: b for b, s in enumerate(starts) for r in range(s, s + blocks[b])}
    orders = [BlockOrder(blocks, bsz, seed=3, rank=r, world_size=world, window=2) for r in range(world)]
    per_epoch: dict[int, list[int]] = {0: [], 1: []}
    touched = []
    for order in orders:
        steps = -(-2 * order.part // bsz)  # two epochs of this rank's part
        seen = [pos for k in range(steps) for pos in order.positions(k)][: 2 * order.part]
        for epoch, i in seen:
            per_epoch[epoch].append(i)
        touched.append({block_of[i] for e, i in seen if e == 0})
    for epoch in (0, 1):  # every row exactly once per epoch, over all ranks
        assert sorted(per_epoch[epoch]) == list(range(n)), epoch
    # A rank reads a contiguous run of the permuted blocks: what it shares with another rank is at
    # most the shuffle group (window=2 blocks) they meet in.
    for a in range(world):
        for b in range(a + 1, world):
            assert len(touched[a] & touched[b]) <= 2
    # A pure function of (seed, epoch, step, rank): a fresh order (a resumed run) reads the same.
    again = BlockOrder(blocks, bsz, seed=3, rank=1, world_size=world, window=2)
    assert again.positions(7) == orders[1].positions(7)
    other_seed = BlockOrder(blocks, bsz, seed=4, rank=1, world_size=world, window=2)
    assert other_seed.positions(0) != again.positions(0)
    # The two epochs are shuffled differently.
    assert orders[0].row(0, 0) != orders[0].row(1, 0) or orders[0].row(0, 1) != orders[0].row(1, 1)


def test_datasets_read_a_block_at_a_time_get_the_block_order(tiny_cfg, tmp_path):
    from diffalign.data.factory import open_pair_dataset

    path = tmp_path / "p.parquet"
    write_pickapic_parquet(path, 40, row_group_size=10)
    train, _ = open_pair_dataset(tiny_cfg("data.kind=pickapic", f"data.path={path}", "data.heldout_pairs=4",
                                          "data.read_block_rows=6"))
    assert train.read_blocks == [6, 4, 6, 4, 6, 4, 6]  # row groups of 10, cut at 6; 36 training rows
    assert isinstance(batch_order(train, 4, seed=0), BlockOrder)
    assert not isinstance(batch_order(list(range(9)), 4, seed=0), BlockOrder)


# --------------------------------------------------------------------------- raw files read lazily

def _rank_reads(cfg, rank: int, world: int, steps: int):
    """Rows a rank's dataset validated, and the rows its order asked for, after `steps` micro-steps."""
    from diffalign.data.factory import open_pair_dataset

    train, _ = open_pair_dataset(cfg)
    read_ranges = []
    inner = train.stream._iter_raw

    def spy(start, stop):
        read_ranges.append((start, stop))
        return inner(start, stop)

    train.stream._iter_raw = spy
    order = batch_order(train, cfg.optim.batch_size, cfg.train.seed, rank, world, cfg.data.shuffle_blocks)
    assert train.issues.rows_seen == 0  # nothing read before the first batch
    wanted = set()
    for k in range(steps):
        for epoch, i in order.positions(k):
            item = train.item(i, epoch)
            assert item["chosen"].shape[-1] == cfg.model.resolution
            wanted.add(i)
    rows = {r for a, b in read_ranges for r in range(a, b)}
    return train, order, wanted, rows


def test_each_rank_reads_only_the_blocks_of_the_rows_it_trains_on(tiny_cfg, tmp_path):
    path = tmp_path / "p.parquet"
    write_pickapic_parquet(path, 96, row_group_size=8, tie_every=12)  # 104 rows with 8 ties
    cfg = tiny_cfg("data.kind=pickapic", f"data.path={path}", "data.heldout_pairs=0", "optim.batch_size=4",
                   "data.read_block_rows=8", "data.shuffle_blocks=2")
    world = 2
    reads = [_rank_reads(cfg, r, world, steps=13) for r in range(world)]  # one epoch of a 52-row part
    for train, order, wanted, rows in reads:
        blocks = {i // 8 for i in wanted}
        assert rows <= {r for b in blocks for r in range(8 * b, 8 * b + 8)}  # its blocks only
        # Its part, and at most one shuffle group (2 blocks) shared with the neighbour at each end.
        assert len(rows) <= order.part + 2 * 2 * 8
        assert train.issues.count("ties_dropped") == sum(1 for r in rows if (r + 1) % 13 == 0)
    assert len(reads[0][3] & reads[1][3]) <= 2 * 8  # the ranks share at most one shuffle group


def test_a_bad_row_is_replaced_by_the_next_good_row_of_its_block(tiny_cfg, tmp_path):
    from diffalign.data.factory import open_pair_dataset

    path = tmp_path / "p.parquet"
    write_pickapic_parquet(path, 12, row_group_size=4, tie_every=3)  # every 4th row is a tie
    cfg = tiny_cfg("data.kind=pickapic", f"data.path={path}", "data.heldout_pairs=0")
    train, _ = open_pair_dataset(cfg)
    tie = train.item(3, 0)  # row 3 is a tie: the block's next good row, cyclically, is row 0
    assert tie["prompt"] == train.item(0, 0)["prompt"] == "a red thing, number 0"
    assert train.issues.count("ties_dropped") == 1 and train.issues.rows_seen == 4
    strict = tiny_cfg("data.kind=pickapic", f"data.path={path}", "data.heldout_pairs=0",
                      "data.on_error=raise")
    train, _ = open_pair_dataset(strict)
    train.item(3, 0)  # a tie is not an error, even with on_error=raise


# --------------------------------------------------------------------------- the pair store

@pytest.fixture
def tiny_bundle(tiny_cfg):
    from diffalign.models.build import build_policy

    cfg = tiny_cfg()
    return cfg, build_policy(cfg)[0]


def test_a_store_reads_only_the_bytes_of_the_pairs_asked_for(tiny_bundle, tmp_path):
    from diffalign.data import store

    cfg, bundle = tiny_bundle
    root = str(tmp_path / "store")
    write_demo_store(root, bundle, pairs=300, resolution=cfg.model.resolution, shard_rows=64)
    ds = store.PairStore(root, sampling="sample", seed=1)
    read = []
    for k in range(len(ds._pairs.files)):
        shard = ds._pairs[k]
        inner = shard.file

        class Spy:
            def read_at(self, n, offset, _inner=inner):
                read.append(n)
                return _inner.read_at(n, offset)

            def close(self, _inner=inner):
                _inner.close()

        shard.file = Spy()
    headers = sum(read)
    read.clear()
    row = ds._pairs[0].tensors["latents"]
    latent_bytes = 2 * torch.Size(row[1][1:]).numel()  # bf16
    for i in (5, 70, 299):
        ds.item(i, 0)
    lat_reads = [n for n in read if n == latent_bytes]
    assert len(lat_reads) == 3  # one latent row per pair read, nothing of the other 297 pairs
    assert sum(read) < 3 * (latent_bytes + 200)  # plus a prompt, an index and an id per pair
    assert headers < 8 * 600


def test_a_store_made_for_another_vae_is_refused_naming_it(tiny_cfg, tmp_path):
    from diffalign.data.store import StoreError
    from diffalign.models.build import build_policy
    from diffalign.train.setup import build_datasets

    other = build_policy(tiny_cfg("model.tiny_seed=7"))[0]
    root = str(tmp_path / "store")
    write_demo_store(root, other, pairs=20, resolution=16, shard_rows=8)
    cfg = tiny_cfg("data.kind=store", f"data.path={root}", "data.heldout_pairs=4")
    with pytest.raises(StoreError, match="VAE weights"):
        build_datasets(cfg, build_policy(cfg)[0])
    with pytest.raises(StoreError, match="model.resolution"):
        build_datasets(tiny_cfg("data.kind=store", f"data.path={root}", "model.resolution=64",
                                "data.heldout_pairs=4"), other)
    with pytest.raises(StoreError, match="manifest.json missing"):
        build_datasets(tiny_cfg("data.kind=store", f"data.path={tmp_path}", "data.heldout_pairs=4"), other)


def test_training_reads_latents_and_prompt_embeddings_from_the_store(tiny_cfg, tmp_path):
    from diffalign.models.build import build_policy
    from diffalign.train.driver import build_trainer

    write_demo_store(str(tmp_path / "store"), build_policy(tiny_cfg())[0], pairs=20, resolution=32,
                     shard_rows=8)
    cfg = tiny_cfg("data.kind=store", f"data.path={tmp_path / 'store'}", "data.heldout_pairs=4",
                   "train.eval_every=2", "objective.name=dpo")
    trainer = build_trainer(cfg)
    calls = []
    encode = trainer.setup.prompt_encoder.text_embeddings
    trainer.setup.prompt_encoder.text_embeddings = lambda p: calls.append(p) or encode(p)
    summary = trainer.fit()
    assert trainer.step == 4 and torch.isfinite(torch.tensor(summary["loss"]))
    assert calls == []  # the text encoders never ran: the store's embeddings were used
    assert "heldout/implicit_acc" in summary


# --------------------------------------------------------------------------- memory per learner

LEARNER = textwrap.dedent("""
    import json, sys
    from diffalign.config import load_config
    from diffalign.train.driver import build_trainer
    cfg = load_config(None, sys.argv[1:])
    trainer = build_trainer(cfg)
    for _ in range(cfg.train.max_steps):
        trainer.train_step()
    issues = trainer.data_issues
    # VmHWM, not ru_maxrss: the latter survives exec and would report the parent's peak.
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(json.dumps({"maxrss_kib": hwm,
                      "rows_seen": issues.rows_seen if issues is not None else None}))
""")


def _learner_rss(tmp_path, *overrides: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [f"train.output_dir={tmp_path}/run", "train.progress=false", "train.eval_every=0",
            "tracking.mlflow=false", "guard.enabled=false", "data.heldout_pairs=0", "optim.batch_size=4",
            "train.max_steps=6", "model.finetune=lora"]
    proc = subprocess.run([sys.executable, "-c", LEARNER, *base, *overrides], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_learner_memory_does_not_grow_with_the_dataset(tmp_path):
    """Raw parquet (lazy) and a store: 16x more data adds almost nothing to a learner's peak RSS; the
    up-front read of every row (the in-memory cache of the same parquet) adds its size: the control."""
    from diffalign.config import load_config
    from diffalign.models.build import build_policy

    sizes = {"small": 250, "large": 4000}
    info = {}
    for name, n in sizes.items():
        info[name] = write_pickapic_parquet(tmp_path / f"{name}.parquet", n, image_size=96, row_group_size=32,
                                            distinct_images=16)
    big = info["large"]["bytes"] - info["small"]["bytes"]
    assert big > 40 * 2**20  # the large set holds > 40 MiB more image bytes
    raw = {name: _learner_rss(tmp_path, "data.kind=pickapic", f"data.path={tmp_path / name}.parquet",
                              "data.cache_latents=false", "data.read_block_rows=32", "data.shuffle_blocks=2")
           for name in sizes}
    assert raw["large"]["rows_seen"] <= 6 * 4 + 3 * 32  # the rows of its batches' blocks, not 4000
    assert (raw["large"]["maxrss_kib"] - raw["small"]["maxrss_kib"]) * 1024 < 0.1 * big

    bundle = build_policy(load_config(None, ["model.finetune=lora"]))[0]
    for name, n in {"small": 1000, "large": 16000}.items():
        write_demo_store(str(tmp_path / f"store-{name}"), bundle, pairs=n, resolution=32, shard_rows=1024)
    st = {name: _learner_rss(tmp_path, "data.kind=store", f"data.path={tmp_path}/store-{name}")
          for name in ("small", "large")}
    store_bytes = sum(f.stat().st_size for f in (tmp_path / "store-large").iterdir())
    assert store_bytes > 30 * 2**20
    # The batch order holds one int64 per pair (0.24 MiB here); everything else is per batch.
    assert (st["large"]["maxrss_kib"] - st["small"]["maxrss_kib"]) * 1024 < 0.1 * store_bytes

    # Control: reading every row up front (the in-memory latent cache decodes the whole parquet and
    # keeps its encoded rows) grows with the data, so the bounds above can fail.
    cached = _learner_rss(tmp_path, "data.kind=pickapic", f"data.path={tmp_path}/large.parquet",
                          "data.cache_latents=true", "data.read_block_rows=32", "train.max_steps=1")
    print({"raw": raw, "store": st, "cached": cached, "data_bytes": big, "store_bytes": store_bytes})
    assert cached["rows_seen"] == 4000
    assert (cached["maxrss_kib"] - raw["large"]["maxrss_kib"]) * 1024 > 0.3 * big


# --------------------------------------------------------------------------- exact resume, 2 learners

@pytest.mark.slow
def test_two_learners_on_a_store_resume_exactly_after_a_kill(ray_local, tiny_cfg, tmp_path):
    """Two Ray Train learners read their own rows of one store; rank 1 is killed at step 4, the group
    comes back from the step-2 checkpoint and redoes steps 3-4 bit for bit."""
    from diffalign.actors.learner import FaultInjection, effective_steps, read_step_log, train_with_ray
    from diffalign.models.build import build_policy

    root = tmp_path / "store"
    write_demo_store(str(root), build_policy(tiny_cfg())[0], pairs=40, resolution=32, shard_rows=16)
    cfg = tiny_cfg("ray.num_learners=2", "train.checkpoint_every=2", "optim.batch_size=2", "data.kind=store",
                   f"data.path={root}", "data.heldout_pairs=8", "objective.name=dpo")
    out = train_with_ray(cfg, fault=FaultInjection(kill_at_step=4, rank=1))
    assert out["step"] == 4 and out["ranks_in_sync"]
    log = read_step_log(out["step_log"])
    starts = [r for r in log if r["event"] == "start"]
    assert len(starts) == 2 and starts[1]["restored_step"] == 2
    assert effective_steps(log) == [1, 2, 3, 4]
    first = {r["step"]: r for r in log if r["event"] == "step" and r["attempt"] == starts[0]["attempt"]}
    again = {r["step"]: r for r in log if r["event"] == "step" and r["attempt"] == starts[1]["attempt"]}
    for step in (3, 4):
        assert again[step]["loss"] == first[step]["loss"]
        assert again[step]["fingerprint"] == first[step]["fingerprint"]
    assert out["rank_fingerprints"][0] == first[4]["fingerprint"]


def test_a_corrupt_row_group_is_named_and_skipped_or_raised(tiny_cfg, tmp_path):
    from diffalign.data.factory import open_pair_dataset
    from diffalign.data.issues import DataError

    path = tmp_path / "p.parquet"
    write_pickapic_parquet(path, 16, row_group_size=8)
    data = bytearray(path.read_bytes())
    data[4:40] = b"\xff" * 36  # the first row group's page header: unreadable, the footer is fine
    path.write_bytes(bytes(data))
    cfg = tiny_cfg("data.kind=pickapic", f"data.path={path}", "data.heldout_pairs=0",
                   "data.read_block_rows=8")
    train, _ = open_pair_dataset(cfg)  # opening reads footers only
    assert train.item(2, 0)["prompt"] == "a red thing, number 8"  # replaced from the next block
    assert train.issues.count("unreadable_block") == 1 and train.issues.rows_seen == 16
    assert f"{path} rows [0, 8) cannot be read" in train.issues.report()
    strict, _ = open_pair_dataset(tiny_cfg("data.kind=pickapic", f"data.path={path}", "data.heldout_pairs=0",
                                           "data.read_block_rows=8", "data.on_error=raise"))
    with pytest.raises(DataError, match=r"p\.parquet rows \[0, 8\) cannot be read"):
        strict.item(2, 0)


def test_training_reads_a_store_on_s3(s3_server, tiny_cfg, tmp_path):
    """A store on the loopback S3 server (real protocol, ranged GETs) trains as a local one does."""
    from diffalign.data import uri
    from diffalign.models.build import build_policy
    from diffalign.train.driver import build_trainer

    bucket = s3_server.make_bucket("stores")
    local, remote = str(tmp_path / "store"), f"{bucket}/tiny/store"
    bundle = build_policy(tiny_cfg())[0]
    for root in (local, remote):
        write_demo_store(root, bundle, pairs=24, resolution=32, shard_rows=8)
    assert uri.is_file(uri.join(remote, "manifest.json"))
    losses = {}
    for name, root in (("local", local), ("s3", remote)):
        cfg = tiny_cfg("data.kind=store", f"data.path={root}", "data.heldout_pairs=4", "objective.name=dpo",
                       f"train.output_dir={tmp_path}/{name}")
        trainer = build_trainer(cfg)
        losses[name] = [trainer.train_step()["loss"] for _ in range(3)]
    assert losses["s3"] == losses["local"]


def test_an_unreadable_shard_of_many_is_skipped_and_counted_or_raised(tiny_cfg, tmp_path):
    from diffalign.data.factory import open_pair_dataset
    from diffalign.data.issues import DataError

    folder = tmp_path / "shards"
    write_pickapic_parquet(folder / "a.parquet", 8, row_group_size=4)
    write_pickapic_parquet(folder / "b.parquet", 8, row_group_size=4)
    (folder / "b.parquet").write_bytes(b"PAR1 truncated")
    cfg = tiny_cfg("data.kind=pickapic", f"data.path={folder}", "data.heldout_pairs=2")
    train, _ = open_pair_dataset(cfg)
    assert len(train) == 6  # a.parquet alone
    assert train.issues.count("unreadable_file") == 1 and "b.parquet" in train.issues.report()
    with pytest.raises(DataError, match=r"b\.parquet.*unreadable parquet file"):
        open_pair_dataset(tiny_cfg("data.kind=pickapic", f"data.path={folder}", "data.heldout_pairs=2",
                                   "data.on_error=raise"))
