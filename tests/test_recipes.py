"""Recipes end to end on the tiny config, with the MLflow record read back."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_offline_recipe_logs_mlflow_run(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "recipes/preference_offline.py", "--config", "configs/tiny/dpo_refupdate.yaml",
           "--set", f"train.output_dir={out}", "--set", "train.max_steps=6", "--set", "train.eval_every=3",
           "--set", "train.sample_every=3", "--set", "train.progress=false", "--set", "data.num_pairs=16",
           "--set", "data.heldout_pairs=8"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{out.resolve() / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["diffalign-tiny"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    for key in ("loss", "implicit_acc", "margin_mean", "mse_w", "mse_l", "ref.divergence", "ref.version",
                "lr", "pairs_per_s", "grad_norm", "heldout.implicit_acc", "bins.acc_9"):
        assert key in run.data.metrics, key
    assert run.data.params["objective.name"] == "dpo"
    client = MlflowClient(tracking_uri=uri)
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert any(p.endswith(".png") for p in samples)
    assert client.list_artifacts(run.info.run_id, "weights")
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 6
    # the report renders from the same record
    from diffalign.report import render_report

    png = render_report(run.info.run_id, uri, tmp_path / "report.png")
    assert png.stat().st_size > 10_000


@pytest.mark.slow
def test_offline_recipe_on_ray_learners_logs_the_same_mlflow_run(tmp_path):
    out = tmp_path / "run"
    sets = ["ray.enabled=true", f"train.output_dir={out}", "train.max_steps=4",
            "train.eval_every=2", "train.sample_every=2", "train.checkpoint_every=2", "train.progress=false",
            "data.num_pairs=16", "data.heldout_pairs=8", "optim.batch_size=4"]
    cmd = [sys.executable, "recipes/preference_offline.py", "--config", "configs/tiny/dpo.yaml"]
    proc = subprocess.run(cmd + [a for kv in sets for a in ("--set", kv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    record = json.loads((out / "mlflow_run.json").read_text())
    assert record["status"] == "FINISHED" and f'"mlflow_run_id": "{record["run_id"]}"' in proc.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("diffalign-tiny").experiment_id])
    assert [r.info.run_id for r in runs] == [record["run_id"]] and runs[0].info.status == "FINISHED"
    run_id = record["run_id"]
    assert runs[0].data.params["objective.name"] == "dpo" and runs[0].data.params["ray.enabled"] == "True"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    assert len(client.get_metric_history(run_id, "implicit_acc")) == 4
    assert [m.step for m in client.get_metric_history(run_id, "heldout.implicit_acc")] == [2, 4]
    samples = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert {f"samples/step_00000{s}.png" for s in (0, 2, 4)} <= samples
    assert {a.path for a in client.list_artifacts(run_id, "weights/unet")} >= {
        "weights/unet/config.json", "weights/unet/diffusion_pytorch_model.safetensors"}
    # The logged UNet holds the trained weights: those of the run's last checkpoint.
    logged = Path(client.download_artifacts(run_id, "weights/unet"))
    saved = load_file(logged / "diffusion_pytorch_model.safetensors")
    trained = load_file(sorted((out / "ray").glob("*/checkpoint_*/weights.safetensors"))[-1])
    assert trained and set(trained) <= set(saved) and all(torch.equal(saved[k], trained[k]) for k in trained)


def test_invalid_config_fails_before_any_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "recipes/preference_offline.py", "--config", "configs/tiny/dpo.yaml", "--set",
         "reference.strategy=none", "--set", f"train.output_dir={tmp_path}/x"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "reference.strategy=none" in proc.stderr and "needs a reference" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_trial_config_reports_the_metric_on_one_grid(tmp_path):
    from diffalign.actors.sweep import trial_config
    from diffalign.config import ConfigError, load_config

    cfg = load_config(ROOT / "configs/tiny/sweep.yaml", ["tune.report_every=3", "train.checkpoint_every=4"])
    trial = trial_config(cfg, {"objective.beta": 123.0, "reference.tau": 2}, str(tmp_path / "t0"))
    assert trial.objective.beta == 123.0 and trial.reference.tau == 2
    # Every Ray Train report (log_every steps and each checkpoint) carries the held-out metric.
    assert (trial.train.eval_every, trial.train.log_every, trial.train.checkpoint_every) == (3, 3, 6)
    assert trial.train.output_dir == str(tmp_path / "t0")
    assert trial.ray.storage_path == str(tmp_path / "t0" / "ray")
    assert not trial.tracking.mlflow and cfg.tracking.mlflow  # the Tuner's MLflow callback logs trials
    for bad in ("tune.report_every=0", "tune.reduction_factor=1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config(ROOT / "configs/tiny/sweep.yaml", [bad])


@pytest.mark.slow
def test_sweep_trials_are_ray_train_runs_with_asha_and_mlflow(tmp_path, ray_local):
    from diffalign.actors.learner import FINAL_JSON, read_step_log
    from diffalign.actors.sweep import run_sweep
    from diffalign.config import load_config
    from ray.util import placement_group_table

    pgs_before = set(placement_group_table())
    cfg = load_config(ROOT / "configs/tiny/sweep.yaml", [
        f"train.output_dir={tmp_path}/sweep", "train.max_steps=4", "train.checkpoint_every=2",
        "data.num_pairs=16", "data.heldout_pairs=8"])
    summary = run_sweep(cfg)
    assert summary["num_trials"] == 4
    assert summary["best_metric"] is not None and 0 <= summary["best_metric"] <= 1
    saved = json.loads((tmp_path / "sweep" / "best.json").read_text())
    assert saved["best_params"] == summary["best_params"]
    assert set(saved["best_params"]) == set(cfg.tune.search_space)
    for trial in summary["trials"]:
        # ASHA's time unit is one report every tune.report_every = 2 steps: at most 2 of them in 4 steps.
        assert 1 <= trial["iterations"] <= 2 and 0 <= trial["heldout/implicit_acc"] <= 1
        # Each trial is a Ray Train run writing into its trial folder: the learner's step log, the
        # run's checkpoints (one per report here), and the run summary when it got to the end.
        trial_dir = Path(trial["path"])
        records = trial_dir / "ray" / "diffalign-dpo" / "diffalign"
        log = read_step_log(records)
        assert [r["world_size"] for r in log if r["event"] == "start"] == [1]
        steps = [r["step"] for r in log if r["event"] == "step"]
        assert steps[: 2 * trial["iterations"]] == list(range(1, 2 * trial["iterations"] + 1))
        assert list((trial_dir / "ray" / "diffalign-dpo").glob("checkpoint_*/weights.safetensors"))
        if trial["iterations"] == 2 and (records / FINAL_JSON).exists():  # not killed while finishing
            final = json.loads((records / FINAL_JSON).read_text())
            assert final["step"] == 4
            assert final["metrics"]["heldout/implicit_acc"] == trial["heldout/implicit_acc"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'sweep').resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("diffalign-tiny-sweep").experiment_id])
    assert len(runs) == 4  # one per trial, each with its held-out accuracy per report
    assert sorted(len(client.get_metric_history(r.info.run_id, "heldout/implicit_acc")) for r in runs) == \
        sorted(t["iterations"] for t in summary["trials"])
    # Stopped trials gave their learners' CPUs back (Ray Train removes its placement groups).
    deadline = time.monotonic() + 60
    while any(pg["state"] != "REMOVED" for k, pg in placement_group_table().items() if k not in pgs_before):
        assert time.monotonic() < deadline, placement_group_table()
        time.sleep(1)


# ------------------------------------------------------------------ --help and config errors at the CLI

RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.py") if not p.name.startswith("_"))
TRAINING = {"preference_offline", "mapo_personalize"}  # rerunning one resumes from train.output_dir
OWN_PARSER = {"report", "convert_scorer"}  # argparse of their own: the docstring's first line only
RESUME_LINES = ("Rerunning the same command resumes from the last checkpoint in train.output_dir.",
                "--set train.resume=false", "--set train.output_dir=")


def _docstring(path: Path) -> str:
    import ast

    return ast.get_docstring(ast.parse(path.read_text()), clean=False).strip()


def test_help_of_every_recipe_prints_its_description_and_how_to_resume():
    assert {p.stem for p in RECIPES} >= TRAINING | OWN_PARSER | {"sweep", "evaluate", "build_pairs"}
    # All at once: each is a python start-up and an argparse exit (no torch import, no model).
    procs = {p.stem: subprocess.Popen([sys.executable, str(p.relative_to(ROOT)), "--help"], cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in RECIPES}
    for path in RECIPES:
        out, err = procs[path.stem].communicate(timeout=120)
        assert procs[path.stem].returncode == 0, (path.name, err[-2000:])
        doc = _docstring(path)
        if path.stem in OWN_PARSER:  # argparse re-wraps it
            assert " ".join(doc.splitlines()[0].split()) in " ".join(out.split()), path.name
            continue
        # The whole module docstring, as written (RawDescriptionHelpFormatter): every line of it.
        for line in doc.splitlines():
            assert line.rstrip() in out, (path.name, line)
        trains = all(s in out for s in RESUME_LINES)
        assert trains == (path.stem in TRAINING), (path.name, out[-800:])
        if trains:  # the closing paragraph: after the options
            assert out.rindex("resuming:") > out.index("options:")


def test_yaml_error_is_printed_naming_file_line_and_column_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective:\n  name: dpo\n  beta: [500\ntrain:\n  max_steps: 3\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    procs = [subprocess.Popen([sys.executable, "recipes/preference_offline.py", "--config", str(path),
                               "--set", f"train.output_dir={tmp_path}/x"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for path in (bad, empty)]
    (_, bad_err), (_, empty_err) = (p.communicate(timeout=120) for p in procs)
    assert [p.returncode for p in procs] == [2, 2], (bad_err[-2000:], empty_err[-2000:])
    assert f"invalid config: {bad}: invalid YAML at line 4, column 6" in bad_err
    assert f"invalid config: config file {empty} is empty" in empty_err
    assert "Traceback" not in bad_err + empty_err
    assert not (tmp_path / "x").exists()
