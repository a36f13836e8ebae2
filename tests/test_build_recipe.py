"""recipes/build_pairs.py on Ray sampler actors, base-weight sampling, the mismatch probe before training."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from diffalign.config import ConfigError, load_config
from diffalign.curate.pairs import encode_jpeg, pair_seeds
from diffalign.data import PickAPicPairs
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BUILD_CONFIG = ROOT / "configs/tiny/build_pairs.yaml"


def _pixels(image_or_jpeg) -> np.ndarray:
    image = Image.open(io.BytesIO(image_or_jpeg)) if isinstance(image_or_jpeg, bytes) else image_or_jpeg
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def test_sampler_worker_samples_base_weights_without_a_learner(tmp_path):
    pytest.importorskip("ray")
    import torch
    from diffalign.actors.sampler_worker import SamplerWorker, StaleSamplerError
    from diffalign.actors.weight_sync import make_packet
    from diffalign.models.tiny.diffusion import build_tiny_bundle

    cfg = load_config(BUILD_CONFIG, ["model.finetune=lora", f"train.output_dir={tmp_path}"])
    worker = SamplerWorker(cfg)
    assert worker.version() == -1
    assert worker.use_base_weights(version=0) == 0
    got = worker.generate(["a red car"], [5], steps=2, output="pil")
    # Freshly added LoRA adapters are a no-op: the same image as the plain base pipeline.
    base = build_tiny_bundle("sd15", seed=cfg.model.tiny_seed, resolution=cfg.model.resolution).pipeline()
    want = base(["a red car"], num_inference_steps=2, guidance_scale=cfg.ray.sampler.guidance_scale,
                generator=[torch.Generator().manual_seed(5)], height=32, width=32, output_type="pil").images
    assert got["seeds"] == [5] and got["versions"] == [0]
    assert np.array_equal(_pixels(got["images"][0]), _pixels(want[0]))

    lora_b = next(p for n, p in worker.bundle.unet.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora_b.add_(0.1)
    with pytest.raises(RuntimeError, match="not a no-op"):
        worker.use_base_weights()
    worker.sync(make_packet(worker.modules, version=3))
    with pytest.raises(StaleSamplerError, match="not the base model"):
        worker.use_base_weights()


@pytest.mark.slow
def test_pool_samples_base_weights_across_an_actor_restart(ray_local, tmp_path):
    from diffalign.actors.sampler import SamplerPool

    ray = ray_local
    cfg = load_config(BUILD_CONFIG, [f"train.output_dir={tmp_path}", "ray.sampler.inference_steps=2"])
    pool = SamplerPool(cfg, output="pil")
    try:
        pool.use_base_weights(version=0)
        prompts, seeds = ["a red car", "a dog", "a city at night"], [3, 4, 5]
        before = pool.request(prompts, seeds, max_per_request=2)
        assert before["seeds"] == seeds and before["versions"] == [0, 0, 0]
        pid = ray.get(pool.actors[0].info.remote())["pid"]
        ray.kill(pool.actors[0], no_restart=False)
        # The rebuilt actor is declared base again before it samples: the same images, seed for seed.
        after = pool.request(prompts, seeds, max_per_request=2)
        assert ray.get(pool.actors[0].info.remote())["pid"] != pid and pool.restarts == 1
        assert after["versions"] == [0, 0, 0]
        for a, b in zip(before["images"], after["images"]):
            assert np.abs(_pixels(a) - _pixels(b)).max() <= 1.0
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_build_pairs_recipe_writes_pickapic_parquet_from_sampler_actors(ray_local, tmp_path):
    out = tmp_path / "build"
    # The recipe joins the session's local cluster through RAY_ADDRESS, as it does under `ray job submit`.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    cmd = [sys.executable, "recipes/build_pairs.py", "--config", str(BUILD_CONFIG),
           "--set", f"train.output_dir={out}", "--set", "train.progress=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = json.loads((out / "pairs.summary.json").read_text())
    assert summary["num_captions"] == 6 and summary["judged"] and summary["metadata"]["sampler_actors"] == 1
    assert summary["kept"] + sum(summary["dropped"].values()) == summary["num_captions"]
    assert summary["kept"] >= 1, summary
    rows = pq.read_table(out / "pairs.parquet").to_pylist()
    assert len(rows) == summary["kept"]
    assert all(r["label_0"] == 1.0 and r["judge_chosen"] >= 6.0 for r in rows)

    pairs = PickAPicPairs(out / "pairs.parquet", resolution=32).materialize()
    assert len(pairs) == summary["kept"] and pairs.issues.total == 0
    item = pairs[0]
    assert item["prompt"] == rows[0]["caption"] and item["chosen"].shape == (3, 32, 32)

    # Every kept pair's seed is one of the build's per-pair seeds, in order, and it reproduces both images
    # with the base model: the actors sampled the base weights with exactly the recorded seed.
    seeds = pair_seeds(summary["seed"], summary["generated_pairs"])
    kept_seeds = [r["seed"] for r in rows]
    assert kept_seeds == [s for s in seeds if s in kept_seeds]
    from diffalign.actors.sampler_worker import SamplerWorker

    worker = SamplerWorker(load_config(BUILD_CONFIG, [f"train.output_dir={tmp_path}"]))
    worker.use_base_weights()
    row = rows[0]
    for prompt, column in ((row["chosen_prompt"], "jpg_0"), (row["rejected_prompt"], "jpg_1")):
        stored = _pixels(row[column])
        seeds_to_try = [row["seed"], row["seed"] + 1]
        same, other = worker.generate([prompt, prompt], seeds_to_try, output="pil")["images"]
        assert np.abs(_pixels(encode_jpeg(same)) - stored).mean() < 1.0
        assert np.abs(_pixels(encode_jpeg(other)) - stored).mean() > 5.0


@pytest.mark.parametrize("override, message", [
    ("build.preset=anime", "build.preset='anime' is not allowed"),
    ("build.threshold=11", "build.threshold must be a judge score in [0, 10]"),
    ("build.images_per_request=0", "build.images_per_request must be >= 1"),
    ("build.judge=./no/such/judge", "build.judge: path './no/such/judge' does not exist"),
    ("data.mismatch_probe=./no/such/clip", "data.mismatch_probe: path './no/such/clip' does not exist"),
    ("data.mismatch_probe_n=0", "data.mismatch_probe_n must be >= 1"),
])
def test_build_and_probe_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(BUILD_CONFIG, [override])


def test_build_recipe_refuses_a_pool_without_actors(tmp_path):
    cmd = [sys.executable, "recipes/build_pairs.py", "--config", str(BUILD_CONFIG),
           "--set", f"train.output_dir={tmp_path}/x", "--set", "ray.sampler.num=0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "ray.sampler.num must be >= 1" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_mismatch_probe_skipped_with_a_hint(tmp_path, caplog):
    from diffalign.train.mismatch_check import check_reference_mismatch

    cfg = load_config(None, [f"train.output_dir={tmp_path}"])
    with caplog.at_level(logging.INFO, logger="diffalign.train.mismatch_check"):
        assert check_reference_mismatch(cfg, None) is None
    assert "data.mismatch_probe=" in caplog.text
    assert not (tmp_path / "mismatch.json").exists()


@pytest.mark.slow
def test_mismatch_probe_printed_and_logged_before_training(tmp_path, capsys):
    from diffalign.models.tiny.scorers import save_tiny_scorer
    from diffalign.train.driver import run
    from mlflow.tracking import MlflowClient

    clip = save_tiny_scorer("clip", tmp_path / "clip")
    cfg = load_config(ROOT / "configs/tiny/mapo.yaml", [
        f"train.output_dir={tmp_path}/run", "train.max_steps=2", "train.eval_every=0", "train.progress=false",
        "train.sample_every=0", "data.num_pairs=8", "data.heldout_pairs=4", "optim.batch_size=4",
        f"data.mismatch_probe={clip}", "data.mismatch_probe_n=2", "tracking.sample_steps=2",
    ])

    class StepMarker:
        def on_step(self, trainer, metrics):
            print(f"training step {trainer.step}", flush=True)

    summary = run(cfg, callbacks=[StepMarker()], device="cpu")
    printed = capsys.readouterr().out
    assert "reference mismatch:" in printed and "training step 1" in printed
    assert printed.index("reference mismatch:") < printed.index("training step 1")

    result = json.loads((tmp_path / "run" / "mismatch.json").read_text())
    assert result["n_base"] == 2 and result["embedder"] == str(clip)
    assert f"{result['mean_distance']:.4f}" in printed and result["note"] in printed
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["mismatch.embedder"] == str(clip) and run.data.params["mismatch.n"] == "2"
    assert run.data.metrics["mismatch.mean_distance"] == pytest.approx(result["mean_distance"])
    assert run.data.metrics["mismatch.floor_distance"] == pytest.approx(result["floor_distance"])
    first_loss = min(m.timestamp for m in client.get_metric_history(run.info.run_id, "loss"))
    probe = client.get_metric_history(run.info.run_id, "mismatch.mean_distance")[0]
    assert probe.timestamp <= first_loss
