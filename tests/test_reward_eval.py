"""Periodic reward-model score during training (train.score_every, tracking.scorers) on the tiny model
with a tiny random CLIP scorer saved to disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffalign.config import ConfigError, load_config
from diffalign.eval.base import Scorer
from diffalign.models.tiny.scorers import save_tiny_scorer
from diffalign.train.driver import build_trainer, run
from diffalign.train.reward_eval import RewardEvaluator
from PIL import Image

# 2 prompts x 2 seeds, 2 inference steps: four 32 px images per evaluation.
FAST = ["train.max_steps=4", "train.progress=false", "train.eval_every=0", "data.num_pairs=16",
        "data.heldout_pairs=8", "optim.batch_size=4", "model.finetune=full", "guard.enabled=false",
        "tracking.score_num_prompts=2", "tracking.score_seeds=0,1", "tracking.sample_steps=2"]


def _cfg(out, *extra: str):
    return load_config(None, [f"train.output_dir={out}", *FAST, *extra])


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return save_tiny_scorer("clip", tmp_path_factory.mktemp("scorer") / "clip", seed=0)


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, clip_path):
    root = tmp_path_factory.mktemp("scored")
    # A file store (conftest allows it): creating a sqlite store costs seconds of migrations.
    cfg = _cfg(root / "run", "tracking.mlflow=true", f"tracking.tracking_uri=file:{root}/mlruns",
               "train.score_every=2", f"tracking.scorers=clip:{clip_path}")
    summary = run(cfg, device="cpu")
    return cfg, summary


def test_scores_and_grids_are_logged_to_mlflow_at_every_evaluation(scored_run, tmp_path):
    from diffalign.tracking import tracking_uri
    from mlflow.tracking import MlflowClient

    cfg, summary = scored_run
    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    run_id = summary["mlflow_run_id"]
    hist = sorted(client.get_metric_history(run_id, "score.clip"), key=lambda m: m.step)
    assert [m.step for m in hist] == [0, 2, 4]  # baseline, every 2 steps, last step
    values = [m.value for m in hist]
    assert values[0] != values[-1]  # four full fine-tuning steps change the images and their score
    assert summary["score/clip"] == pytest.approx(values[-1], abs=1e-9)
    # The same numbers on disk, one line per evaluation.
    jsonl = Path(cfg.train.output_dir) / "score" / "scores.jsonl"
    lines = [json.loads(s) for s in jsonl.read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 2, 4]
    assert [r["score/clip"] for r in lines] == pytest.approx(values, abs=1e-9)
    arts = sorted(a.path for a in client.list_artifacts(run_id, "score"))
    assert arts == [f"score/step_{s:06d}.png" for s in (0, 2, 4)]
    with Image.open(client.download_artifacts(run_id, "score/step_000004.png", str(tmp_path))) as grid:
        assert grid.size == (2 * 128, 2 * 128)  # columns = 2 seeds, rows = 2 prompts, 32 px tiles x4


def test_scoring_leaves_training_unchanged_and_scores_reproduce(clip_path, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\na city at night\na bowl of fruit\n")
    score = ["train.score_every=2", f"tracking.scorers=clip:{clip_path}", f"tracking.score_prompts={prompts}"]
    cfg_on = _cfg(tmp_path / "on", "tracking.mlflow=false", *score)
    cfg_off = _cfg(tmp_path / "off", "tracking.mlflow=false")
    evaluator = RewardEvaluator(cfg_on)
    on = build_trainer(cfg_on, callbacks=[evaluator])
    summary = on.fit()
    off = build_trainer(cfg_off)
    off.fit()
    w_on, w_off = on.trainable_weights(), off.trainable_weights()
    assert w_on.keys() == w_off.keys()
    assert all(torch.equal(w_on[k], w_off[k]) for k in w_on)  # bit-identical final weights
    assert evaluator.prompts == ["a red car", "a city at night"]  # the file's first score_num_prompts
    # Same weights, prompts and seeds -> the same score, again and again; the RNG is left as it was.
    rng = torch.get_rng_state()
    again = [evaluator.evaluate(on)["score/clip"] for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), rng)
    assert again == [summary["score/clip"]] * 2


class FailsAfterBaseline(Scorer):
    """Mean brightness; raises on every call after the first (the step-0 baseline)."""

    name = "brightness"
    uses_prompts = False
    calls = 0

    def _score_batch(self, images, prompts):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("scorer down")
        return torch.tensor([float(torch.tensor(list(im.getdata())).float().mean()) for im in images])


def test_a_failing_evaluation_is_logged_and_training_goes_on(tmp_path, caplog):
    cfg = _cfg(tmp_path / "run", "tracking.mlflow=false", "train.score_every=2", "tracking.scorers=clip")
    evaluator = RewardEvaluator(cfg, scorers={"brightness": FailsAfterBaseline()})
    trainer = build_trainer(cfg, callbacks=[evaluator])
    summary = trainer.fit()
    assert trainer.step == 4 and "score/brightness" not in summary
    assert "reward score at step 2 failed" in caplog.text
    lines = (tmp_path / "run" / "score" / "scores.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in lines] == [0]
    assert 0 < json.loads(lines[0])["score/brightness"] < 255


@pytest.mark.parametrize("overrides, field", [
    (["train.score_every=-1"], "train.score_every"),
    (["train.score_every=2"], "tracking.scorers"),
    (["tracking.scorers=clip"], "train.score_every=0"),
    (["train.score_every=2", "tracking.scorers=bogus"], "tracking.scorers='bogus'"),
    (["train.score_every=2", "tracking.scorers=dino"], "tracking.scorers='dino'"),
    (["train.score_every=2", "tracking.scorers=clip:/no/such/scorer"], "tracking.scorers clip: path"),
    (["train.score_every=2", "tracking.scorers=clip", "tracking.score_seeds=a-b"], "tracking.score_seeds"),
    (["train.score_every=2", "tracking.scorers=clip", "tracking.score_prompts=/no/prompts.txt"],
     "tracking.score_prompts"),
    (["train.score_every=2", "tracking.scorers=clip", "tracking.score_num_prompts=0"],
     "tracking.score_num_prompts"),
])
def test_bad_scoring_config_fails_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert field in str(err.value)
