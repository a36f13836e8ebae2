"""`benchmarks/flow_step.py` runs its CPU path (tiny SD3 / FLUX transformers) end to end.

A measurement, not a test of timings: what is checked is that every (model, fine-tuning, objective)
row runs against the current library and writes finite numbers, and that an out-of-memory error
becomes a row status instead of ending the run, so the time-boxed GPU run in
`benchmarks/gpu_flow_step.sh` is ready when a GPU is at hand.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _flow_step():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import flow_step
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return flow_step


def test_tiny_run_writes_every_row_with_finite_numbers(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "platform"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "benchmarks" / "flow_step.py"), "--size", "tiny", "--steps", "2",
           "--warmup", "1", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "flow_step-cpu.json").read_text())
    assert (tmp_path / "flow_step-cpu.md").exists() and not res["partial"]
    rows = {(r["model"], r["finetune"], r["objective"]): r for r in res["rows"]}
    kinds = itertools.product(("sd3", "flux"), ("lora", "full", "full_bf16"), ("mapo", "dpo"))
    assert set(rows) == set(kinds)
    for key, r in rows.items():
        assert r["status"] == "ok", (key, r.get("error"))
        for name in ("median_ms", "q1_ms", "q3_ms", "peak_mib", "loss", "grad_norm", "build_s"):
            assert math.isfinite(r[name]), (key, name, r[name])
        assert r["median_ms"] > 0 and r["steps"] == 2 and 0 < r["trainable_params"] <= r["params"]
        # LoRA trains only the adapters; full fine-tuning every parameter.
        assert (r["trainable_params"] < r["params"]) == (key[1] == "lora")
    assert {(x["model"], x["finetune"]) for x in res["ratios"]} == {k[:2] for k in rows}


def test_out_of_memory_is_a_row_status(monkeypatch):
    fs = _flow_step()
    args = fs.parse_args(["--size", "tiny", "--steps", "1", "--warmup", "0"])

    def oom(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 GiB")

    monkeypatch.setattr(fs.Row, "step", oom)
    row = fs.run_row(args, "flux", "full", "dpo")
    assert row["status"] == "oom" and row["phase"] == "step" and "96.00 GiB" in row["error"]
    assert "median_ms" not in row and row["params"] > 0


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_full_size_configs_are_the_released_models(model):
    """Shapes only (meta device): SD3.5-Medium 2.24B parameters plus its 384 x 384 positional-embedding
    buffer (0.23B: the release's 2.5B), FLUX.1-dev 11.9B; LoRA r16 on the family targets."""
    fs = _flow_step()
    from diffalign.models.lora import add_lora, lora_targets

    t = fs.build_transformer(model, "full", 1024, torch.device("meta"), torch.float32)
    n = sum(p.numel() for p in t.parameters())
    add_lora(t, 16, 16, targets=lora_targets(model))
    lora = sum(p.numel() for p in t.parameters() if p.requires_grad)
    expected = {"sd3": (2_243_171_520, 9_388_032), "flux": (11_901_408_320, 44_826_624)}[model]
    assert (n, lora) == expected
    if model == "sd3":
        assert sum(b.numel() for b in t.buffers()) == 384 * 384 * 1536
