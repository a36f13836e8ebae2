"""periodic_threshold across data-parallel ranks: one decision for all ranks (DDP and DeepSpeed), and
the Ray-actor reference deciding as the colocated ones do.

The two-rank runs go in subprocesses on a gloo group (a process group must not leak into the pytest
process). Each rank trains on its own shard of the data, so each rank's probe set differs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

# Per rank: (A) each rank decides alone with an unreachable bound, which gives the estimate each
# rank alone would make at the first check; (B) alone, with delta between the two ranks' estimates
# and below their mean; (C) pooled, with the same delta. (C) also drives the Ray-actor client
# (RemoteReference with a ReferenceServer standing in for the actor on rank 0).
SCRIPT = textwrap.dedent("""
    import json, sys, types
    import torch, torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from diffalign.actors import reference_actor
    from diffalign.actors.learner import build_engine
    from diffalign.config import load_config
    from diffalign.models.weights import state_fingerprint, trainable_state_dict
    from diffalign.train.driver import Runtime, build_trainer

    out, backend, divergence = sys.argv[1], sys.argv[2], sys.argv[3]
    TAU = 2
    base = [f"train.output_dir={out}/run", "train.progress=false", "train.eval_every=0", "data.num_pairs=16",
            "data.heldout_pairs=4", "optim.batch_size=2", "tracking.mlflow=false", "model.finetune=full",
            "guard.enabled=false", "objective.beta=500", "optim.lr=2e-3", "train.checkpoint_every=1000",
            "reference.strategy=periodic_threshold", f"reference.tau={TAU}", "reference.divergence_samples=4",
            f"reference.divergence={divergence}", f"ray.backend={backend}"]

    def trainer(sync, delta, name):
        cfg = load_config(None, base + [f"reference.delta={delta}", f"reference.delta_eps_mse={delta}"])
        t = build_trainer(cfg, Runtime(device="cpu", rank=rank, world_size=2, engine_factory=build_engine,
                                       checkpoint_dir=f"{out}/{name}-{rank}", track=False))
        t.setup.reference.sync_ranks = sync
        return t

    def record(t, m):
        ref = t.setup.reference
        return {"step": t.step, "frozen": ref.frozen, "version": ref.version,
                "div": m.get("ref/divergence"), "stderr": m.get("ref/divergence_stderr"),
                "n": m.get("ref/divergence_n"), "ref": state_fingerprint(ref.reference_state()),
                "policy": state_fingerprint(t.trainable_weights())}

    a = trainer(False, 1e6, "a")
    res = {"rank": rank, "engine": type(a.engine).__name__, "forward": type(a.engine.forward_module).__name__}
    for _ in range(TAU):
        m = a.train_step()
    res["alone"] = record(a, m)
    alone = [None, None]
    dist.all_gather_object(alone, res["alone"]["div"])
    lo, hi = min(alone), max(alone)
    delta = lo + 0.25 * (hi - lo)  # one rank's probe is past it, the other's not; their mean is past it
    res["delta"] = delta

    b = trainer(False, delta, "b")
    res["b"] = [record(b, b.train_step()) for _ in range(2 * TAU)]

    c = trainer(True, delta, "c")
    server = reference_actor.ReferenceServer(c.cfg) if rank == 0 else None
    reference_actor.ray = types.SimpleNamespace(get=lambda x, timeout=None: x)  # in-process transport
    actor = None
    if server is not None:
        actor = types.SimpleNamespace(on_step=types.SimpleNamespace(remote=server.on_step))
    remote = reference_actor.RemoteReference(actor, c.cfg, driver=rank == 0)
    remote._weights_fn = lambda: trainable_state_dict(c.setup.bundle.unet)
    res["c"], res["actor"] = [], []
    for _ in range(2 * TAU):
        m = c.train_step()
        res["c"].append(record(c, m))
        am = remote.on_step(c.step, c.setup.step._probe, world_size=2)
        keys = ("ref/divergence", "ref/divergence_stderr", "ref/divergence_n", "ref/frozen", "ref/version")
        res["actor"].append({k: am.get(k) for k in keys})
        if c.step == TAU:
            # By hand on this rank: the pooled set's predictions of the policy and of the initial model.
            ref = c.setup.reference
            p, unet = ref.probe, c.setup.bundle.unet.eval()
            with torch.no_grad():
                pred = unet(p["noisy"], p["timesteps"], **p["cond"].unet_kwargs()).sample
                init = ref.init_unet(p["noisy"], p["timesteps"], **p["cond"].unet_kwargs()).sample
            unet.train()
            if divergence == "eps_mse":
                per = (pred - init).pow(2).flatten(1).mean(1)
            else:
                per = ((pred - p["target"]).pow(2).flatten(1).mean(1)
                       - (init - p["target"]).pow(2).flatten(1).mean(1))
            res["by_hand"] = per.double().tolist()
    print("RESULT" + json.dumps(res), flush=True)
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(tmp_path, backend: str, divergence: str) -> list[dict]:
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-c", SCRIPT, str(tmp_path), backend, divergence]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT")]
        assert proc.returncode == 0 and lines, stderr[-4000:]
        results.append(json.loads(lines[-1][len("RESULT"):]))
    return sorted(results, key=lambda r: r["rank"])


def _check(results: list[dict], tau: int = 2) -> None:
    r0, r1 = results
    e0, e1 = r0["alone"]["div"], r1["alone"]["div"]
    delta = r0["delta"]
    assert r0["delta"] == r1["delta"]
    # the two ranks' own probes straddle delta: one past it, one within
    assert min(e0, e1) < delta < max(e0, e1) and abs(e0 - e1) > 1e-3 * max(abs(e0), abs(e1))
    # and both ranks had identical policies (DDP / ZeRO keep them equal)
    assert r0["alone"]["policy"] == r1["alone"]["policy"]

    # Negative control: deciding per rank on the same data, the ranks diverge at the first check.
    b0, b1 = r0["b"][tau - 1], r1["b"][tau - 1]
    assert (b0["div"], b1["div"]) == (e0, e1)  # the same runs up to the check
    assert b0["frozen"] != b1["frozen"] and b0["ref"] != b1["ref"]
    assert r0["b"][-1]["ref"] != r1["b"][-1]["ref"]

    # Pooled: the mean over both ranks' probes, the same decision and reference on both ranks.
    c0, c1 = r0["c"], r1["c"]
    pooled = (e0 + e1) / 2  # equal counts; each sample's noise depends on its own rank only
    first = c0[tau - 1]
    assert first["n"] == 8.0 and first["div"] == pytest.approx(pooled, rel=1e-5, abs=1e-9)
    assert first["div"] > delta  # the mean is past delta: both freeze
    for a, b in zip(c0, c1):
        assert a == b  # step, frozen, version, estimate, stderr, reference and policy weights
    assert [s["frozen"] for s in c0] == [False] * (tau - 1) + [True] * (len(c0) - tau + 1)
    assert all(s["version"] == 0 for s in c0)

    # The same numbers by hand on each rank's copy of the pooled set (mean and sample std / sqrt(n)).
    for r in results:
        per = torch.tensor(r["by_hand"], dtype=torch.float64)
        assert len(per) == 8
        assert first["div"] == pytest.approx(float(per.mean()), rel=1e-5, abs=1e-8)
        assert first["stderr"] == pytest.approx(float(per.std() / 8**0.5), rel=1e-4)

    # The Ray-actor client on the same ranks: rank 0's actor decides as the colocated ranks did.
    for a, c in zip(r0["actor"], c0):
        assert a["ref/frozen"] == float(c["frozen"]) and a["ref/version"] == float(c["version"])
        if c["div"] is not None:
            assert a["ref/divergence"] == pytest.approx(c["div"], rel=1e-6, abs=1e-9)
            assert a["ref/divergence_stderr"] == pytest.approx(c["stderr"], rel=1e-5)
            assert a["ref/divergence_n"] == 8.0


@pytest.mark.parametrize("divergence", ["eps_mse", "signed"])
def test_two_ddp_ranks_freeze_at_the_same_step(tmp_path, divergence):
    results = _two_ranks(tmp_path, "ddp", divergence)
    assert {(r["engine"], r["forward"]) for r in results} == {("TorchEngine", "DistributedDataParallel")}
    if divergence == "signed" and max(r["alone"]["div"] for r in results) <= 0:
        pytest.fail("signed estimates are <= 0 on both ranks: no positive delta between them")
    _check(results)


@pytest.mark.slow
def test_two_deepspeed_ranks_freeze_at_the_same_step(tmp_path):
    """ZeRO-2 (actors.deepspeed_engine) changes the engine only: the reference, its probe set and its
    pooled decision are the same code as with DDP."""
    pytest.importorskip("deepspeed")
    results = _two_ranks(tmp_path, "deepspeed", "eps_mse")
    assert {r["engine"] for r in results} == {"DeepSpeedEngineAdapter"}
    _check(results)


# --------------------------------------------------------------------------- Ray actor, one learner

@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_reference_actor_takes_the_colocated_decisions(ray_local, tiny_cfg, one_thread):
    from diffalign.actors.reference_actor import RemoteReference, spawn_reference_actor
    from diffalign.train.driver import build_trainer

    cfg = tiny_cfg("reference.strategy=periodic_threshold", "reference.tau=2", "reference.divergence=eps_mse",
                   "reference.delta=0.5", "reference.divergence_samples=4", "optim.batch_size=2",
                   "data.num_pairs=8", "optim.lr=2e-3", "train.max_steps=8")
    keys = ("loss", "ref/version", "ref/frozen", "ref/divergence", "ref/divergence_stderr")
    runs = {}
    for placement in ("colocated", "actor"):
        actor = spawn_reference_actor(cfg) if placement == "actor" else None
        trainer = build_trainer(cfg, reference=None if actor is None else RemoteReference(actor, cfg))
        runs[placement] = [tuple(m.get(k) for k in keys) for m in (trainer.train_step() for _ in range(8))]
        if actor is not None:
            ray_local.kill(actor)
    col, act = runs["colocated"], runs["actor"]
    assert [r[1:3] for r in act] == [r[1:3] for r in col]
    assert col[1][1] == 1.0 and col[3][1] == 2.0 and col[-1][2] == 1.0  # adopted at steps 2, 4; froze later
    for a, c in zip(act, col):
        assert a[0] == c[0]
        if c[3] is not None:
            assert a[3] == pytest.approx(c[3], rel=1e-6) and a[4] == pytest.approx(c[4], rel=1e-5)
