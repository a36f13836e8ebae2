"""The benchmark scripts run end to end on the CPU with the tiny model.

They are measurements, not tests: nothing here checks a timing. What is checked is that each script
(the GPU ones included, through their CPU path) still runs against the current library and writes
its result files with a row per variant, so the GPU run in `benchmarks/gpu_run.sh` is ready when a
GPU is at hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(script: str, *args: str, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO / "platform"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "benchmarks" / script), *args, "--out-dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.glob("*.json"))
    assert len(files) == 1 and files[0].with_suffix(".md").exists(), files
    return json.loads(files[0].read_text())


def test_step_time_rows_and_ratios(tmp_path):
    res = _run("step_time.py", "--model", "tiny", "--device", "cpu", "--batch", "2", "--steps", "2",
               "--warmup", "1", "--variants", "mapo,dpo,baseline", "--no-memory", out=tmp_path)
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"mapo", "dpo", "baseline"}
    assert all(r["median_ms"] > 0 for r in rows.values())
    assert rows["dpo"]["optimizer"] == "AdamW fused" and rows["baseline"]["optimizer"] == "AdamW default"


def test_data_pipeline_reads_a_pickapic_parquet_and_counts_the_flop_bound(tmp_path):
    res = _run("data_pipeline.py", "--sources", "pickapic", "--source-px", "64", "--steps", "1",
               "--warmup", "0", out=tmp_path)
    assert {(r["source"], r["variant"]) for r in res["rows"]} == {
        ("pickapic", v) for v in ("cached", "latents_only", "naive", "naive_readers")}
    bound = {b["model"]: b for b in res["flop_bound"]}
    sd15 = bound["sd15"]
    r = sd15["vae_encode_gflop"] / sd15["unet_forward_gflop"]
    assert sd15["dpo_bound"] == pytest.approx((4 + r) / 4) and 1.0 < sd15["dpo_bound"] < 2.0
    assert res["stages"]["pickapic"]["vae_encode_ms"] > 0


def test_gpu_scripts_run_their_cpu_path(tmp_path):
    mfu = _run("mfu.py", "--model", "tiny", "--device", "cpu", "--dtype", "fp32", "--batch", "2",
               "--steps", "1", "--warmup", "1", "--variants", "eager,fused_adam", "--no-profile",
               "--matmul-size", "256", out=tmp_path / "mfu")
    assert [r["variant"] for r in mfu["rows"]] == ["eager", "fused_adam"] and mfu["flops"]["total"] > 0
    mb = _run("max_batch.py", "--models", "tiny", "--device", "cpu", "--dtype", "fp32", "--max-batch", "4",
              out=tmp_path / "max_batch")
    assert {(r["objective"], r["max_batch"]) for r in mb["rows"]} == {("mapo", 4), ("dpo", 4)}


def test_data_scale_writes_a_row_per_source_and_learner_count(tmp_path):
    """Two tiny sizes, two steps, no prepare: a list of rows with the keys the report reads, for the
    raw parquet, the store and the in-memory path, and two learners at the largest size."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "benchmarks" / "data_scale.py"), "--pairs", "200,400", "--steps", "2",
           "--image-px", "16", "--skip-prepare", "--rounds", "1", "--interleaved-steps", "2",
           "--out-dir", str(out), "--work-dir", str(tmp_path / "work")]
    env = dict(os.environ, PYTHONPATH=str(REPO / "platform"), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "data_scale-cpu.json").read_text())
    assert isinstance(rows, list) and (out / "data_scale-cpu.md").exists()
    keys = {"source", "pairs", "bytes_per_pair", "learners", "peak_rss_mib", "first_step_s", "steps_per_s"}
    for r in rows:
        assert keys <= set(r), r
        assert "error" not in r, r["error"]
    got = {(r["source"], r["pairs"], r["learners"]) for r in rows}
    assert got == {("raw_parquet", 200, 1), ("store", 200, 1), ("in_memory", 200, 1), ("raw_parquet", 400, 1),
                   ("store", 400, 1), ("store", 400, 2), ("raw_parquet", 400, 2)}
    for r in rows:
        assert min(r["peak_rss_mib"], r["first_step_s"], r["steps_per_s"], r["bytes_per_pair"]) > 0
        assert len(r["rows_read_per_rank"]) == r["learners"]
    mem = next(r for r in rows if r["source"] == "in_memory")
    assert mem["interleaved_median_step_ms"] > 0  # the one-process round-robin comparison ran
    two = next(r for r in rows if r["source"] == "store" and r["learners"] == 2)
    assert two["rows_trained_shared_by_ranks"] == 0  # each rank trains on its own rows
    assert "Ratios against the targets" in (out / "data_scale-cpu.md").read_text()
    assert not list((tmp_path / "work").glob("*.parquet"))  # the data is removed without --keep
