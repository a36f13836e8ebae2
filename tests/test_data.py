"""Readers, transforms, bad-input accounting, sharding and the latent cache of diffalign.data."""

from __future__ import annotations

import csv
import io
import json
import logging
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffalign.data import (
    DataError,
    DataIssues,
    ImageFolderDataset,
    LatentPairDataset,
    PairFileDataset,
    PairTransform,
    PickAPicPairs,
    StaleCacheError,
    collate_pairs,
    encode_latents,
    precompute_latents,
    shard_bounds,
    to_tensor,
)
from PIL import Image
from torch.utils.data import DataLoader

RED, BLUE, GREEN, YELLOW = (220, 20, 20), (20, 20, 220), (20, 220, 20), (220, 220, 20)
RES = 16


# -- helpers -----------------------------------------------------------------------------------------


def solid(color: tuple[int, int, int], size: tuple[int, int] = (24, 20)) -> Image.Image:
    return Image.new("RGB", size, color)


def halves(
    left: tuple[int, int, int], right: tuple[int, int, int], size: tuple[int, int] = (24, 20)
) -> Image.Image:
    image = Image.new("RGB", size, left)
    image.paste(Image.new("RGB", (size[0] - size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return image


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    data = encode(halves(RED, BLUE, (64, 64)), "JPEG")
    return data[: len(data) // 2]


def write_parquet(
    path, rows: list[dict], row_group_size: int | None = None, drop: tuple[str, ...] = ()
) -> None:
    columns = {"caption": pa.string(), "jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64()}
    table = pa.table({k: pa.array([r[k] for r in rows], type=t) for k, t in columns.items() if k not in drop})
    pq.write_table(table, path, row_group_size=row_group_size)


def good_row(prompt: str, red_first: bool = True, fmt: str = "PNG") -> dict:
    red, blue = encode(solid(RED), fmt), encode(solid(BLUE), fmt)
    if red_first:
        return {"caption": prompt, "jpg_0": red, "jpg_1": blue, "label_0": 1.0}
    return {"caption": prompt, "jpg_0": blue, "jpg_1": red, "label_0": 0.0}


def messy_rows() -> list[dict]:
    """Three good pairs among one tie, two unreadable images, an empty caption and a bad label."""
    red, blue = encode(solid(RED)), encode(solid(BLUE))
    return [
        good_row("good red first"),  # row 0
        good_row("good blue first", red_first=False),  # row 1
        {"caption": "tie", "jpg_0": red, "jpg_1": blue, "label_0": 0.5},  # row 2
        {"caption": "truncated", "jpg_0": truncated_jpeg(), "jpg_1": blue, "label_0": 1.0},  # row 3
        {"caption": "garbage", "jpg_0": red, "jpg_1": b"\x00not an image\xff" * 8, "label_0": 1.0},  # row 4
        {"caption": "   ", "jpg_0": red, "jpg_1": blue, "label_0": 1.0},  # row 5
        {"caption": "bad label", "jpg_0": red, "jpg_1": blue, "label_0": 2.0},  # row 6
        good_row("good jpeg", fmt="JPEG"),  # row 7
    ]


EXPECTED_ISSUES = {
    "empty_caption": 1,
    "label_out_of_range": 1,
    "ties_dropped": 1,
    "unreadable_image": 2,
}


def assert_red_over_blue(item: dict) -> None:
    chosen, rejected = item["chosen"], item["rejected"]
    assert chosen[0].mean() > 0.5 and chosen[2].mean() < -0.5, "chosen should be the red image"
    assert rejected[2].mean() > 0.5 and rejected[0].mean() < -0.5, "rejected should be the blue image"


def numbered_rows(n: int) -> list[dict]:
    return [good_row(f"p{i}", red_first=i % 2 == 0) for i in range(n)]


# -- Pick-a-Pic parquet ------------------------------------------------------------------------------


def test_parquet_bad_rows_are_counted_and_good_rows_ordered(tmp_path, caplog):
    path = tmp_path / "pairs.parquet"
    write_parquet(path, messy_rows(), row_group_size=3)
    ds = PickAPicPairs(path, resolution=RES, batch_rows=2)
    with caplog.at_level(logging.WARNING, logger="diffalign.data"):
        items = list(ds)
    assert [it["prompt"] for it in items] == ["good red first", "good blue first", "good jpeg"]
    for item in items:
        assert_red_over_blue(item)
        assert item["chosen"].shape == (3, RES, RES) and item["chosen"].dtype == torch.float32
        assert item["chosen"].min() >= -1 and item["chosen"].max() <= 1
        assert item["original_size"] == (20, 24)
        assert item["crop_top_left"] == (0, int(round((RES * 24 // 20 - RES) / 2)))
    assert ds.issues.summary() == EXPECTED_ISSUES
    assert ds.issues.rows_seen == 8 and ds.issues.items_yielded == 3
    # Each problem names the file, row and column; ties are not warnings.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("row 3" in m and "jpg_0" in m and "pairs.parquet" in m for m in warnings)
    assert any("row 4" in m and "jpg_1" in m for m in warnings)
    assert any("row 6" in m and "label_0" in m for m in warnings)
    assert not any("tie" in m and "skipped" in m for m in warnings)
    report = ds.issues.report()
    assert "unreadable_image: 2" in report and "3 items from 8 rows" in report


def test_parquet_on_error_raise_names_row_and_column(tmp_path):
    path = tmp_path / "pairs.parquet"
    write_parquet(path, messy_rows())
    ds = PickAPicPairs(path, resolution=RES, on_error="raise")
    with pytest.raises(DataError, match=r"row 3.*jpg_0") as exc:
        list(ds)  # the tie on row 2 is dropped, not raised
    assert exc.value.row == 3 and exc.value.column == "jpg_0" and exc.value.kind == "unreadable_image"
    assert "pairs.parquet" in str(exc.value)
    with pytest.raises(ValueError, match="on_error"):
        PickAPicPairs(path, on_error="ignore")


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_parquet_missing_column_fails_at_open(tmp_path, on_error):
    write_parquet(tmp_path / "a.parquet", numbered_rows(2))
    write_parquet(tmp_path / "b.parquet", numbered_rows(2), drop=("jpg_1",))
    with pytest.raises(DataError, match=r"b\.parquet.*jpg_1") as exc:
        PickAPicPairs(tmp_path, on_error=on_error)
    assert exc.value.column == "jpg_1" and exc.value.kind == "missing_column"


def test_parquet_directory_glob_and_list(tmp_path):
    rows = numbered_rows(7)
    write_parquet(tmp_path / "train-0.parquet", rows[:4], row_group_size=3)
    write_parquet(tmp_path / "train-1.parquet", rows[4:], row_group_size=2)
    write_parquet(tmp_path / "other.parquet", numbered_rows(1))
    expected = [f"p{i}" for i in range(7)]
    by_glob = PickAPicPairs(str(tmp_path / "train-*.parquet"), resolution=RES, batch_rows=2)
    assert by_glob.num_rows == 7 and [it["prompt"] for it in by_glob] == expected
    by_list = PickAPicPairs([tmp_path / "train-0.parquet", tmp_path / "train-1.parquet"], resolution=RES)
    assert [it["prompt"] for it in by_list] == expected
    assert PickAPicPairs(tmp_path, resolution=RES).num_rows == 8
    for item in by_glob:
        assert_red_over_blue(item)
    with pytest.raises(FileNotFoundError):
        PickAPicPairs(str(tmp_path / "nothing-*.parquet"))


def test_sharding_partitions_rows_without_overlap(tmp_path):
    rows = numbered_rows(11)
    rows[5] = {**rows[5], "label_0": 0.5}  # a tie inside one shard is that shard's to count
    write_parquet(tmp_path / "a.parquet", rows[:6], row_group_size=4)
    write_parquet(tmp_path / "b.parquet", rows[6:], row_group_size=2)
    world = 3
    seen: list[list[str]] = []
    ties = 0
    for rank in range(world):
        ds = PickAPicPairs(tmp_path, resolution=RES, rank=rank, world_size=world, batch_rows=3)
        seen.append([it["prompt"] for it in ds])
        ties += ds.issues.count("ties_dropped")
    flat = [p for shard in seen for p in shard]
    assert len(flat) == len(set(flat))
    assert sorted(flat) == sorted(f"p{i}" for i in range(11) if i != 5)
    assert ties == 1
    assert [len(s) for s in seen] == [3, 3, 4]  # blocks of 3, 4, 4 rows; the tie sits in the second
    assert shard_bounds(11, 0, 3) == (0, 3) and shard_bounds(11, 2, 3) == (7, 11)
    with pytest.raises(ValueError):
        PickAPicPairs(tmp_path, rank=3, world_size=3)


def test_sharding_across_dataloader_workers(tmp_path):
    write_parquet(tmp_path / "a.parquet", numbered_rows(10), row_group_size=3)
    prompts: list[str] = []
    for rank in range(2):
        ds = PickAPicPairs(tmp_path, resolution=RES, rank=rank, world_size=2)
        loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_pairs)
        prompts += [p for batch in loader for p in batch["prompts"]]
    assert sorted(prompts) == sorted(f"p{i}" for i in range(10))


def test_max_samples_caps_source_rows(tmp_path):
    write_parquet(tmp_path / "a.parquet", messy_rows())
    ds = PickAPicPairs(tmp_path, resolution=RES, max_samples=3)
    assert ds.num_rows == 3
    assert [it["prompt"] for it in ds] == ["good red first", "good blue first"]
    assert ds.issues.summary() == {"ties_dropped": 1}


def test_materialize_matches_stream_and_shuffle_buffer_keeps_items(tmp_path):
    write_parquet(tmp_path / "a.parquet", messy_rows())
    ds = PickAPicPairs(tmp_path, resolution=RES)
    streamed = list(ds)
    table = ds.materialize()
    assert len(table) == 3 and table.issues.summary() == EXPECTED_ISSUES
    for i, item in enumerate(streamed):
        assert table[i]["prompt"] == item["prompt"]
        assert torch.equal(table[i]["chosen"], item["chosen"])
        assert torch.equal(table[i]["rejected"], item["rejected"])
    shuffled = PickAPicPairs(tmp_path, resolution=RES, shuffle_buffer=2, seed=3)
    assert sorted(it["prompt"] for it in shuffled) == sorted(it["prompt"] for it in streamed)


def test_hf_save_to_disk_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets", reason="`datasets` (the [ray] extra) is not installed")
    rows = messy_rows()
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    features = datasets.Features(
        {
            "caption": datasets.Value("string"),
            "jpg_0": datasets.Value("binary"),
            "jpg_1": datasets.Value("binary"),
            "label_0": datasets.Value("float64"),
        }
    )
    ds = datasets.Dataset.from_dict(columns, features=features)
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0, 1])}).save_to_disk(str(tmp_path / "dict"))

    single = PickAPicPairs(tmp_path / "single", resolution=RES, batch_rows=3)
    assert single.format == "hf"
    items = list(single)
    assert [it["prompt"] for it in items] == ["good red first", "good blue first", "good jpeg"]
    for item in items:
        assert_red_over_blue(item)
    assert single.issues.summary() == EXPECTED_ISSUES

    test_split = PickAPicPairs(tmp_path / "dict", split="test", resolution=RES)
    assert [it["prompt"] for it in test_split] == ["good red first", "good blue first"]
    with pytest.raises(ValueError, match="split 'validation'"):
        PickAPicPairs(tmp_path / "dict", split="validation")
    sharded = [
        [it["prompt"] for it in PickAPicPairs(tmp_path / "single", resolution=RES, rank=r, world_size=2)]
        for r in range(2)
    ]
    assert sorted(sharded[0] + sharded[1]) == sorted(it["prompt"] for it in items)
    with pytest.raises(DataError, match="label_0"):
        PickAPicPairs(ds.remove_columns("label_0"))


# -- transforms ----------------------------------------------------------------------------------------


def test_flip_and_random_crop_identical_within_a_pair():
    # Rejected is the pixel-wise negative of chosen, so any shared geometry keeps rejected == -chosen.
    chosen = halves(RED, GREEN, (40, 24))
    rejected = Image.eval(chosen, lambda v: 255 - v)
    transform = PairTransform(resolution=RES, random_crop=True, random_flip=True)
    flips, crops = set(), set()
    for seed in range(24):
        out = transform(chosen, rejected, random.Random(seed))
        assert torch.allclose(out["rejected"], -out["chosen"], atol=2 / 127.5)
        flipped = out["chosen"][1, :, 0].mean() > out["chosen"][0, :, 0].mean()  # green on the left
        flips.add(bool(flipped))
        crops.add(out["crop_top_left"])
    assert flips == {True, False}
    assert len(crops) > 1 and all(top == 0 for top, _ in crops)


def test_flip_identical_in_parquet_pairs(tmp_path):
    rows = [
        {
            "caption": f"p{i}",
            "jpg_0": encode(halves(RED, BLUE)),
            "jpg_1": encode(halves(GREEN, YELLOW)),
            "label_0": 1.0,
        }
        for i in range(16)
    ]
    write_parquet(tmp_path / "a.parquet", rows)
    flips = []
    for item in PickAPicPairs(tmp_path, resolution=RES, random_flip=True, seed=1):
        chosen_flipped = item["chosen"][2, :, 0].mean() > 0  # blue now on the left
        rejected_flipped = item["rejected"][0, :, 0].mean() > 0 and item["rejected"][1, :, 0].mean() > 0
        assert chosen_flipped == rejected_flipped
        flips.append(bool(chosen_flipped))
    assert any(flips) and not all(flips)


def test_center_crop_geometry_and_mismatched_pair_sizes():
    transform = PairTransform(resolution=32)
    out = transform(solid(RED, (96, 64)), solid(BLUE, (50, 50)))
    assert out["original_size"] == (64, 96)
    assert out["crop_top_left"] == (0, 8)  # resized to 48x32, centered
    assert out["chosen"].shape == out["rejected"].shape == (3, 32, 32)
    tall = transform.single(solid(RED, (32, 80)))
    assert tall["image"].shape == (3, 32, 32) and tall["crop_top_left"] == (24, 0)
    assert torch.allclose(
        to_tensor(solid((255, 0, 128), (2, 2)))[:, 0, 0],
        torch.tensor([1.0, -1.0, 128 / 127.5 - 1]),
        atol=1e-6,
    )


# -- JSONL / CSV / folder ------------------------------------------------------------------------------


def make_image_files(root):
    images = root / "images"
    images.mkdir()
    solid(RED).save(images / "red.png")
    solid(BLUE).save(images / "blue.jpg")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return images


def test_jsonl_reader_resolves_relative_paths_and_counts_problems(tmp_path):
    images = make_image_files(tmp_path)
    lines = [
        {"prompt": "relative", "chosen_path": "images/red.png", "rejected_path": "images/blue.jpg"},
        {
            "prompt": "absolute",
            "chosen_path": str(images / "red.png"),
            "rejected_path": str(images / "blue.jpg"),
        },
        {"prompt": "missing file", "chosen_path": "images/red.png", "rejected_path": "images/nope.png"},
        {"prompt": "broken", "chosen_path": "images/broken.png", "rejected_path": "images/blue.jpg"},
        {"prompt": "", "chosen_path": "images/red.png", "rejected_path": "images/blue.jpg"},
        {"prompt": "no rejected", "chosen_path": "images/red.png"},
    ]
    text = (
        "\n".join(json.dumps(x) for x in lines[:3])
        + "\n{not json\n\n"
        + "\n".join(json.dumps(x) for x in lines[3:])
    )
    path = tmp_path / "pairs.jsonl"
    path.write_text(text + "\n")
    ds = PairFileDataset(path, resolution=RES)
    items = list(ds)
    assert [it["prompt"] for it in items] == ["relative", "absolute"]
    for item in items:
        assert_red_over_blue(item)
    assert ds.issues.summary() == {
        "empty_caption": 1,
        "malformed_row": 1,
        "missing_file": 1,
        "missing_value": 1,
        "unreadable_image": 1,
    }
    assert any("nope.png" in m and "line 3" in m for m in ds.issues.examples["missing_file"])
    assert any("rejected_path" in m and "line 8" in m for m in ds.issues.examples["missing_value"])
    with pytest.raises(DataError, match=r"line 3.*rejected_path.*nope\.png"):
        list(PairFileDataset(path, resolution=RES, on_error="raise"))
    no_key = tmp_path / "nokey.jsonl"
    no_key.write_text(json.dumps({"prompt": "x", "chosen_path": "images/red.png"}) + "\n")
    with pytest.raises(DataError, match="rejected_path"):
        PairFileDataset(no_key)


def test_csv_reader_and_missing_column(tmp_path):
    make_image_files(tmp_path)
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "chosen_path", "rejected_path"])
        writer.writerow(["one", "images/red.png", "images/blue.jpg"])
        writer.writerow(["two", "images/gone.png", "images/blue.jpg"])
        writer.writerow(["three", "images/red.png", "images/blue.jpg"])
    ds = PairFileDataset(path, resolution=RES)
    items = list(ds)
    assert [it["prompt"] for it in items] == ["one", "three"]
    assert_red_over_blue(items[0])
    assert ds.issues.summary() == {"missing_file": 1}
    assert "gone.png" in ds.issues.examples["missing_file"][0]
    assert len(ds.materialize()) == 2

    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,chosen_path\nx,images/red.png\n")
    with pytest.raises(DataError, match=r"bad\.csv.*rejected_path"):
        PairFileDataset(bad)


def test_image_folder_reader(tmp_path):
    folder = make_image_files(tmp_path)
    solid(GREEN).save(folder / "green.webp")
    (folder / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(folder, "a photo of sks dog", resolution=RES)
    assert len(ds) == 3  # blue.jpg, green.webp, red.png; broken.png reported
    assert ds.issues.summary() == {"unreadable_image": 1}
    assert "broken.png" in ds.issues.examples["unreadable_image"][0]
    item = ds[0]
    assert item["prompt"] == "a photo of sks dog" and item["image"].shape == (3, RES, RES)
    batch = collate_pairs([ds[i] for i in range(len(ds))])
    assert batch["images"].shape == (3, 3, RES, RES) and batch["original_sizes"] == [(20, 24)] * 3

    with pytest.raises(DataError, match="broken.png"):
        ImageFolderDataset(folder, "x", on_error="raise")
    with pytest.raises(DataError, match="at most 2"):
        ImageFolderDataset(folder, "x", max_images=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="at least 1"):
        ImageFolderDataset(empty, "x")
    with pytest.raises(ValueError):
        ImageFolderDataset(folder, "  ")


# -- accounting and collation ----------------------------------------------------------------------------


def test_data_issues_merge_summary_report():
    a, b = DataIssues(max_examples=2), DataIssues(max_examples=2)
    for i in range(3):
        a.add("unreadable_image", f"f.parquet, row {i}: bad")
    a.add("ties_dropped", "f.parquet, row 9: tie")
    b.add("empty_caption", "g.parquet, row 0: empty")
    b.add("unreadable_image", "g.parquet, row 1: bad")
    a.rows_seen, b.rows_seen = 10, 5
    merged = a.merge(b)
    assert merged is a
    assert a.summary() == {"empty_caption": 1, "ties_dropped": 1, "unreadable_image": 4}
    assert a.total == 6 and a.errors == 5 and a.rows_seen == 15
    assert len(a.examples["unreadable_image"]) == 2
    report = a.report()
    assert "unreadable_image: 4" in report and "... and 2 more" in report and "row 0" in report


def test_collate_pairs_shapes_and_lists():
    items = [
        {
            "prompt": f"p{i}",
            "chosen": torch.zeros(3, 4, 4),
            "rejected": torch.ones(3, 4, 4),
            "original_size": (10, 12),
            "crop_top_left": [0, 1],
        }
        for i in range(2)
    ]
    batch = collate_pairs(items)
    assert batch["prompts"] == ["p0", "p1"]
    assert batch["chosen"].shape == batch["rejected"].shape == (2, 3, 4, 4)
    assert batch["original_sizes"] == [(10, 12)] * 2 and batch["crop_top_lefts"] == [(0, 1)] * 2
    with pytest.raises(ValueError, match="keys"):
        collate_pairs([items[0], {"prompt": "x", "chosen": torch.zeros(3, 4, 4)}])
    with pytest.raises(ValueError):
        collate_pairs([])


# -- latent cache -----------------------------------------------------------------------------------------


def tiny_vae(**overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    config = dict(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    config.update(overrides)
    return AutoencoderKL(**config).eval()


def test_latent_cache_round_trip(tmp_path):
    rows = [good_row(f"p{i}", red_first=i % 2 == 0) for i in range(5)]
    rows.insert(2, {**good_row("tie"), "label_0": 0.5})
    write_parquet(tmp_path / "a.parquet", rows)
    pairs = PickAPicPairs(tmp_path / "a.parquet", resolution=RES).materialize()
    vae = tiny_vae()
    index = precompute_latents(pairs, vae, tmp_path / "cache", batch_size=2, shard_size=3, progress=False)
    assert index["count"] == 5 and [s["count"] for s in index["shards"]] == [3, 2]
    assert index["latent_shape"] == [4, RES // 2, RES // 2]

    cached = LatentPairDataset(tmp_path / "cache", vae=vae, resolution=RES)
    assert len(cached) == 5
    direct = collate_pairs([pairs[i] for i in range(5)])
    want_w, want_l = encode_latents(vae, direct["chosen"]), encode_latents(vae, direct["rejected"])
    with torch.no_grad():
        mean = vae.encode(direct["chosen"]).latent_dist.mean
    assert torch.allclose(want_w, mean * vae.config.scaling_factor)
    for i in range(5):
        item = cached[i]
        assert item["prompt"] == f"p{i}"
        assert item["original_size"] == (20, 24) and len(item["crop_top_left"]) == 2
        assert torch.allclose(item["chosen_latents"], want_w[i], atol=1e-5)
        assert torch.allclose(item["rejected_latents"], want_l[i], atol=1e-5)
    batch = next(
        iter(DataLoader(cached, batch_size=4, shuffle=False, num_workers=0, collate_fn=collate_pairs))
    )
    assert batch["chosen_latents"].shape == (4, 4, RES // 2, RES // 2) and len(batch["original_sizes"]) == 4
    with pytest.raises(IndexError):
        cached[5]


def test_latent_cache_refuses_stale_fingerprint(tmp_path):
    write_parquet(tmp_path / "a.parquet", numbered_rows(3))
    stream = PickAPicPairs(tmp_path / "a.parquet", resolution=RES)
    pairs = stream.materialize()
    vae = tiny_vae()
    out = tmp_path / "cache"
    first = precompute_latents(stream, vae, out, batch_size=2, progress=False)  # iterable input works too
    assert first["count"] == 3 and first["prompts"] == ["p0", "p1", "p2"]

    other = tiny_vae(scaling_factor=0.13025)
    with pytest.raises(StaleCacheError, match="scaling_factor"):
        LatentPairDataset(out, vae=other)
    with pytest.raises(StaleCacheError, match="image_size"):
        LatentPairDataset(out, resolution=2 * RES)
    with pytest.raises(StaleCacheError, match="scaling_factor"):
        precompute_latents(pairs, other, out, progress=False)
    # Same VAE and resolution: reused as is; overwrite rebuilds for the new VAE.
    assert precompute_latents(pairs, vae, out, progress=False)["fingerprint"] == first["fingerprint"]
    rebuilt = precompute_latents(pairs, other, out, overwrite=True, progress=False)
    assert rebuilt["fingerprint"] != first["fingerprint"]
    assert len(LatentPairDataset(out, vae=other, resolution=RES)) == 3
    (out / "index.json").unlink()
    with pytest.raises(StaleCacheError, match="index.json"):
        LatentPairDataset(out)


def test_encode_latents_applies_shift_factor():
    vae = tiny_vae(shift_factor=0.25, scaling_factor=1.5)
    images = torch.rand(2, 3, RES, RES) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
    assert torch.allclose(encode_latents(vae, images), (mean - 0.25) * 1.5)


# -- the configured dataset in a training run ---------------------------------------------------------


def test_offline_training_on_messy_parquet_reports_dropped_rows(tmp_path):
    """data.kind=pickapic end to end: the bad rows are skipped as training reads them, counted, and land
    in the MLflow record; the last data.heldout_pairs rows are held out; opening reads no row."""
    import mlflow
    from diffalign.config import load_config
    from diffalign.data.factory import open_pair_dataset
    from diffalign.train.driver import run

    path = tmp_path / "pairs.parquet"
    write_parquet(path, messy_rows() + numbered_rows(5), row_group_size=4)
    out = tmp_path / "run"
    cfg = load_config(None, [
        "data.kind=pickapic", f"data.path={path}", "data.heldout_pairs=2", f"train.output_dir={out}",
        "train.max_steps=6", "train.progress=false", "train.eval_every=6", "optim.batch_size=2",
        "objective.name=dpo", "objective.beta=500", "model.finetune=lora", "guard.enabled=false",
        "tracking.experiment=messy"])
    train, held = open_pair_dataset(cfg)
    assert (len(train), len(held)) == (11, 2)  # 13 source rows, the last 2 held out
    assert train.issues.rows_seen == 0  # nothing is read or decoded at open
    assert [held[i]["prompt"] for i in range(2)] == ["p3", "p4"]
    assert_red_over_blue(train[0])

    summary = run(cfg)  # 6 steps x 2 pairs: every training row is read once
    assert summary["final_step"] == 6 and 0 <= summary["heldout/implicit_acc"] <= 1
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["messy"], output_format="list")[0]
    metrics = run.data.metrics
    assert metrics["data.rows_seen"] == 11 and metrics["data.pairs"] == 6
    for kind, n in EXPECTED_ISSUES.items():
        assert metrics[f"data.dropped.{kind}"] == n, kind


def test_offline_folder_data_is_refused_with_the_way_out(tmp_path):
    from diffalign.config import load_config
    from diffalign.data.factory import open_pair_dataset

    (tmp_path / "imgs").mkdir()
    solid(RED).save(tmp_path / "imgs" / "a.png")
    cfg = load_config(None, ["data.kind=folder", f"data.path={tmp_path / 'imgs'}", "data.prompt=sks",
                             "objective.name=mapo", "reference.strategy=none"])
    with pytest.raises(ValueError, match="online.enabled=true"):
        open_pair_dataset(cfg)


# -- reading ahead and per-epoch augmentation -------------------------------------------------------


def textured_rows(n: int) -> list[dict]:
    """Pairs of 48x40 images with structure everywhere, so every crop and flip gives other pixels."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        a, b = ((torch.rand(40, 48, 3, generator=gen) * 255).to(torch.uint8).numpy() for _ in range(2))
        rows.append({"caption": f"p{i}", "jpg_0": encode(Image.fromarray(a)),
                     "jpg_1": encode(Image.fromarray(b)), "label_0": 1.0})
    return rows


def test_read_ahead_returns_what_a_plain_read_does_and_reads_in_threads():
    import threading

    from diffalign.train.data_order import BatchOrder
    from diffalign.train.read_ahead import ReadAhead

    order = BatchOrder(7, 3, seed=1)
    threads = set()

    def read(positions):
        threads.add(threading.current_thread().name)
        return list(positions)

    ahead = ReadAhead(order.positions, read, workers=2)
    plain = ReadAhead(order.positions, read, workers=0)
    steps = [0, 1, 2, 3, 1, 2, 9, 10]  # 1 after 3: a restore; 9: a jump ahead
    assert [ahead.get(k) for k in steps] == [plain.get(k) for k in steps]
    assert any(name.startswith("diffalign-read") for name in threads)
    assert ahead.get(4)[0][0] == 1  # micro-batch 4 holds items 12.. = epoch 1 of 7 items
    ahead.close()
    with pytest.raises(ValueError, match="num_workers"):
        ReadAhead(order.positions, read, workers=-1)


def test_random_crops_change_per_epoch_and_reader_threads_train_identically(tmp_path):
    from diffalign.config import ConfigError, load_config
    from diffalign.data.factory import open_pair_dataset
    from diffalign.train.driver import build_trainer
    from diffalign.train.read_ahead import read_items

    path = tmp_path / "pairs.parquet"
    write_parquet(path, textured_rows(6))
    base = ["data.kind=pickapic", f"data.path={path}", "data.heldout_pairs=0", "data.center_crop=false",
            "data.cache_latents=false", "train.max_steps=4", "train.progress=false", "train.eval_every=0",
            "optim.batch_size=4", "objective.name=mapo", "reference.strategy=none", "model.finetune=full",
            "guard.enabled=false", "tracking.mlflow=false"]
    cfg = load_config(None, base + [f"train.output_dir={tmp_path}/a"])
    train, _ = open_pair_dataset(cfg)
    first, second = read_items(train, [(0, 0), (1, 0)])
    assert first["prompt"] == second["prompt"]
    assert not torch.equal(first["chosen"], second["chosen"])  # epoch 1 crops / flips anew
    assert torch.equal(read_items(train, [(1, 0)])[0]["chosen"], second["chosen"])  # and reproducibly

    runs = {}
    for workers in (0, 2):
        out = f"train.output_dir={tmp_path}/w{workers}"
        c = load_config(None, [*base, out, f"data.num_workers={workers}"])
        trainer = build_trainer(c)
        losses = [trainer.train_step()["loss"] for _ in range(4)]  # 16 items over 6: epochs 0-2
        trainer.reader.close()
        runs[workers] = (losses, trainer.trainable_weights())
    assert runs[0][0] == runs[2][0]
    assert all(torch.equal(runs[0][1][k], runs[2][1][k]) for k in runs[0][1])

    with pytest.raises(ConfigError, match="data.num_workers"):
        load_config(None, base + ["data.num_workers=-1"])
