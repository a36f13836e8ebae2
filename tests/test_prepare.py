"""The prepare job (recipes/prepare_data.py, diffalign.actors.prepare, diffalign.data.prepare): a pair
store made on Ray Data actors holds what an independent encode of each row gives, resumes after a kill
to the same bytes, refuses other setups, and fails on bad sources before any work."""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffalign.config import ConfigError, load_config
from diffalign.data.issues import DataError
from diffalign.data.transforms import PairTransform, decode_image, item_rng
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "prepare.yaml"
RES, SEED, SHARD_ROWS = 16, 0, 8

# Source rows of the test parquet that a reader drops, by kind (global row index).
TIES, MISSING_CAPTION, EMPTY_CAPTION, CORRUPT = (4, 17, 30), 9, 12, 23
EXPECTED_DROPS = {"ties_dropped": 3, "missing_value": 1, "empty_caption": 1, "unreadable_image": 1}
SPLIT = 22  # rows [0, 22) in a.parquet (row groups of 8), the rest in b.parquet (row groups of 5)


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def source_rows(n: int = 40) -> list[dict]:
    rows = []
    for i in range(n):
        size = (20, 16) if i % 5 == 0 else (16, 16)  # some wider than tall: random crops move
        caption = f"  prompt {i % 7} " if i % 3 else f"prompt {i % 7}"  # stripped to one prompt
        rows.append({"caption": caption, "jpg_0": _jpeg(2 * i, size), "jpg_1": _jpeg(2 * i + 1, size),
                     "label_0": float(i % 2)})
    for i in TIES:
        rows[i]["label_0"] = 0.5
    rows[MISSING_CAPTION]["caption"] = None
    rows[EMPTY_CAPTION]["caption"] = "   "
    rows[CORRUPT]["jpg_0"] = rows[CORRUPT]["jpg_0"][:30]
    return rows


def write_parquet(path: Path, rows: list[dict], row_group_size: int, drop: tuple[str, ...] = ()) -> None:
    types = {"caption": pa.string(), "jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64()}
    table = pa.table({k: pa.array([r[k] for r in rows], type=t) for k, t in types.items() if k not in drop})
    pq.write_table(table, path, row_group_size=row_group_size)


def write_source(folder: Path) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = source_rows()
    write_parquet(folder / "a.parquet", rows[:SPLIT], 8)
    write_parquet(folder / "b.parquet", rows[SPLIT:], 5)
    return rows


def valid_rows(rows: list[dict]) -> list[int]:
    bad = {*TIES, MISSING_CAPTION, EMPTY_CAPTION, CORRUPT}
    return [i for i in range(len(rows)) if i not in bad]


def ordered(row: dict) -> tuple[bytes, bytes]:
    """(chosen, rejected) bytes: label_0 = 1 means jpg_0 is preferred."""
    return (row["jpg_0"], row["jpg_1"]) if row["label_0"] == 1.0 else (row["jpg_1"], row["jpg_0"])


def overrides(src: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.path={src}", f"prepare.output={out}", f"model.resolution={RES}",
            f"prepare.shard_rows={SHARD_ROWS}", "prepare.prompt_shard_rows=4", "prepare.num_actors=2",
            "prepare.batch_size=6", "data.center_crop=false", "tracking.mlflow=false", "train.progress=false",
            f"train.seed={SEED}", f"train.output_dir={out}-run", *extra]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in sorted(folder.iterdir()) if f.is_file()}


def store_files(folder: Path) -> dict[str, bytes]:
    """Shards, records and spec (everything but the manifest and report, which carry run times)."""
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())
            if f.suffix in (".safetensors", ".json") and f.name not in ("manifest.json", "report.json")}


def tiny_encoders(cfg):
    from diffalign.models.build import build_bundle

    torch.manual_seed(cfg.train.seed)
    return build_bundle(cfg)


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory):
    """A store of the test parquet, prepared once on 2 Ray Data actors."""
    from diffalign.actors.prepare import prepare_store

    base = tmp_path_factory.mktemp("prepare")
    src, out = base / "src", base / "store"
    rows = write_source(src)
    cfg = load_config(TINY, overrides(src, out))
    t0 = time.perf_counter()
    manifest = prepare_store(cfg)
    print(f"\nprepared {manifest['pairs']} pairs with 2 actors in {time.perf_counter() - t0:.1f} s: "
          f"{manifest['run']['pairs_per_s']:.2f} pairs/s")
    return SimpleNamespace(base=base, src=src, out=out, rows=rows, cfg=cfg, manifest=manifest)


# --------------------------------------------------------------------------------------- single process

def test_plan_shards_covers_the_rows_in_order():
    from diffalign.data.prepare import plan_shards

    assert plan_shards(20, 8) == [(0, 8), (8, 16), (16, 20)]
    assert plan_shards(16, 8) == [(0, 8), (8, 16)]
    assert plan_shards(0, 8) == []


def test_shard_without_valid_rows_gets_a_record_and_no_file(tmp_path):
    from diffalign.data.prepare import encoding_spec, open_source, prepare_pair_shard

    src = tmp_path / "src"
    write_source(src)
    cfg = load_config(TINY, overrides(src, tmp_path / "store"))
    stream = open_source(cfg)
    record = prepare_pair_shard(stream, TIES[0], TIES[0] + 1, str(tmp_path / "store"), 3, vae=None,
                                spec=encoding_spec(cfg), prompt_ids={}, batch_size=4, digest="d")
    assert record["rows"] == 0 and record["file"] is None and record["issues"] == {"ties_dropped": 1}
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["pairs-00003.json"]


@pytest.mark.parametrize("override, message", [
    ("prepare.latents=std", "prepare.latents='std' is not allowed"),
    ("prepare.dtype=float16", "prepare.dtype='float16' is not allowed"),
    ("prepare.shard_rows=0", "prepare.shard_rows must be >= 1"),
    ("prepare.num_actors=0", "prepare.num_actors must be >= 1"),
    ("prepare.gpus_per_actor=1.5", "prepare.gpus_per_actor=1.5: a fraction of a GPU must be <= 1"),
    ("prepare.cpus_per_actor=0", "prepare.cpus_per_actor must be > 0"),
])
def test_prepare_section_is_validated(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(TINY, [override], validate_paths=False)
    assert message in str(exc.value)


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_gpu_prepare_configs_load(name):
    cfg = load_config(ROOT / "configs" / name / "prepare.yaml", validate_paths=False)
    assert cfg.data.kind == "pickapic" and cfg.data.path == "/data/pickapic_v2"
    assert getattr(cfg.data, "split", "train") == "train"
    assert cfg.prepare.num_actors == 8 and cfg.prepare.gpus_per_actor == 1
    assert cfg.model.family == name


# --------------------------------------------------------------------------------------- on Ray Data

def test_store_holds_an_independent_encode_of_every_row(prepared):
    from diffalign.data.latent_cache import encode_moments
    from diffalign.data.store import PairStore, read_json
    from diffalign.models.conditioning import PromptEncoder
    from safetensors.torch import load_file

    m, rows = prepared.manifest, prepared.rows
    valid = valid_rows(rows)
    assert m["rows"] == len(rows) and m["pairs"] == len(valid)
    assert m["dropped"] == EXPECTED_DROPS
    assert [s["shard"] for s in m["shards"]] == list(range(5)) and m["empty_shards"] == []
    assert sum(s["rows"] for s in m["shards"]) == m["pairs"]
    enc = m["encoding"]
    assert enc == {"latents": True, "moments": 2, "views": 2, "dtype": "bfloat16", "resolution": RES,
                   "center_crop": False, "random_flip": True, "seed": SEED, "sizes": False,
                   "embeddings": True}
    assert [f["path"].rsplit("/", 1)[-1] for f in m["source"]["files"]] == ["a.parquet", "b.parquet"]
    report = read_json(str(prepared.out / "report.json"))
    assert report["dropped"] == EXPECTED_DROPS
    # Messages name the file and its row (b.parquet's rows count from 0 in that file).
    assert any("b.parquet, row 1," in msg and "jpg_" in msg for msg in report["examples"]["unreadable_image"])
    assert any("a.parquet, row 9," in msg for msg in report["examples"]["missing_value"])

    # Prompts: the stripped captions of the source in first-seen order (dropped rows' too).
    captions = [r["caption"].strip() if r["caption"] and r["caption"].strip() else None for r in rows]
    prompt_ids = {}
    for c in captions:
        if c is not None:
            prompt_ids.setdefault(c, len(prompt_ids))
    assert m["prompts"] == len(prompt_ids) == 7 and len(m["prompt_shards"]) == 2

    bundle = tiny_encoders(prepared.cfg)
    transform = PairTransform(RES, random_crop=True, random_flip=True)
    seen = []
    for shard in m["shards"]:
        tensors = load_file(str(prepared.out / shard["file"]))
        lat = tensors["latents"]
        assert lat.dtype == torch.bfloat16 and lat.shape[:4] == (shard["rows"], 2, 2, 2)
        for j, index in enumerate(tensors["source_index"].tolist()):
            seen.append(index)
            chosen, rejected = (decode_image(b) for b in ordered(rows[index]))
            item = transform(chosen, rejected, item_rng(SEED, 0, index))
            pixels = torch.stack([item["chosen"], item["rejected"]])
            pixels = torch.cat([pixels, pixels.flip(-1)])
            with torch.no_grad():
                mean, std = encode_moments(bundle.vae, pixels)
            expected = torch.stack([mean, std], dim=1).view(2, 2, 2, *mean.shape[1:]).to(torch.bfloat16)
            # One bf16 rounding step at most: the actor encoded this row within a batch of others.
            torch.testing.assert_close(lat[j].float(), expected.float(), rtol=1 / 64, atol=1e-2)
            assert int(tensors["prompt_id"][j]) == prompt_ids[captions[index]]
    assert seen == valid

    store = PairStore(str(prepared.out))
    encoder = PromptEncoder(bundle)
    for i in range(len(store)):
        item = store.item(i, 0)
        index = valid[i]
        assert item["prompt"] == captions[index]
        with torch.no_grad():
            embeds = encoder.text_embeddings([item["prompt"]])[0][0]
        torch.testing.assert_close(item["prompt_embeds"], embeds.to(torch.bfloat16).float(), rtol=1 / 64,
                                   atol=1e-2)
    sampled = PairStore(str(prepared.out), sampling="sample", seed=SEED).item(3, 2)
    assert sampled["chosen_latents"].shape == lat.shape[-3:]


def test_killed_prepare_resumes_to_the_same_store(prepared, ray_local, tmp_path):
    out = tmp_path / "store"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    cmd = [sys.executable, "recipes/prepare_data.py", "--config", str(TINY),
           *[a for kv in overrides(prepared.src, out) for a in ("--set", kv)]]
    log = tmp_path / "killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, "DIFFALIGN_PREPARE_SHARD_DELAY": "1.5"},
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            done = list(out.glob("pairs-*.json")) if out.is_dir() else []
            if 1 <= len(done) < 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the prepare ended before it could be killed:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (out / "manifest.json").exists()
    _wait_for_actors_to_go(ray_local)

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert f"--set data.kind=store --set data.path={out}" in rerun.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"]["shards_reused"] >= 1 and manifest["run"]["shards_made"] >= 1
    assert store_files(out) == store_files(prepared.out)
    strip = lambda m: {k: v for k, v in m.items() if k != "run"}  # noqa: E731
    assert strip(manifest) == strip(prepared.manifest)
    report = lambda folder: json.loads((folder / "report.json").read_text())  # noqa: E731
    assert report(out) == report(prepared.out)


def _wait_for_actors_to_go(ray, timeout: float = 60.0) -> None:
    """The dead job's shard actors (Ray ends them when their driver dies) are gone."""
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [a for a in list_actors(address=address, filters=[("state", "=", "ALIVE")])
                 if "ShardWorker" in (a.class_name or "") or "MapWorker" in (a.class_name or "")]
        if not alive:
            return
        time.sleep(0.5)
    pytest.fail("the killed prepare's actors are still alive")


def test_store_of_another_vae_is_refused(prepared):
    from diffalign.actors.prepare import prepare_store
    from diffalign.data.store import StoreError, model_identity, open_store

    common = dict(resolution=RES, center_crop=False, random_flip=True, sampling="sample", seed=SEED,
                  heldout=4)
    same = tiny_encoders(prepared.cfg)
    train, held = open_store(str(prepared.out), identity=model_identity(same), **common)
    assert len(train) == prepared.manifest["pairs"] - 4 and len(held) == 4
    other_cfg = load_config(TINY, overrides(prepared.src, prepared.out, "model.tiny_seed=1"))
    other = model_identity(tiny_encoders(other_cfg))
    with pytest.raises(StoreError, match="VAE weights"):
        open_store(str(prepared.out), identity=other, **common)

    # Preparing for the other VAE into the same output is refused, naming it; nothing changes.
    before = snapshot(prepared.out)
    with pytest.raises(StoreError, match="another setup") as exc:
        prepare_store(other_cfg)
    assert "model.vae: store" in str(exc.value) and "rm -r" in str(exc.value)
    assert snapshot(prepared.out) == before


def test_missing_column_fails_first_and_a_fixed_rerun_leaves_finished_shards(prepared, tmp_path):
    from diffalign.actors.prepare import prepare_store

    b = prepared.src / "b.parquet"
    backup = tmp_path / "b.parquet"
    shutil.copy2(b, backup)
    before = snapshot(prepared.out)
    try:
        write_parquet(b, prepared.rows[SPLIT:], 5, drop=("jpg_1",))
        with pytest.raises(DataError, match=r"b\.parquet.*jpg_1"):
            prepare_store(prepared.cfg)
        b.write_bytes(b"not a parquet file")
        strict = copy.deepcopy(prepared.cfg)
        strict.data.on_error = "raise"  # with skip, a bad shard of several is left out and counted
        with pytest.raises(DataError, match=r"b\.parquet.*unreadable parquet file"):
            prepare_store(strict)
        assert snapshot(prepared.out) == before
    finally:
        shutil.copy2(backup, b)  # the same file back, mtime too: the source fingerprint matches again
    manifest = prepare_store(prepared.cfg)
    assert manifest["run"]["shards_made"] == 0 and manifest["run"]["shards_reused"] == 5
    assert manifest["run"]["prompt_shards_made"] == 0
    after = snapshot(prepared.out)
    shards = [n for n in before if n.endswith(".safetensors") or n.startswith(("pairs-", "prompts-"))]
    assert shards and all(after[n] == before[n] for n in shards)


def test_pixel_store_reads_the_source_transform(prepared, tmp_path):
    from diffalign.actors.prepare import prepare_store
    from diffalign.data.store import PairStore

    out = tmp_path / "pixels"
    cfg = load_config(TINY, overrides(prepared.src, out, "prepare.encode=false", "prepare.num_actors=1"))
    manifest = prepare_store(cfg)
    assert manifest["encoding"]["latents"] is False and manifest["prompt_shards"] == []
    assert manifest["dropped"] == EXPECTED_DROPS and manifest["model"] == {"family": "sd15"}
    transform = PairTransform(RES, random_crop=True, random_flip=True)
    store = PairStore(str(out), transform=transform, seed=SEED)
    valid = valid_rows(prepared.rows)
    assert len(store) == len(valid)
    for i in (0, 5, len(valid) - 1):
        for epoch in (0, 3):
            item = store.item(i, epoch)
            chosen, rejected = (decode_image(b) for b in ordered(prepared.rows[valid[i]]))
            expected = transform(chosen, rejected, item_rng(SEED, epoch, valid[i]))
            assert torch.equal(item["chosen"], expected["chosen"])
            assert torch.equal(item["rejected"], expected["rejected"])
            assert item["crop_top_left"] == expected["crop_top_left"]
            assert item["original_size"] == expected["original_size"]
