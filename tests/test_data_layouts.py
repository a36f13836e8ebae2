"""The dataset layouts users have (a Hub snapshot, globs, save_to_disk folders, HF Image columns) and
reading them from storage URIs (file://, a real S3 server), as PickAPicPairs / PairFileDataset see them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from diffalign.config import ConfigError
from diffalign.data import DataError, PairFileDataset, PickAPicPairs, uri
from PIL import Image

RES = 8
RED, BLUE = (220, 20, 20), (20, 20, 220)


def jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


def rows(*prompts: str) -> list[dict]:
    return [{"caption": p, "jpg_0": jpeg(RED), "jpg_1": jpeg(BLUE), "label_0": 1.0} for p in prompts]


def parquet_bytes(records: list[dict], row_group_size: int | None = None) -> bytes:
    types = {"caption": pa.string(), "jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64()}
    table = pa.table({k: pa.array([r[k] for r in records], type=t) for k, t in types.items()})
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=row_group_size)
    return sink.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# The Hub snapshot layout of yuvalkirstain/pickapic_v2, in miniature.
SNAPSHOT = {
    "data/train-00000-of-00002.parquet": ("t0", "t1"),
    "data/train-00001-of-00002.parquet": ("t2", "t3"),
    "data/validation-00000-of-00001.parquet": ("v0",),
    "data/validation_unique-00000-of-00001.parquet": ("u0",),
    "data/test-00000-of-00001.parquet": ("s0",),
}
TRAIN = ["t0", "t1", "t2", "t3"]


def make_snapshot(root: Path) -> Path:
    for rel, prompts in SNAPSHOT.items():
        write(root / rel, parquet_bytes(rows(*prompts)))
    write(root / "README.md", b"---\nconfigs: []\n---\n")
    # A partial download in the snapshot's hidden cache: read, it would fail (it is no parquet).
    write(root / ".cache/huggingface/download/data/train-00000-of-00002.parquet", b"partial")
    return root


def prompts(ds) -> list[str]:
    return [item["prompt"] for item in ds]


# -- a Hub snapshot and split selection -----------------------------------------------------------------


def test_hub_snapshot_reads_the_requested_split(tmp_path):
    root = make_snapshot(tmp_path / "pickapic_v2")
    assert prompts(PickAPicPairs(root, resolution=RES)) == TRAIN  # split="train" by default
    assert prompts(PickAPicPairs(root / "data", resolution=RES)) == TRAIN
    assert prompts(PickAPicPairs(str(root), split="validation", resolution=RES)) == ["v0"]
    assert prompts(PickAPicPairs(root, split="validation_unique", resolution=RES)) == ["u0"]
    assert prompts(PickAPicPairs(root, split="test", resolution=RES)) == ["s0"]
    with pytest.raises(FileNotFoundError, match=r"pickapic_v2.*'dev'.*\['test', 'train', 'validation'"):
        PickAPicPairs(root, split="dev")
    with pytest.raises(ValueError, match=r"several splits \['test', 'train', 'validation', 'validation_un"):
        PickAPicPairs(root, split=None)


def test_split_folders_and_plain_folders(tmp_path):
    write(tmp_path / "by_folder/train/0000.parquet", parquet_bytes(rows("a", "b")))
    write(tmp_path / "by_folder/test/0000.parquet", parquet_bytes(rows("c")))
    assert prompts(PickAPicPairs(tmp_path / "by_folder", resolution=RES)) == ["a", "b"]
    assert prompts(PickAPicPairs(tmp_path / "by_folder", split="test", resolution=RES)) == ["c"]
    # No file names a split: every file is read, nested ones too, in sorted path order.
    write(tmp_path / "plain/b.parquet", parquet_bytes(rows("b")))
    write(tmp_path / "plain/a.parquet", parquet_bytes(rows("a")))
    write(tmp_path / "plain/more/c.parquet", parquet_bytes(rows("c")))
    assert prompts(PickAPicPairs(tmp_path / "plain", resolution=RES)) == ["a", "b", "c"]
    assert prompts(PickAPicPairs(tmp_path / "plain", split=None, resolution=RES)) == ["a", "b", "c"]
    # One split only: split=None takes it.
    write(tmp_path / "one/train-00000-of-00001.parquet", parquet_bytes(rows("x")))
    assert prompts(PickAPicPairs(tmp_path / "one", split=None, resolution=RES)) == ["x"]


def test_globs_select_files_in_sorted_order(tmp_path, monkeypatch):
    root = make_snapshot(tmp_path / "snap")
    assert prompts(PickAPicPairs(str(root / "data/train-*.parquet"), resolution=RES)) == TRAIN
    # `**` spans folders (not the hidden cache); several splits matched: `split` chooses.
    assert prompts(PickAPicPairs(str(root / "**/*.parquet"), resolution=RES)) == TRAIN
    assert prompts(PickAPicPairs(str(root / "**/*.parquet"), split="test", resolution=RES)) == ["s0"]
    # A glob naming one split's files reads them whatever `split` is.
    assert prompts(PickAPicPairs(str(root / "data/validation-*.parquet"), resolution=RES)) == ["v0"]
    monkeypatch.chdir(tmp_path)  # a relative pattern gives relative paths, as glob.glob did
    ds = PickAPicPairs("snap/data/train-0000[01]-of-*.parquet", resolution=RES)
    assert [str(f) for f in ds.files] == [f"snap/data/train-0000{i}-of-00002.parquet" for i in range(2)]
    with pytest.raises(FileNotFoundError, match="no parquet file matches"):
        PickAPicPairs(str(root / "data/nothing-*.parquet"))


def test_uri_glob_semantics(tmp_path):
    for rel in ("a.parquet", "d/b.parquet", "d/e/c.parquet", ".hidden/x.parquet", "mydata/y.parquet"):
        write(tmp_path / rel, b"")
    base = str(tmp_path)
    rel = lambda hits: [h[len(base) + 1 :] for h in hits]  # noqa: E731
    assert rel(uri.glob(f"{base}/*.parquet")) == ["a.parquet"]
    assert rel(uri.glob(f"{base}/**/*.parquet")) == ["a.parquet", "d/b.parquet", "d/e/c.parquet",
                                                     "mydata/y.parquet"]
    assert rel(uri.glob(f"{base}/*/*.parquet")) == ["d/b.parquet", "mydata/y.parquet"]
    assert rel(uri.glob(f"{base}/**/d/*.parquet")) == ["d/b.parquet"]
    assert uri.glob(f"{base}/a.parquet") == [f"{base}/a.parquet"] and uri.glob(f"{base}/zz.parquet") == []
    # file:// results keep the scheme.
    assert uri.glob(f"file://{base}/d/**/*.parquet") == [f"file://{base}/d/b.parquet",
                                                          f"file://{base}/d/e/c.parquet"]
    assert not uri.has_glob("s3://b/x.parquet?endpoint_override=http://h:1")


# -- datasets save_to_disk folders and HF Image columns ---------------------------------------------


def _hf_dataset(datasets, prompts_: list[str], image_feature: bool = False):
    features = datasets.Features({
        "caption": datasets.Value("string"),
        "jpg_0": datasets.Image() if image_feature else datasets.Value("binary"),
        "jpg_1": datasets.Image() if image_feature else datasets.Value("binary"),
        "label_0": datasets.Value("float64"),
    })
    records = rows(*prompts_)
    columns = {k: [r[k] for r in records] for k in records[0]}
    if image_feature:
        for k in ("jpg_0", "jpg_1"):
            columns[k] = [{"bytes": b, "path": None} for b in columns[k]]
    return datasets.Dataset.from_dict(columns, features=features)


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets", reason="`datasets` (the [ray] extra) is not installed")
    _hf_dataset(datasets, ["a", "b", "c"]).save_to_disk(str(tmp_path / "single"))
    single = PickAPicPairs(tmp_path / "single", resolution=RES)
    assert single.format == "hf" and prompts(single) == ["a", "b", "c"]
    assert prompts(PickAPicPairs(str(tmp_path / "single"), split=None, resolution=RES)) == ["a", "b", "c"]

    splits = {"train": _hf_dataset(datasets, ["a", "b"]), "test": _hf_dataset(datasets, ["c"])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dict"))
    assert prompts(PickAPicPairs(tmp_path / "dict", resolution=RES)) == ["a", "b"]
    assert prompts(PickAPicPairs(tmp_path / "dict", split="test", resolution=RES)) == ["c"]
    with pytest.raises(ValueError, match=r"several splits \['train', 'test'\]"):
        PickAPicPairs(tmp_path / "dict", split=None)
    with pytest.raises(ValueError, match=r"split 'validation' not found"):
        PickAPicPairs(tmp_path / "dict", split="validation")


def test_image_feature_columns_decode(tmp_path):
    datasets = pytest.importorskip("datasets", reason="`datasets` (the [ray] extra) is not installed")
    ds = _hf_dataset(datasets, ["a", "b"], image_feature=True)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "parquet" / "train-00000-of-00001.parquet"))
    # The arrow view gives the cells as {"bytes", "path"} structs, which decode_image takes.
    saved = PickAPicPairs(tmp_path / "saved", resolution=RES)
    cell = next(saved._iter_raw(0, 1)).first
    assert isinstance(cell, dict) and set(cell) == {"bytes", "path"} and cell["bytes"][:2] == b"\xff\xd8"
    from_parquet = PickAPicPairs(tmp_path / "parquet", resolution=RES)
    assert pq.read_schema(from_parquet.files[0]).field("jpg_0").type == pa.struct(
        [("bytes", pa.binary()), ("path", pa.string())])
    for reader in (saved, from_parquet):
        items = list(reader)
        assert [it["prompt"] for it in items] == ["a", "b"] and reader.issues.total == 0
        assert items[0]["chosen"].shape == (3, RES, RES)
        assert items[0]["chosen"][0].mean() > 0.5  # the red image is the chosen one (label_0 = 1)
        assert len(reader.materialize()) == 2


# -- unreadable files, read blocks ----------------------------------------------------------------------


def test_truncated_parquet_names_the_file(tmp_path):
    good = parquet_bytes(rows("a", "b"))
    bad = write(tmp_path / "d" / "b.parquet", good[: len(good) // 2])
    write(tmp_path / "d" / "a.parquet", good)
    with pytest.raises(DataError, match="unreadable parquet file") as exc:
        PickAPicPairs(tmp_path / "d", on_error="raise")
    assert str(bad) in str(exc.value) and "magic bytes" in str(exc.value).lower()
    assert exc.value.source == str(bad)
    # With on_error=skip (the default) one bad shard of several is left out, named and counted.
    skipped = PickAPicPairs(tmp_path / "d")
    assert skipped._source_rows() == 2 and skipped.issues.count("unreadable_file") == 1
    assert str(bad) in skipped.issues.report()
    with pytest.raises(DataError, match="unreadable parquet file"):  # the only file: nothing to train on
        PickAPicPairs(bad)


def test_read_blocks(tmp_path):
    write(tmp_path / "a.parquet", parquet_bytes(rows(*"abcdefg"), row_group_size=3))  # groups 3, 3, 1
    write(tmp_path / "b.parquet", parquet_bytes(rows(*"hijklmnopqrst"), row_group_size=10))  # 10, 3
    ds = PickAPicPairs(tmp_path, batch_rows=1)  # pieces of at most 16 rows
    assert ds.read_blocks() == [3, 3, 1, 10, 3] and sum(ds.read_blocks()) == ds._source_rows() == 20
    big = PickAPicPairs(tmp_path / "b.parquet", batch_rows=0)  # batch_rows >= 1: pieces of 16
    write(tmp_path / "big" / "c.parquet", parquet_bytes(rows(*[f"p{i}" for i in range(40)]), 40))
    assert PickAPicPairs(tmp_path / "big", batch_rows=1).read_blocks() == [16, 16, 8]
    assert big.read_blocks() == [10, 3]

    listing = tmp_path / "pairs.jsonl"
    listing.write_text("".join(
        json.dumps({"prompt": f"p{i}", "chosen_path": "a.jpg", "rejected_path": "b.jpg"}) + "\n"
        for i in range(2100)))
    pairs = PairFileDataset(listing)
    assert pairs.read_blocks() == [1024, 1024, 52] and sum(pairs.read_blocks()) == pairs._source_rows()

    datasets = pytest.importorskip("datasets", reason="`datasets` (the [ray] extra) is not installed")
    _hf_dataset(datasets, [f"p{i}" for i in range(37)]).save_to_disk(str(tmp_path / "hf"))
    assert PickAPicPairs(tmp_path / "hf", batch_rows=2).read_blocks() == [32, 5]


# -- config ---------------------------------------------------------------------------------------------


def test_config_accepts_a_matching_glob(tiny_cfg, tmp_path):
    make_snapshot(tmp_path / "snap")
    pattern = f"{tmp_path}/snap/data/train-*.parquet"
    cfg = tiny_cfg("data.kind=pickapic", f"data.path={pattern}", "data.split=validation")
    assert cfg.data.path == pattern and cfg.data.split == "validation"
    unchecked = tiny_cfg("data.kind=pickapic", "data.path=s3://bucket/never/checked/*.parquet")
    assert unchecked.data.split == "train"  # URIs are checked when they are opened
    with pytest.raises(ConfigError, match=r"data.path matches no file: .*nothing-\*\.parquet"):
        tiny_cfg("data.kind=pickapic", f"data.path={tmp_path}/snap/data/nothing-*.parquet")


# -- storage URIs ---------------------------------------------------------------------------------------


def test_file_uri_folder_and_glob(tmp_path):
    root = make_snapshot(tmp_path / "snap")
    ds = PickAPicPairs(f"file://{root}", resolution=RES)
    assert prompts(ds) == TRAIN and all(str(f).startswith("file://") for f in ds.files)
    assert prompts(PickAPicPairs(f"file://{root}/data/validation-*.parquet", resolution=RES)) == ["v0"]


def _put(bucket: str, key: str, data: bytes) -> str:
    target = f"{bucket}/{key}"
    uri.write_bytes_atomic(target, data)
    return target


def test_s3_parquet_folder_and_globs(s3_server):
    bucket = s3_server.make_bucket("layouts")
    for rel, prompts_ in SNAPSHOT.items():
        _put(bucket, f"pickapic/{rel}", parquet_bytes(rows(*prompts_)))
    _put(bucket, "pickapic/README.md", b"readme")

    folder = PickAPicPairs(f"{bucket}/pickapic/", resolution=RES)
    assert folder.files == [f"{bucket}/pickapic/data/train-0000{i}-of-00002.parquet" for i in range(2)]
    assert prompts(folder) == TRAIN and folder.read_blocks() == [2, 2]
    assert prompts(PickAPicPairs(f"{bucket}/pickapic", split="test", resolution=RES)) == ["s0"]
    assert prompts(PickAPicPairs(f"{bucket}/pickapic/**/train-*.parquet", resolution=RES)) == TRAIN
    materialized = PickAPicPairs(f"{bucket}/pickapic/data/validation-00000-of-00001.parquet").materialize()
    assert [r.prompt for r in materialized.records] == ["v0"]
    with pytest.raises(FileNotFoundError, match="no parquet file matches"):
        PickAPicPairs(f"{bucket}/pickapic/data/nothing-*.parquet")
    # The endpoint in the URI's query instead of AWS_ENDPOINT_URL: every file listed keeps the query.
    query = f"?endpoint_override={s3_server.endpoint.split('://')[1]}&scheme=http"
    with_query = PickAPicPairs(f"{bucket}/pickapic{query}", split="test", resolution=RES)
    assert with_query.files == [f"{bucket}/pickapic/data/test-00000-of-00001.parquet{query}"]
    assert prompts(with_query) == ["s0"]


def test_s3_pair_listing_with_relative_image_paths(s3_server):
    bucket = s3_server.make_bucket("listings")
    _put(bucket, "pairs/img/red.jpg", jpeg(RED))
    _put(bucket, "pairs/img/blue.jpg", jpeg(BLUE))
    lines = [
        {"prompt": "relative", "chosen_path": "img/red.jpg", "rejected_path": "img/blue.jpg"},
        {"prompt": "absolute uri", "chosen_path": f"{bucket}/pairs/img/red.jpg",
         "rejected_path": f"{bucket}/pairs/img/blue.jpg"},
        {"prompt": "gone", "chosen_path": "img/red.jpg", "rejected_path": "img/missing.jpg"},
    ]
    listing = _put(bucket, "pairs/pairs.jsonl", "".join(json.dumps(r) + "\n" for r in lines).encode())
    pairs = PairFileDataset(listing, resolution=RES)
    items = list(pairs)
    assert [it["prompt"] for it in items] == ["relative", "absolute uri"]
    assert items[0]["chosen"][0].mean() > 0.5
    assert pairs.issues.summary() == {"missing_file": 1}
    assert f"{bucket}/pairs/img/missing.jpg" in pairs.issues.examples["missing_file"][0]
    with pytest.raises(FileNotFoundError, match="pair listing not found"):
        PairFileDataset(f"{bucket}/pairs/nope.jsonl")
