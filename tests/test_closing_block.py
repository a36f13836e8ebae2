"""The end of a training recipe: everything under the run folder (MLflow artifacts, the final grid), and
a closing block whose paths exist and whose diffusers code loads the weights."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

from _closing import TINY_ASSETS, closing_block  # noqa: E402


def _code(block: str) -> str:
    """The indented diffusers lines of a closing block (without its comment lines)."""
    lines = block.splitlines()
    start = lines.index("load them in diffusers:") + 1
    code = []
    for line in lines[start:]:
        if not line.startswith("    "):
            break
        if not line.strip().startswith("#"):
            code.append(line.strip())
    return "\n".join(code)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    from diffalign.models.tiny.export import export_base

    return export_base(tmp_path_factory.mktemp("assets"), "sd15")


def test_new_experiment_keeps_artifacts_beside_its_sqlite_store_and_old_ones_keep_theirs(tmp_path):
    import mlflow
    from diffalign.tracking import artifact_location, use_experiment

    uri = f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    (tmp_path / "run").mkdir()
    assert artifact_location(uri) == (tmp_path / "run" / "mlartifacts").as_uri()
    assert artifact_location("file:/somewhere/mlruns") is None
    assert artifact_location("http://127.0.0.1:5000") is None
    exp_id = use_experiment(mlflow, "fresh", uri)
    assert mlflow.get_experiment(exp_id).artifact_location == (tmp_path / "run" / "mlartifacts").as_uri()
    assert use_experiment(mlflow, "fresh", uri) == exp_id  # found again, not created twice
    mlflow.create_experiment("older", artifact_location=(tmp_path / "elsewhere").as_uri())
    assert mlflow.get_experiment(use_experiment(mlflow, "older", uri)).artifact_location == \
        (tmp_path / "elsewhere").as_uri()


def test_lora_closing_block_code_loads_the_weights(tmp_path, tiny_base, monkeypatch):
    from diffalign.config import load_config
    from diffalign.models.lora import add_lora, save_lora
    from diffalign.models.tiny.diffusion import build_tiny_bundle

    bundle = build_tiny_bundle("sd15", seed=0)
    add_lora(bundle.unet, rank=4)
    weights = save_lora(bundle, tmp_path / "run" / "lora")
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'run'}", "model.finetune=lora"])
    monkeypatch.chdir(tmp_path)
    block = closing_block(cfg, {"weights": str(weights), "mlflow_run_id": "abc123"})
    assert "weights (LoRA, diffusers format): run/lora" in block  # relative to the current directory
    assert f"python -m diffalign.models.tiny.export --out {TINY_ASSETS}" in block
    assert "mlflow ui --backend-store-uri sqlite:///run/mlflow.db" in block
    assert "--run abc123 --tracking-uri sqlite:///run/mlflow.db --out run/report.png" in block
    code = _code(block).replace(f"{TINY_ASSETS}/sd15", str(tiny_base))
    assert code.splitlines()[-1] == 'pipe.load_lora_weights("run/lora")'
    scope: dict = {}
    exec(code, scope)  # the three printed lines, as a user would paste them
    pipe = scope["pipe"]
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())
    no_mlflow = load_config(None, [f"train.output_dir={tmp_path / 'run'}", "tracking.mlflow=false"])
    assert "MLflow tracking was off" in closing_block(no_mlflow, {"weights": None})


@pytest.mark.slow
def test_tiny_run_from_another_directory_keeps_every_output_in_its_run_folder(tmp_path, tiny_base):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "run"
    sets = [f"train.output_dir={out}", "train.max_steps=2", "train.progress=false", "train.eval_every=0",
            "data.num_pairs=8", "data.heldout_pairs=4", "optim.batch_size=4"]
    cmd = [sys.executable, str(ROOT / "recipes/preference_offline.py"), "--config",
           str(ROOT / "configs/tiny/dpo.yaml"), *[a for kv in sets for a in ("--set", kv)]]
    proc = subprocess.run(cmd, cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert list(elsewhere.iterdir()) == []  # no ./mlruns, no mlflow.db, nothing

    block = proc.stdout[proc.stdout.index("==== done:"):]
    print(block)
    assert (out / "samples" / "final.png").stat().st_size > 0
    assert f"final samples: {out / 'samples' / 'final.png'}" in block
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", block).group(1)
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment_by_name("diffalign-tiny").artifact_location == (out / "mlartifacts").as_uri()
    artifacts = out / "mlartifacts" / run_id / "artifacts"
    assert client.get_run(run_id).info.artifact_uri == artifacts.as_uri()
    assert list((artifacts / "samples").glob("step_*.png")) and (artifacts / "weights" / "unet").is_dir()

    # Every path the block names exists; its commands name this run and its store.
    named = re.findall(r'"(/[^"]+)"|: (/\S+)|sqlite:///(/\S+)|python (/\S+\.py)', block)
    paths = {Path(p) for groups in named for p in groups if p}
    assert out / "unet" in paths and out / "mlflow.db" in paths
    assert all(p.exists() for p in paths - {out / "report.png"}), sorted(paths)
    assert f"mlflow ui --backend-store-uri {uri}" in block
    report = next(line.strip() for line in block.splitlines() if "report.py --run" in line)
    assert f"--run {run_id} --tracking-uri {uri} --out {out / 'report.png'}" in report
    # The report command runs as printed, from the same directory, and writes into the run folder.
    # `python` is the venv's, as in an activated venv.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    done = subprocess.run(report, shell=True, cwd=elsewhere, capture_output=True, text=True, timeout=300,
                          executable="/bin/bash", env={**os.environ, "PATH": path})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "report.png").stat().st_size > 0 and list(elsewhere.iterdir()) == []
    # The printed diffusers code loads the trained UNet into a pipeline of the tiny base model.
    scope: dict = {}
    exec(_code(block).replace(f"{TINY_ASSETS}/sd15", str(tiny_base)), scope)
    image = scope["pipe"]("a red car", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)
