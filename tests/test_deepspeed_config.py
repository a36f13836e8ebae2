"""DeepSpeed config generation from the run config, and a real ZeRO-2 run on CPU.

The real run goes in a subprocess: DeepSpeed needs a torch.distributed process group, which must
not leak into the pytest process (other tests share it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from diffalign.actors.deepspeed_engine import deepspeed_config


def test_precision_follows_model_mixed_precision(tiny_cfg):
    none = deepspeed_config(tiny_cfg(), 1)  # default: model.mixed_precision no
    assert "bf16" not in none and "fp16" not in none
    assert deepspeed_config(tiny_cfg("model.mixed_precision=bf16"), 1)["bf16"] == {"enabled": True}
    fp16 = deepspeed_config(tiny_cfg("model.mixed_precision=fp16"), 1)["fp16"]
    assert fp16["enabled"] is True and fp16["loss_scale"] == 0  # dynamic loss scaling


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage(tiny_cfg, stage):
    conf = deepspeed_config(tiny_cfg(f"ray.zero_stage={stage}"), 2)
    assert conf["zero_optimization"]["stage"] == stage
    assert ("overlap_comm" in conf["zero_optimization"]) == (stage in (1, 2))
    assert conf["zero_allow_untested_optimizer"] is True


def test_default_stage_is_two(tiny_cfg):
    assert deepspeed_config(tiny_cfg(), 1)["zero_optimization"]["stage"] == 2


def test_batch_accumulation_and_clipping(tiny_cfg):
    conf = deepspeed_config(tiny_cfg("optim.batch_size=3", "optim.grad_accum=4", "optim.grad_clip=0.5"), 2)
    assert conf["train_micro_batch_size_per_gpu"] == 3
    assert conf["gradient_accumulation_steps"] == 4
    assert conf["train_batch_size"] == 3 * 4 * 2
    assert conf["gradient_clipping"] == 0.5
    assert deepspeed_config(tiny_cfg("optim.grad_clip=0"), 1)["gradient_clipping"] == 0.0


def test_offload_optimizer(tiny_cfg):
    conf = deepspeed_config(tiny_cfg("ray.offload_optimizer=true"), 1)
    assert conf["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert conf["zero_force_ds_cpu_optimizer"] is False  # keeps our torch AdamW
    assert "offload_optimizer" not in deepspeed_config(tiny_cfg(), 1)["zero_optimization"]
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(tiny_cfg("ray.offload_optimizer=true", "ray.zero_stage=0"), 1)
    with pytest.raises(ValueError, match="world_size"):
        deepspeed_config(tiny_cfg(), 0)


def test_config_is_json(tiny_cfg):
    conf = deepspeed_config(tiny_cfg("model.mixed_precision=bf16", "ray.offload_optimizer=true"), 4)
    assert json.loads(json.dumps(conf)) == conf


# A single-process ZeRO-2 run of the real loop: 2 steps, DeepSpeed checkpoint, restore into a fresh
# engine, 2 more steps; compared with 4 uninterrupted steps and with the plain torch engine.
SCRIPT = textwrap.dedent("""
    import json, sys, tempfile
    import torch, torch.distributed as dist
    from diffalign.config import load_config
    from diffalign.models.weights import state_fingerprint
    from diffalign.train.engine import build_optimizer
    from diffalign.train.driver import build_trainer
    from diffalign.train.setup import build_setup
    from diffalign.actors.deepspeed_engine import DeepSpeedEngineAdapter, optimizer_step_count
    from diffalign.actors.learner import restore_worker_checkpoint, write_worker_checkpoint

    out = sys.argv[1]
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = load_config(None, [f"train.output_dir={out}", "train.max_steps=4", "train.progress=false",
        "train.eval_every=0", "data.num_pairs=8", "data.heldout_pairs=4", "optim.batch_size=2",
        "tracking.mlflow=false", "model.finetune=full", "guard.enabled=false", "ray.backend=deepspeed",
        "ray.zero_stage=2", "optim.grad_clip=1.0"])

    def trainer(deepspeed=True):
        torch.manual_seed(cfg.train.seed)
        setup = build_setup(cfg)
        engine = None
        if deepspeed:
            params = [p for g in setup.param_groups for p in g["params"]]
            opt = build_optimizer(setup.param_groups, cfg.optim)
            engine = DeepSpeedEngineAdapter(setup.bundle.unet, params, opt, cfg, world_size=1)
        return build_trainer(cfg, setup=setup, engine=engine, checkpoint_dir=tempfile.mkdtemp())

    res = {}
    a = trainer()
    res["losses"] = [a.train_step()["loss"] for _ in range(2)]
    folder = write_worker_checkpoint(a, tempfile.mkdtemp(), 0, 1)
    metrics = [a.train_step() for _ in range(2)]
    res["losses"] += [m["loss"] for m in metrics]
    res["grad_norm"] = metrics[-1]["grad_norm"]
    res["straight"] = state_fingerprint(a.trainable_weights())
    b = trainer()
    restore_worker_checkpoint(b, folder, 0)
    res["restored_step"], res["restored_opt_steps"] = b.step, optimizer_step_count(b.engine)
    res["resumed_losses"] = [b.train_step()["loss"] for _ in range(2)]
    res["resumed"] = state_fingerprint(b.trainable_weights())
    res["files"] = sorted(p.name for p in (folder / "deepspeed" / "ds").iterdir())
    c = trainer(deepspeed=False)
    res["torch_losses"] = [c.train_step()["loss"] for _ in range(4)]
    print("RESULT" + json.dumps(res))
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_zero2_single_process_run_and_exact_resume(tmp_path):
    pytest.importorskip("deepspeed")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], env=env, capture_output=True,
                          text=True, timeout=400)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    res = json.loads(lines[-1][len("RESULT"):])
    assert res["restored_step"] == 2 and res["restored_opt_steps"] == 2
    assert res["resumed_losses"] == res["losses"][2:]            # bitwise: same weights, RNG, optimizer
    assert res["resumed"] == res["straight"]
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in res["files"]
    assert res["grad_norm"] > 0
    # DeepSpeed's flat fp32 partitions vs torch AdamW: the same math up to float rounding.
    assert res["losses"] == pytest.approx(res["torch_losses"], rel=1e-3, abs=1e-4)


@pytest.mark.slow
def test_zero2_two_ray_workers_resume_exactly_after_a_failure(ray_local, tiny_cfg):
    """ZeRO-2 under Ray Train with 2 workers: every rank's optimizer shard is checkpointed, Ray
    merges them, and a restarted group reproduces the lost step bit for bit."""
    pytest.importorskip("deepspeed")
    from diffalign.actors.learner import FaultInjection, effective_steps, read_step_log, train_with_ray

    cfg = tiny_cfg("ray.backend=deepspeed", "ray.zero_stage=2", "ray.num_learners=2", "train.max_steps=3",
                   "train.checkpoint_every=2", "optim.batch_size=2", "data.num_pairs=8")
    out = train_with_ray(cfg, fault=FaultInjection(kill_at_step=3, rank=1))
    assert out["step"] == 3 and out["ranks_in_sync"]
    log = read_step_log(out["step_log"])
    starts = [r for r in log if r["event"] == "start"]
    assert len(starts) == 2 and starts[1]["restored_step"] == 2
    assert effective_steps(log) == [1, 2, 3]
    third = [r for r in log if r["event"] == "step" and r["step"] == 3]
    assert len(third) == 2 and third[0]["fingerprint"] == third[1]["fingerprint"]
    assert third[0]["loss"] == third[1]["loss"]
    shards = sorted(p.name for p in (Path(out["checkpoint"]) / "deepspeed" / "ds").iterdir())
    assert shards == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                      "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_learner_rejects_zero3(tiny_cfg):
    from diffalign.actors.learner import build_engine
    from diffalign.train.driver import Runtime

    cfg = tiny_cfg("ray.backend=deepspeed", "ray.zero_stage=3")
    with pytest.raises(ValueError, match="zero_stage=3"):
        fake_setup = type("S", (), {"param_groups": [], "bundle": None})()
        build_engine(cfg, fake_setup, Runtime(world_size=1))
