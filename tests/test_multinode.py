"""Placement on a real multi-node Ray cluster (`ray.cluster_utils.Cluster`: a head and worker nodes on
this host, each a raylet with its own resources): the per-node fit check, the driver's side placement
group, and a node removed in the middle of a run.

Each scenario runs in a subprocess (`python tests/test_multinode.py <scenario> <folder> <result.json>`):
a process can hold one Ray connection, and the test session's own cluster (`ray_local`) may already be
connected in this one. The subprocess gets its own Ray temp dir (RAY_TMPDIR: the Cluster writes its
address file under the default one) and stops every node it started; the test asserts on the JSON it
writes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV_VARS = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "RAY_AUTH_MODE": "disabled"}
# Faster node-death detection than Ray's defaults (15 s and more): the removed node is noticed in a
# few seconds, so the restart is not spent waiting.
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                 "health_check_timeout_ms": 1000}
TINY = ["train.max_steps=4", "train.progress=false", "train.eval_every=0", "data.num_pairs=16",
        "data.heldout_pairs=8", "optim.batch_size=4", "tracking.mlflow=false", "model.finetune=full",
        "guard.enabled=false"]  # as tests/conftest.py's tiny_cfg


# --------------------------------------------------------------------------- the parent: pytest

def _run_scenario(name: str, folder: Path, timeout_s: float) -> dict:
    """Runs scenario `name` in a subprocess (its own process group, killed whole on timeout)."""
    ray_tmp = tempfile.mkdtemp(prefix="mn", dir="/tmp")  # short: Ray's socket paths must stay < 107 chars
    out, log = folder / f"{name}.json", folder / f"{name}.log"
    env = {**os.environ, **ENV_VARS, "RAY_TMPDIR": ray_tmp}
    try:
        with log.open("w") as f:
            proc = subprocess.Popen([sys.executable, __file__, name, str(folder), str(out)], env=env,
                                    stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                pytest.fail(f"scenario {name} did not finish within {timeout_s:g} s; log tail:\n"
                            f"{log.read_text()[-4000:]}")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if rc != 0 or not out.exists():
        pytest.fail(f"scenario {name} exited with {rc}; log tail:\n{log.read_text()[-6000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def placement_scenario(tmp_path_factory) -> dict:
    return _run_scenario("placement", tmp_path_factory.mktemp("multinode"), timeout_s=300)


def test_a_learner_no_node_fits_fails_at_once_on_a_real_cluster(placement_scenario):
    r = placement_scenario
    assert r["nodes"] == 3 and r["total_cpus"] == 3.0  # 3 CPUs in all for a 2-CPU learner: the sums fit
    assert r["sum_check_passed"]
    assert r["fit_error_type"] == "DoesNotFit" and r["fit_error_role"] == "learner"
    msg = r["fit_error"]
    assert msg.startswith("learner 1 of 1 needs {CPU: 2} on one node; no node has it (node "), msg
    assert msg.count("has CPU 1 of 1 free") == 3, msg  # each node, by name, with its CPUs
    assert r["fit_error_s"] < 5, r["fit_error_s"]  # at once, not after ray.placement_timeout_s (300 s)


def test_side_actors_are_placed_in_the_drivers_group_and_it_is_removed(placement_scenario):
    r = placement_scenario
    side = r["side"]
    pg = side["placement_group_id"]
    assert side["strategy"] == "PACK" and side["bundles"] == [{"CPU": 1.0}] * 3
    # One bundle per actor: sampler 0, sampler 1, reference. 1 CPU per node, so one per node.
    assert len(set(side["bundle_nodes"].values())) == 3
    assert side["reference"]["placement_group_id"] == pg
    assert side["reference"]["node_id"] == side["bundle_nodes"]["2"]
    for i in range(2):
        assert side["sampler_nodes"][i] == side["bundle_nodes"][str(i)]
    # Each actor holds its own bundle's CPU (Ray's per-bundle resource is used up).
    assert side["bundle_cpu_free"] == {"0": 0.0, "1": 0.0, "2": 0.0}
    assert side["state_before_remove"] == "CREATED" and side["state_after_remove"] == "REMOVED"
    assert len(side["actor_states_after_remove"]) == 3 and "ALIVE" not in side["actor_states_after_remove"]
    assert r["placement_groups_left"] == []


@pytest.mark.slow
def test_a_node_removed_mid_run_the_learners_restart_on_the_others_exactly(tmp_path):
    r = _run_scenario("node_loss", tmp_path, timeout_s=540)
    print("node_loss timings:", {k: round(r[k], 1) for k in ("uninterrupted_s", "interrupted_s", "wall_s")})
    steps = list(range(1, r["max_steps"] + 1))
    whole, cut = r["uninterrupted"], r["interrupted"]
    assert whole["effective_steps"] == steps and whole["starts"] == 1
    # The node hosting a learner went away after the step-2 checkpoint was committed ...
    assert r["removed_node"] in r["attempt_nodes"][0] and r["removed_node"] != r["driver_node"]
    assert r["committed_before_removal"] >= 1
    # ... Ray Train restarted the group once, from that checkpoint, on the nodes that are left ...
    assert cut["starts"] == 2 and cut["restored_steps"] == [0, 2], cut
    assert len(r["attempt_nodes"]) == 2 and r["removed_node"] not in r["attempt_nodes"][1]
    assert r["alive_nodes_after"] == 2
    # ... and the run ends exactly where the uninterrupted run on the same cluster ends.
    assert cut["effective_steps"] == steps
    assert cut["step"] == whole["step"] == r["max_steps"]
    assert cut["ranks_in_sync"] and whole["ranks_in_sync"]
    assert cut["rank_fingerprints"] == whole["rank_fingerprints"]
    assert cut["losses"] == whole["losses"]


# --------------------------------------------------------------------------- the subprocess

def _config(folder: Path, *overrides: str):
    from diffalign.config import load_config

    return load_config(None, [f"train.output_dir={folder}", *TINY, *overrides])


def _cluster(cpus: tuple[int, ...]):
    """A head and len(cpus) - 1 worker nodes; node i has cpus[i] CPUs and one `node_slot`."""
    from ray.cluster_utils import Cluster

    head = {"num_cpus": cpus[0], "resources": {"node_slot": 1}, "include_dashboard": False,
            "object_store_memory": 100 << 20, "_system_config": SYSTEM_CONFIG}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    workers = [cluster.add_node(num_cpus=c, resources={"node_slot": 1}, object_store_memory=100 << 20)
               for c in cpus[1:]]
    cluster.wait_for_nodes()
    return cluster, workers


def _connect(cluster) -> None:
    import ray

    ray.init(address=cluster.address, runtime_env={"env_vars": dict(ENV_VARS)}, log_to_driver=False)


def _wait(what: str, predicate, timeout_s: float, every_s: float = 0.5):
    """Polls `predicate` until it returns something true; raises naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:g} s for {what}")
        time.sleep(every_s)


def scenario_placement(folder: Path) -> dict:
    import functools

    import ray
    from diffalign.actors.cluster import ensure_ray
    from diffalign.actors.placement import SidePlacement, alive_nodes
    from diffalign.actors.reference_actor import spawn_reference_actor
    from diffalign.actors.resources import check_fits
    from diffalign.actors.sampler import create_samplers, kill_actors
    from ray.util.placement_group import placement_group_table

    cluster, _ = _cluster((1, 1, 1))
    result: dict = {}
    try:
        _connect(cluster)
        result["nodes"] = len(alive_nodes())
        result["total_cpus"] = ray.cluster_resources()["CPU"]
        big = _config(folder / "big", "ray.enabled=true", "ray.cpus_per_learner=2")
        check_fits(big, ray.cluster_resources())  # the old sum check lets it through
        result["sum_check_passed"] = True
        t0 = time.monotonic()
        try:
            ensure_ray(big)
        except Exception as exc:  # noqa: BLE001 - recorded for the test to check
            result.update(fit_error=str(exc), fit_error_type=type(exc).__name__,
                          fit_error_role=getattr(exc, "role", None), fit_error_s=time.monotonic() - t0)

        side_cfg = _config(folder / "side", "online.enabled=true", "data.kind=folder",
                           f"data.path={ROOT}/examples/tiny_subject", "data.prompt=a photo of sks toy",
                           "objective.name=dpo", "reference.strategy=frozen", "reference.placement=actor",
                           "ray.sampler.num=2", "ray.sampler.num_cpus=1", "ray.reference_cpus=1",
                           "ray.sampler.inference_steps=2", "ray.placement_timeout_s=120")
        placement = SidePlacement(side_cfg).start()
        pg = placement.placement_group
        pg_hex = pg.id.hex()
        ref = spawn_reference_actor(side_cfg, fresh=True, **placement.actor_options("reference"))
        board, samplers = create_samplers(side_cfg, options_for=functools.partial(placement.actor_options,
                                                                                  "sampler"))
        info = ray.get(ref.info.remote(), timeout=240)
        ray.get([s.info.remote() for s in samplers], timeout=240)
        table = placement_group_table(pg)
        actors = ray._private.state.actors()
        free = ray.available_resources()
        result["side"] = {
            "placement_group_id": pg_hex, "strategy": table["strategy"], "bundles": placement.bundles,
            "bundle_nodes": {str(k): v for k, v in table["bundles_to_node_id"].items()},
            "reference": {"node_id": info["node_id"], "placement_group_id": info["placement_group_id"]},
            "sampler_nodes": [actors[s._actor_id.hex()]["Address"]["NodeID"] for s in samplers],
            "bundle_cpu_free": {str(i): free.get(f"CPU_group_{i}_{pg_hex}", 0.0) for i in range(3)},
            "state_before_remove": table["state"],
        }
        placement.remove()
        result["side"]["state_after_remove"] = _wait(
            "the side placement group to be removed",
            lambda: placement_group_table(pg)["state"] == "REMOVED" and "REMOVED", 60)
        ids = [ref._actor_id.hex()] + [s._actor_id.hex() for s in samplers]

        def states() -> list[str]:
            return [ray._private.state.actors(i)["State"] for i in ids]

        # Ray kills the actors of a removed group (restartable ones then wait for a group that is gone).
        _wait("the side actors to stop with their group", lambda: "ALIVE" not in states(), 60)
        result["side"]["actor_states_after_remove"] = states()
        kill_actors(board, ref, *samplers)
        result["placement_groups_left"] = [k for k, v in placement_group_table().items()
                                           if v["state"] != "REMOVED"]
    finally:
        ray.shutdown()
        cluster.shutdown()
    return result


def _node_probe_class():
    from diffalign.train.protocols import Callback

    return Callback


class _NodeProbe(_node_probe_class()):
    """Trainer callback (pickled by value from this `__main__`): records each worker's node at its
    start; with `pause_at`, rank 0 waits for Ray to commit the checkpoints reported so far, says so,
    and every rank waits (bounded) for the driver to remove a node. The restarted workers see the
    `removed` marker and train on."""

    def __init__(self, folder: str, rank: int, pause_at: int | None, wait_s: float = 240.0) -> None:
        self.folder, self.rank, self.pause_at, self.wait_s = Path(folder), rank, pause_at, wait_s

    def on_start(self, trainer) -> None:
        import ray

        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"rank": self.rank, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                  "step": trainer.step, "time": time.time()}
        (self.folder / f"node-{time.time_ns()}-rank{self.rank}.json").write_text(json.dumps(record))

    def on_step(self, trainer, metrics: dict) -> None:
        removed = self.folder / "removed"
        if self.pause_at is None or trainer.step != self.pause_at or removed.exists():
            return
        if self.rank == 0:
            from ray.train import CheckpointConsistencyMode, get_all_reported_checkpoints

            done = get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED,
                                                timeout_s=120)
            (self.folder / "committed").write_text(json.dumps({"count": len(done)}))
        deadline = time.monotonic() + self.wait_s
        while not removed.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank {self.rank}: no node was removed within {self.wait_s:g} s")
            time.sleep(0.2)


class _Probes:
    """`callbacks_factory` for train_with_ray."""

    def __init__(self, folder: str, pause_at: int | None) -> None:
        self.folder, self.pause_at = folder, pause_at

    def __call__(self, cfg, rank: int) -> list:
        return [_NodeProbe(self.folder, rank, self.pause_at)]


def _attempt_nodes(folder: Path) -> list[set[str]]:
    """Node ids per attempt, in order: each attempt starts from another step here (0, then 2)."""
    attempts: dict[int, set[str]] = {}
    for p in folder.glob("node-*.json"):
        rec = json.loads(p.read_text())
        attempts.setdefault(rec["step"], set()).add(rec["node_id"])
    return [attempts[k] for k in sorted(attempts)]


def _summary(out: dict) -> dict:
    from diffalign.actors.learner import effective_steps, read_step_log

    records = read_step_log(out["step_log"])
    starts = [r for r in records if r["event"] == "start"]
    final_losses: dict[int, float] = {}
    for rec in records:  # the loss of each step as it survives into the final state (redone steps win)
        if rec["event"] == "step":
            final_losses[rec["step"]] = rec["loss"]
    return {"effective_steps": effective_steps(records), "starts": len(starts),
            "restored_steps": [r["restored_step"] for r in starts], "step": out["step"],
            "rank_fingerprints": out["rank_fingerprints"], "ranks_in_sync": out["ranks_in_sync"],
            "losses": [final_losses[s] for s in sorted(final_losses)]}


def scenario_node_loss(folder: Path) -> dict:
    import ray
    from diffalign.actors.learner import train_with_ray
    from diffalign.actors.placement import alive_nodes

    max_steps = 6
    cluster, workers = _cluster((2, 2, 2))  # each node fits one 2-CPU learner
    result: dict = {"max_steps": max_steps}
    try:
        _connect(cluster)
        result["driver_node"] = ray.get_runtime_context().get_node_id()
        run = ("ray.enabled=true", "ray.num_learners=2", "ray.cpus_per_learner=2",
               f"train.max_steps={max_steps}", "train.checkpoint_every=2", "optim.batch_size=2",
               "ray.max_failures=1", "ray.placement_timeout_s=120")
        t0 = time.monotonic()
        whole = train_with_ray(_config(folder / "whole", *run),
                               callbacks_factory=_Probes(str(folder / "probe-whole"), None))
        result["uninterrupted"] = _summary(whole)
        result["uninterrupted_s"] = time.monotonic() - t0

        probes = folder / "probe-cut"
        removal: dict = {}

        def remove_a_learner_node() -> None:
            try:
                marker = probes / "committed"
                _wait("rank 0 to see a committed checkpoint", marker.exists, 300)
                removal["committed"] = json.loads(marker.read_text())["count"]
                learners = _attempt_nodes(probes)[0]
                node = next(n for n in workers if n.node_id in learners)  # never the driver's (head) node
                cluster.remove_node(node, allow_graceful=False)  # a crash: raylet and workers killed
                removal["node"] = node.node_id
                removal["time"] = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - reported through the result
                removal["error"] = repr(exc)
            finally:
                (probes / "removed").write_text(json.dumps(removal))

        remover = threading.Thread(target=remove_a_learner_node, daemon=True)
        remover.start()
        t0 = time.monotonic()
        cut = train_with_ray(_config(folder / "cut", *run), callbacks_factory=_Probes(str(probes), 3))
        remover.join(timeout=60)
        if "error" in removal:
            raise RuntimeError(f"removing the node failed: {removal['error']}")
        result["interrupted"] = _summary(cut)
        result["interrupted_s"] = time.monotonic() - t0
        result["removed_node"] = removal["node"]
        result["committed_before_removal"] = removal["committed"]
        result["attempt_nodes"] = [sorted(a) for a in _attempt_nodes(probes)]
        result["alive_nodes_after"] = len(alive_nodes())
    finally:
        ray.shutdown()
        cluster.shutdown()
    return result


if __name__ == "__main__":
    os.environ.update(ENV_VARS)
    import torch

    torch.set_num_threads(1)
    scenario, where, out_path = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    started = time.monotonic()
    output = {"placement": scenario_placement, "node_loss": scenario_node_loss}[scenario](where)
    output["wall_s"] = time.monotonic() - started
    Path(out_path).write_text(json.dumps(output, indent=2, default=str))
