"""Every shipped tiny training config runs to completion, as shipped (full length, MLflow on; one sqlite
store for the module, whose creation costs seconds), through the code path of
`recipes/preference_offline.py` (`diffalign.train.driver.run`): a finite final loss,
no TrainingDiverged, no rollback, and no saturation note. The DPO-type presets keep learning through
their last quarter (grad_norm > 0, loss still moving) and their held-out margin grows. A deliberately
saturating config (configs/tiny/xdpo.yaml as it shipped, lr 2e-3; 40 steps) trains to the end with
the saturation note logged once and recorded on its MLflow run.

The other configs/tiny files are not training configs of this recipe; their tests:
- mapo_personalize.yaml (online MaPO, Ray sampler actors): tests/test_ray_job.py::
  test_ray_job_submit_personalize_recipe (recipes/mapo_personalize.py under `ray job submit`);
- flux_mapo_personalize.yaml (online MaPO on a FLUX LoRA): tests/test_flow_online.py::
  test_online_flux_mapo_survives_sampler_kill_and_saves_a_diffusers_lora;
- sweep.yaml (Ray Tune + ASHA): tests/test_recipes.py::
  test_sweep_trials_are_ray_train_runs_with_asha_and_mlflow and
  ::test_trial_config_reports_the_metric_on_one_grid;
- evaluate.yaml: tests/test_evaluate.py::test_recipe_cli_evaluates_and_probes and
  ::test_recipe_without_weights_or_scorers_exits_2_naming_the_fields;
- build_pairs.yaml: tests/test_build_recipe.py::
  test_build_pairs_recipe_writes_pickapic_parquet_from_sampler_actors;
- prepare.yaml: tests/test_prepare.py (::test_killed_prepare_resumes_to_the_same_store runs
  recipes/prepare_data.py on it; the `prepared` fixture and ::test_prepare_section_is_validated load it).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
from diffalign.config import load_config
from diffalign.train.guards import SATURATION_STEPS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "tiny"
COVERED_ELSEWHERE = {"mapo_personalize", "flux_mapo_personalize", "sweep", "evaluate", "build_pairs",
                     "prepare"}
TRAINING = sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem not in COVERED_ELSEWHERE)
# -logsigmoid of a margin: the losses that can saturate
LOGISTIC = {"dpo", "dpo_refupdate", "xdpo", "sd3_dpo", "flux_dpo_refupdate"}
SATURATED = "the loss has saturated"


class Steps:
    """Every step's metrics, as the trainer hands them to its callbacks."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict]] = []

    def on_step(self, trainer, metrics: dict) -> None:
        self.metrics.append((trainer.step, dict(metrics)))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _train(name: str, tmp_path: Path, store: str, *overrides: str):
    from diffalign.train.driver import run

    sets = [f"train.output_dir={tmp_path / name}", "train.progress=false", f"tracking.tracking_uri={store}"]
    cfg = load_config(CONFIGS / f"{name}.yaml", [*sets, *overrides])
    steps = Steps()
    summary = run(cfg, callbacks=[steps])
    return cfg, summary, steps.metrics


def _mlflow_run(cfg, summary):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    return client, client.get_run(summary["mlflow_run_id"])


def _saturation_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "diffalign.train.guards"
            and r.levelno == logging.WARNING and SATURATED in r.getMessage()]


def test_the_training_configs_are_the_ones_listed():
    assert TRAINING == ["dpo", "dpo_refupdate", "flux_dpo_refupdate", "flux_mapo", "mapo", "qwenimage_mapo",
                        "sd3_dpo", "sd3_mapo", "sdxl_mapo", "sft", "xdpo"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINING)
def test_tiny_config_trains_to_completion_as_shipped(name, tmp_path, store, caplog):
    caplog.set_level(logging.WARNING, logger="diffalign.train.guards")
    cfg, summary, metrics = _train(name, tmp_path, store)
    n = cfg.train.max_steps
    assert summary["final_step"] == n and [s for s, _ in metrics] == list(range(1, n + 1))
    assert math.isfinite(summary["loss"]), summary["loss"]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for _, m in metrics)
    assert metrics[-1][1]["guard/rollbacks"] == 0 and metrics[-1][1]["guard/skipped_steps"] == 0
    assert not _saturation_warnings(caplog)
    _, mlflow_run = _mlflow_run(cfg, summary)
    assert mlflow_run.info.status == "FINISHED" and "saturation" not in mlflow_run.data.tags
    if name not in LOGISTIC:
        return
    # Still learning in the last quarter: a gradient on every step, a loss that moves and never sits
    # at ~0 for SATURATION_STEPS steps, and a held-out margin (policy vs initial model) that grew.
    last = [m for s, m in metrics if s > 3 * n // 4]
    assert min(m["grad_norm"] for m in last) > 1e-6, [m["grad_norm"] for m in last]
    losses = [m["loss"] for m in last]
    assert max(losses) - min(losses) > 1e-3 and sum(x > 1e-6 for x in losses) > len(losses) - SATURATION_STEPS
    held = [(m["heldout/implicit_acc"], m["heldout/margin_mean"]) for _, m in metrics
            if "heldout/margin_mean" in m]
    assert len(held) == n // cfg.train.eval_every
    assert held[-1][1] > held[0][1] > 0 and held[-1][0] >= held[0][0], held


@pytest.mark.slow
def test_saturating_config_warns_once_and_trains_to_the_end(tmp_path, store, caplog):
    """configs/tiny/xdpo.yaml as it shipped (lr 2e-3) ended in TrainingDiverged: the loss was 0 with
    grad_norm 0 for tens of steps, then one wrong batch's ~1e3 loss read as a spike, over and over."""
    caplog.set_level(logging.WARNING, logger="diffalign.train.guards")
    cfg, summary, metrics = _train("xdpo", tmp_path, store, "optim.lr=2e-3", "train.max_steps=40",
                                   "train.sample_every=0")
    assert summary["final_step"] == cfg.train.max_steps and math.isfinite(summary["loss"])
    zeros = [s for s, m in metrics if m["loss"] < 1e-6]
    assert len(zeros) >= SATURATION_STEPS
    warnings = _saturation_warnings(caplog)
    assert len(warnings) == 1 and "Lower objective.beta or optim.lr" in warnings[0], warnings
    client, mlflow_run = _mlflow_run(cfg, summary)
    tag = mlflow_run.data.tags["saturation"]
    assert tag.startswith("step ") and SATURATED in tag
    text = Path(client.download_artifacts(mlflow_run.info.run_id, "saturation.txt", str(tmp_path)))
    assert text.read_text().strip() == tag
