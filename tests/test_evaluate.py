"""Policy-vs-base evaluation and the mismatch probe on the tiny model with tiny random scorers."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffalign.config import ConfigError, load_config
from diffalign.data.synthetic import SyntheticPairs
from diffalign.eval.harness import comparison_grid, evaluate_policy
from diffalign.eval.policy_weights import resolve_weights
from diffalign.eval.probe import mismatch_probe
from diffalign.models.lora import add_lora, save_lora
from diffalign.models.sampling import generate_images
from diffalign.models.tiny.diffusion import build_tiny_bundle
from diffalign.models.tiny.scorers import save_tiny_scorer
from diffalign.specs import load_prompts, parse_scorers, parse_seeds

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red car", "a city at night"]
SEEDS = [0, 1]


def _cfg(tmp: Path, *extra: str):
    return load_config(None, [
        f"train.output_dir={tmp}/run", "tracking.mlflow=false", "model.finetune=full",
        "reference.strategy=frozen", *extra,
    ])


def _perturb(params, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    out = {name: save_tiny_scorer(name, root / name, seed=i) for i, name in enumerate(("clip", "pickscore"))}
    base = build_tiny_bundle("sd15", seed=0)
    base.unet.save_pretrained(str(root / "same_unet"))
    _perturb(base.unet.parameters(), 0.05, seed=1)
    base.unet.save_pretrained(str(root / "trained_unet"))
    for name, scale in (("same_lora", 0.0), ("trained_lora", 0.5)):
        bundle = build_tiny_bundle("sd15", seed=0)
        add_lora(bundle.unet, rank=4)
        _perturb([p for n, p in bundle.unet.named_parameters() if "lora_B" in n], scale, seed=2)
        save_lora(bundle, root / name)
    out.update({k: root / k for k in ("same_unet", "trained_unet", "same_lora", "trained_lora")})
    out["root"] = root
    return out


def _scorers(assets) -> str:
    return f"clip:{assets['clip']},pickscore:{assets['pickscore']}"


def test_evaluate_trained_unet_writes_tables_grid_and_mlflow(assets, tmp_path):
    cfg = _cfg(tmp_path, f"tracking.tracking_uri=file:{tmp_path}/mlruns", "tracking.mlflow=true")
    res = evaluate_policy(cfg, assets["trained_unet"], PROMPTS, "0,1", _scorers(assets), tmp_path / "eval",
                          progress=False)
    assert res["weights_kind"] == "unet" and res["num_items"] == 4
    for f in ("evaluation.md", "evaluation.json", "grid.png"):
        assert (tmp_path / "eval" / f).stat().st_size > 0
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert set(saved["win_rates"]) == {"clip", "pickscore"}
    for r in res["win_rates"].values():
        assert 0.0 <= r["win_rate"] <= 1.0 and r["n"] == 4
        assert r["wins"] + r["ties"] + r["losses"] == 4
    # The perturbed UNet changes the images, so at least one scorer sees a difference.
    assert any(r["ties"] < 4 for r in res["win_rates"].values())
    assert [it["seed"] for it in res["items"]] == [0, 1, 0, 1]
    md = (tmp_path / "eval" / "evaluation.md").read_text()
    assert "| clip |" in md and "| pickscore |" in md
    from PIL import Image

    with Image.open(tmp_path / "eval" / "grid.png") as grid:
        assert grid.size == (160 + 4 * 128, 20 + 2 * 128)

    import mlflow

    mlflow.set_tracking_uri(f"file:{tmp_path}/mlruns")
    run = mlflow.get_run(res["mlflow_run_id"])
    assert run.data.metrics["win_rate.clip"] == pytest.approx(res["win_rates"]["clip"]["win_rate"])
    assert run.data.params["eval.weights_kind"] == "unet"
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert arts == {"evaluation/evaluation.md", "evaluation/evaluation.json", "evaluation/grid.png"}


def test_unchanged_weights_tie_exactly_and_baseline_is_seed_matched(assets, tmp_path):
    cfg = _cfg(tmp_path)
    baselines = []
    for weights in ("same_unet", "same_lora"):
        res = evaluate_policy(cfg, assets[weights], PROMPTS, SEEDS, _scorers(assets), tmp_path / weights,
                              progress=False)
        for r in res["win_rates"].values():
            assert r["win_rate"] == 0.5 and r["ties"] == 4
        assert res["scores"]["policy"] == res["scores"]["baseline"]
        baselines.append(res["scores"]["baseline"])
    # Another call (other weights) samples the very same baseline images from the same seeds.
    other = evaluate_policy(cfg, assets["trained_lora"], PROMPTS, SEEDS, _scorers(assets), tmp_path / "lora",
                            progress=False)
    assert other["weights_kind"] == "lora"
    assert other["scores"]["baseline"] == baselines[0] == baselines[1]
    assert other["scores"]["policy"] != other["scores"]["baseline"]


def test_generation_is_seed_matched_pixel_for_pixel(tmp_path):
    pipe = build_tiny_bundle("sd15", seed=0).pipeline()
    kw = dict(steps=4, guidance_scale=5.0, resolution=32, progress=False)
    a = generate_images(pipe, ["a square"] * 3, [0, 1, 0], batch_size=2, **kw)
    b = generate_images(pipe, ["a square"] * 3, [0, 1, 0], batch_size=3, **kw)
    arr = [np.asarray(im, dtype=np.int16) for im in a + b]
    assert np.abs(arr[0] - arr[2]).max() <= 1  # same seed, different batch position
    assert all(np.abs(x - y).max() <= 1 for x, y in zip(arr[:3], arr[3:]))
    assert np.abs(arr[0] - arr[1]).max() > 1  # a different seed is a different image
    grid = comparison_grid(["a square"], [0, 1], a[:2], b[:2], tile=64)
    assert grid.size == (160 + 4 * 64, 20 + 64)


def test_load_prompts_formats(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \na cat\n")
    assert load_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    assert load_prompts(tmp_path / "p.txt", dedupe=False) == ["a cat", "a dog", "a cat"]
    (tmp_path / "parti.tsv").write_text("Prompt\tCategory\tChallenge\nbird\tAnimals\tBasic\nred car\tX\tY\n")
    assert load_prompts(tmp_path / "parti.tsv") == ["bird", "red car"]
    (tmp_path / "hpd.json").write_text(json.dumps([{"prompt": "anime girl", "image_path": ["0.jpg"]},
                                                   {"prompt": "a painting"}]))
    assert load_prompts(tmp_path / "hpd.json", limit=1) == ["anime girl"]
    (tmp_path / "styles.json").write_text(json.dumps({"anime": ["x", "y"], "photo": ["z"]}))
    assert load_prompts(tmp_path / "styles.json") == ["x", "y", "z"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"caption": ["a", "a", "b"], "label_0": [1.0, 0.0, 0.5]})
    pq.write_table(table, tmp_path / "test.parquet")
    assert load_prompts(tmp_path / "test.parquet") == ["a", "b"]
    (tmp_path / "bad.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(ValueError, match="no prompt column"):
        load_prompts(tmp_path / "bad.csv")


def test_argument_parsing_and_weight_resolution(assets, tmp_path):
    assert parse_seeds("0,1") == [0, 1] and parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    with pytest.raises(ValueError, match="repeated"):
        parse_seeds("1,1")
    assert parse_scorers("clip:/m/clip, pickscore") == {"clip": "/m/clip", "pickscore": None}
    assert resolve_weights(assets["trained_lora"])[0] == "lora"
    assert resolve_weights(assets["trained_unet"])[0] == "unet"
    run = tmp_path / "run"
    (run / "unet").mkdir(parents=True)
    os.symlink(assets["trained_unet"] / "config.json", run / "unet" / "config.json")
    assert resolve_weights(run) == ("unet", run / "unet")
    with pytest.raises(ValueError, match="expected a diffusers LoRA folder"):
        resolve_weights(tmp_path)
    with pytest.raises(ValueError, match="dino needs reference images"):
        evaluate_policy(_cfg(tmp_path), assets["same_unet"], PROMPTS[:1], [0], "dino", tmp_path / "e",
                        progress=False)


def test_mismatch_probe_reports_distance_floor_and_note(assets, tmp_path):
    cfg = _cfg(tmp_path)
    near = mismatch_probe(cfg, SyntheticPairs(4, 32, chosen_color="gray", shift=0.0), assets["clip"], n=4,
                          progress=False)
    far = mismatch_probe(cfg, SyntheticPairs(4, 32, chosen_color="red", shift=1.0), assets["clip"], n=4,
                         floor=False, progress=False)
    assert near["n_pairs"] == 16 and "floor_distance" in near and "floor_distance" not in far
    assert near["mean_distance"] >= 0 and far["mean_distance"] >= 0
    assert "mismatch" in near["note"]


def _sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def test_recipe_cli_evaluates_and_probes(assets, tmp_path, monkeypatch, capsys):
    import runpy

    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    monkeypatch.chdir(ROOT)
    common = ["recipes/evaluate.py", "--config", "configs/tiny/evaluate.yaml",
              "--set", "tracking.mlflow=false"]
    (tmp_path / "prompts.txt").write_text("a red car\na bowl of fruit\n")
    monkeypatch.setattr(sys, "argv", common + [
        *_sets(f"eval.weights={assets['trained_unet']}", f"eval.prompts={tmp_path / 'prompts.txt'}",
               "eval.max_prompts=1", "eval.seeds=3", f"eval.scorers=clip:{assets['clip']}",
               f"eval.out={tmp_path / 'e'}"),
    ])
    runpy.run_path("recipes/evaluate.py", run_name="__main__")
    result = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert result["num_items"] == 1 and result["seeds"] == [3]
    assert result["prompt_source"].endswith("prompts.txt")
    monkeypatch.setattr(sys, "argv", common + [
        *_sets("data.num_pairs=4", "eval.probe_only=true", f"data.mismatch_probe={assets['clip']}",
               "data.mismatch_probe_n=2", f"eval.out={tmp_path / 'p'}"),
    ])
    runpy.run_path("recipes/evaluate.py", run_name="__main__")
    probe = json.loads((tmp_path / "p" / "mismatch.json").read_text())
    assert probe["n_base"] == 2 and "mismatch" in probe["note"]
    assert "mismatch" in capsys.readouterr().out


def test_recipe_without_weights_or_scorers_exits_2_naming_the_fields(assets, monkeypatch, capsys):
    import runpy

    monkeypatch.syspath_prepend(str(ROOT / "recipes"))
    monkeypatch.chdir(ROOT)
    common = ["recipes/evaluate.py", "--config", "configs/tiny/evaluate.yaml",
              "--set", "tracking.mlflow=false"]
    for extra, named, unnamed in (([], ("eval.weights", "eval.scorers"), ()),
                                  (_sets(f"eval.weights={assets['trained_unet']}"), ("eval.scorers",),
                                   ("eval.weights",))):
        monkeypatch.setattr(sys, "argv", common + extra)
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path("recipes/evaluate.py", run_name="__main__")
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.split("must be set")[0]
        assert all(f in err for f in named) and not any(f in err for f in unnamed)


@pytest.mark.parametrize("overrides, field", [
    (["eval.batch_size=0"], "eval.batch_size"),
    (["eval.grid_prompts=0"], "eval.grid_prompts"),
    (["eval.max_prompts=0"], "eval.max_prompts"),
    (["eval.steps=0"], "eval.steps"),
    (["eval.seeds=a-b"], "eval.seeds"),
    (["eval.seeds=1,1"], "eval.seeds"),
    (["eval.scorers=bogus"], "eval.scorers='bogus'"),
    (["eval.scorers=clip,clip"], "eval.scorers"),
    (["eval.scorers=clip:/no/such/clip"], "eval.scorers clip: path"),
    (["eval.scorers=dino"], "eval.references"),
    (["eval.probe_only=true"], "data.mismatch_probe"),
    (["eval.weights=/no/such/weights"], "eval.weights"),
    (["eval.prompts=/no/prompts.txt"], "eval.prompts"),
    (["eval.scorers=dino", "eval.references=/no/refs"], "eval.references"),
])
def test_bad_eval_config_fails_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert field in str(err.value)


def test_eval_config_paths_are_checked_only_with_check_paths(assets):
    sets = ["eval.weights=/no/such/weights", "eval.scorers=clip:/no/such/clip", "eval.prompts=/no/p.txt"]
    cfg = load_config(None, sets, validate_paths=False)
    assert cfg.eval.weights == "/no/such/weights"
    ok = load_config(None, [f"eval.weights={assets['trained_unet']}", f"eval.references={assets['root']}",
                            f"eval.scorers=clip:{assets['clip']},dino", "eval.seeds=0-3", "eval.steps=2"])
    assert ok.eval.scorers.startswith("clip:") and ok.eval.steps == 2
