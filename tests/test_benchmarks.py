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


def test_weight_sync_gpu_script_runs_its_cpu_path(tmp_path):
    """`gpu_weight_sync.sh` on its CPU path at tiny size: every payload x transport row (object store,
    gloo broadcast, Ray Direct Transport over gloo) delivered every version and the whole weights, the
    bf16 payloads are exactly half the fp32 bytes, and the share of the measured tiny step adds up."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "platform"), OMP_NUM_THREADS="1", OUT=str(tmp_path / "out"),
               WS_DEVICE="cpu", WS_BUDGET_S="240", PYTHON=sys.executable)
    script = str(REPO / "benchmarks" / "gpu_weight_sync.sh")
    bad = subprocess.run(["bash", script], cwd=REPO, env=dict(env, WS_DEVICE="tpu"), capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "WS_DEVICE" in bad.stderr  # refused before anything starts
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "weight_sync.py"),
                          "--payloads", "full_fp16"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0 and "--payloads" in bad.stderr + bad.stdout

    payloads = ["full_fp32", "full_bf16", "lora4_bf16"]
    proc = subprocess.run(["bash", script, "--size", "tiny", "--receivers", "2", "--rounds", "2",
                           "--warmup", "0", "--payloads", ",".join(payloads),
                           "--transports", "object_store,broadcast,rdt"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "weight_sync-cpu.json").read_text())
    assert (tmp_path / "out" / "weight_sync-cpu.md").exists() and not res["partial"]
    assert res["ready"] == ["object_store", "broadcast", "rdt"] and res["skipped_transports"] == {}
    rows = {(r["payload"], r["transport"]): r for r in res["rows"]}
    assert set(rows) == {(p, t) for p in payloads for t in ("object_store", "broadcast", "rdt")}
    step = res["step"]["tiny"]
    assert step["s"] > 0 and "configs/tiny/mapo.yaml" in step["source"]
    for r in rows.values():
        assert "error" not in r and "skipped" not in r, r
        assert r["rounds"] == 2 and r["receivers"] == 2
        assert 0 < r["min_ms"] <= r["median_ms"]
        assert 0 < r["learner_blocked_median_ms"] <= r["median_ms"] * 1.001
        assert r["verified_every_round"] and r["final_weights_equal"] is True
        assert r["learner_peak_rss_mib"] > 100  # a process with torch loaded
        sync_s = r["median_ms"] / 1000
        assert r["share_of_step"] == pytest.approx(sync_s / (step["s"] + sync_s))
        assert 0 < r["share_of_step"] < 1
    fp32, bf16 = rows[("full_fp32", "object_store")], rows[("full_bf16", "object_store")]
    assert fp32["params"] == bf16["params"] and fp32["bytes"] == 2 * bf16["bytes"] == 4 * fp32["params"]
    lora = rows[("lora4_bf16", "broadcast")]
    assert lora["bytes"] == 2 * lora["params"] and 0 < lora["params"] < fp32["params"] / 10
    assert lora["tensors"] % 2 == 0  # lora_A + lora_B per target Linear
    assert {(x["payload"], x["transport"]) for x in res["ratios"]} == {
        (p, t) for p in payloads for t in ("broadcast", "rdt")}
