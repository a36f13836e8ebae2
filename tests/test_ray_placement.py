"""Learners the cluster cannot place fail after ray.placement_timeout_s, naming what they asked for and
what the cluster has; they never wait (or let Ray Train retry) forever."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from diffalign.config import ConfigError, load_config

TIMEOUT_S = 3  # the bound under test: small, so the test stays short


def test_placement_timeout_is_a_validated_config_field(tiny_cfg):
    assert load_config(None, []).ray.placement_timeout_s == 300
    assert tiny_cfg("ray.placement_timeout_s=7.5").ray.placement_timeout_s == 7.5
    with pytest.raises(ConfigError, match=r"ray\.placement_timeout_s must be > 0"):
        tiny_cfg("ray.placement_timeout_s=0")


def test_sweep_concurrency_fits_the_learners_of_every_running_trial(tiny_cfg):
    from diffalign.actors.sweep import concurrent_trials

    cfg = tiny_cfg("tune.max_concurrent=4", "ray.num_learners=2")
    assert concurrent_trials(cfg, {"CPU": 16.0}) == 4
    assert concurrent_trials(cfg, {"CPU": 4.0}) == 1  # 2 x (2 learners + the trial driver) > 4 CPUs
    assert concurrent_trials(cfg, {"CPU": 2.0}) == 1  # never 0: check_fits refuses what never fits
    gpu = tiny_cfg("tune.max_concurrent=8", "ray.use_gpu=true")
    assert concurrent_trials(gpu, {"CPU": 64.0, "GPU": 3.0}) == 3


def test_is_placement_timeout_sees_through_wrappers():
    from diffalign.actors.learner import is_placement_timeout
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    assert is_placement_timeout(ControllerError(WorkerGroupStartupTimeoutError(num_workers=2)))
    try:
        raise RuntimeError("trial failed") from ControllerError(WorkerGroupStartupTimeoutError(num_workers=1))
    except RuntimeError as e:
        assert is_placement_timeout(e)
    assert not is_placement_timeout(ControllerError(ValueError("bad worker")))
    assert not is_placement_timeout(None)


@pytest.mark.slow
def test_a_learner_larger_than_the_cluster_fails_at_once_naming_the_resources(tiny_cfg, ray_local):
    from diffalign.actors.learner import train_with_ray

    total = ray_local.cluster_resources()["CPU"]
    cfg = tiny_cfg("ray.enabled=true", f"ray.cpus_per_learner={total + 4:g}",
                   f"ray.placement_timeout_s={TIMEOUT_S}")
    t0 = time.monotonic()
    # The session cluster is one node: the per-node check names the learner and the node's CPUs.
    need = rf"learner 1 of 1 needs \{{CPU: {total + 4:g}\}} on one node; "
    with pytest.raises(ConfigError, match=need + rf"no node has it \(node [0-9.]+:\w+ has CPU [0-9.]+ of "
                                                 rf"{total:g} free"):
        train_with_ray(cfg)
    assert time.monotonic() - t0 < TIMEOUT_S


@pytest.mark.slow
def test_learners_that_cannot_be_placed_fail_within_the_bound(tiny_cfg, ray_local, tmp_path):
    """The sweep hang: something (here a placement group, there a leaked one) holds the CPUs the run's
    learners need. Ray Train would retry the worker-group startup forever ("max allowed: inf")."""
    from diffalign.actors.learner import PlacementTimeoutError, train_with_ray
    from diffalign.actors.sweep import run_sweep
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    total = ray_local.cluster_resources()["CPU"]
    hold = placement_group([{"CPU": total - 1}])
    ray_local.get(hold.ready(), timeout=60)
    try:
        cfg = tiny_cfg("ray.enabled=true", "ray.num_learners=1", "ray.cpus_per_learner=2",
                       f"ray.placement_timeout_s={TIMEOUT_S}", "tracking.mlflow=true")
        t0 = time.monotonic()
        with pytest.raises(PlacementTimeoutError) as info:
            train_with_ray(cfg)
        elapsed = time.monotonic() - t0
        message = str(info.value)
        assert f"ray.placement_timeout_s={TIMEOUT_S} s" in message
        assert 'asked for 1 learner(s) x {"CPU": 2} (CPU 2 in all)' in message
        assert f"the cluster has CPU 1 free of {total:g}" in message
        # The bound, plus Ray Train's controller start-up and shutdown on 2 shared cores.
        assert TIMEOUT_S <= elapsed < TIMEOUT_S + 60, elapsed
        # The MLflow record of the run that never started is not left RUNNING.
        from diffalign.tracking import read_record, tracking_uri
        from mlflow.tracking import MlflowClient

        record = read_record(cfg)
        if record:
            assert MlflowClient(tracking_uri(cfg)).get_run(record["run_id"]).info.status == "FAILED"

        # A sweep whose trials cannot place their learners fails too, naming them, instead of looping.
        sweep = load_config(Path(__file__).resolve().parents[1] / "configs/tiny/sweep.yaml", [
            f"train.output_dir={tmp_path}/sweep", "train.max_steps=2", "tune.num_samples=1",
            "ray.cpus_per_learner=2", f"ray.placement_timeout_s={TIMEOUT_S}", "data.num_pairs=8",
            "data.heldout_pairs=4"])
        t0 = time.monotonic()
        with pytest.raises(PlacementTimeoutError, match=r"1 of 1 sweep trials failed: Ray Train learners "
                                                        r"of run .* could not be placed"):
            run_sweep(sweep)
        assert time.monotonic() - t0 < TIMEOUT_S + 90
    finally:
        remove_placement_group(hold)
    # Nothing the runs created is left holding resources.
    pending = [pg for pg in placement_group_table().values() if pg["state"] not in ("REMOVED",)
               and pg["placement_group_id"] != hold.id.hex()]
    assert not pending, pending


# --------------------------------------------------------------------------- the per-node check

def _nodes(*cpus: float, gpus: tuple[float, ...] = ()) -> list:
    """A fake node list: node i has cpus[i] CPUs (and gpus[i] GPUs), all free."""
    from diffalign.actors.placement import NodeInfo

    out = []
    for i, c in enumerate(cpus):
        total = {"CPU": float(c), "memory": 1e9}
        if i < len(gpus):
            total["GPU"] = float(gpus[i])
        out.append(NodeInfo(f"{i:02d}abcdef{i:02d}", "10.0.0.1", total, dict(total)))
    return out


def _online(tiny_cfg, *overrides: str):
    root = Path(__file__).resolve().parents[1]
    return tiny_cfg("online.enabled=true", "data.kind=folder", f"data.path={root}/examples/tiny_subject",
                    "data.prompt=a photo of sks toy", "objective.name=mapo", "reference.strategy=none",
                    *overrides)


def test_a_learner_bigger_than_every_node_fails_though_the_sums_fit(tiny_cfg):
    from diffalign.actors.placement import DoesNotFit, plan
    from diffalign.actors.resources import check_fits

    cfg = tiny_cfg("ray.num_learners=2", "ray.cpus_per_learner=3")
    nodes = _nodes(2, 2, 2)
    check_fits(cfg, {"CPU": 6.0})  # the negative control: 6 CPUs in all, 6 asked for
    with pytest.raises(DoesNotFit) as info:
        plan(cfg, nodes)
    msg = str(info.value)
    assert msg.startswith("learner 1 of 2 needs {CPU: 3} on one node; no node has it (node 10.0.0.1:00abcd "
                          "has CPU 2 of 2 free; "), msg
    assert msg.count("has CPU 2 of 2 free") == 3 and "lower ray.cpus_per_learner" in msg
    assert (info.value.role, info.value.index) == ("learner", 0)
    assert isinstance(info.value, ConfigError)
    # 2 CPUs each fit: one learner per node, the third node left empty.
    fit = plan(tiny_cfg("ray.num_learners=2", "ray.cpus_per_learner=2"), nodes)
    assert [fit.where[("learner", i)] for i in range(2)] == [nodes[0].node_id, nodes[1].node_id]
    # 6 CPUs in all for 3 x 2, but the third learner does not fit what the first two leave.
    three = tiny_cfg("ray.num_learners=3", "ray.cpus_per_learner=2")
    check_fits(three, {"CPU": 6.0})
    with pytest.raises(DoesNotFit, match=r"learner 3 of 3 needs \{CPU: 2\} on one node; no node has it left "
                                         r"once the actors before it are placed \(node 10\.0\.0\.1:00abcd "
                                         r"has CPU 1 of 3 left after the actors before it \(3 free right "
                                         r"now\)"):
        plan(three, _nodes(3, 3))


def test_gpu_learners_fractions_and_strategies(tiny_cfg):
    from diffalign.actors.placement import DoesNotFit, plan

    half = tiny_cfg("ray.use_gpu=true", "ray.num_learners=2", "ray.gpus_per_learner=0.5")
    fit = plan(half, _nodes(4, 4, gpus=(1, 0)))  # two half-GPU learners share the one GPU
    assert fit.nodes_of("learner") == {"00abcdef00"}
    whole = tiny_cfg("ray.use_gpu=true", "ray.num_learners=2")
    with pytest.raises(DoesNotFit, match=r"learner 2 of 2 needs \{CPU: 1, GPU: 1\}.*GPU 0 of 1 left"):
        plan(whole, _nodes(4, 4, gpus=(1, 0)))
    spread = tiny_cfg("ray.num_learners=3", "ray.learner_strategy=STRICT_SPREAD")
    with pytest.raises(DoesNotFit, match=r"learner 3 of 3 needs \{CPU: 1\} on one node of its own"):
        plan(spread, _nodes(4, 4))
    pack = tiny_cfg("ray.num_learners=2", "ray.learner_strategy=STRICT_PACK")
    assert plan(pack, _nodes(1, 2)).nodes_of("learner") == {"01abcdef01"}
    with pytest.raises(DoesNotFit, match=r"the 2 learners need \{CPU: 2\} together on one node"):
        plan(pack, _nodes(1, 1))


def test_samplers_and_the_reference_are_checked_node_by_node(tiny_cfg):
    from diffalign.actors.placement import DoesNotFit, plan

    sampler = _online(tiny_cfg, "ray.sampler.num=2", "ray.sampler.num_cpus=3")
    with pytest.raises(DoesNotFit) as info:
        plan(sampler, _nodes(2, 2, 2))  # 6 CPUs, 1 + 2 x 3 asked: the samplers fit no node
    msg = str(info.value)
    assert msg.startswith("sampler 1 of 2 needs {CPU: 3} on one node; no node has it ("), msg
    assert "lower ray.sampler.num_cpus" in str(info.value) and info.value.role == "sampler"
    ref = tiny_cfg("reference.placement=actor", "ray.reference_cpus=2.5")
    with pytest.raises(DoesNotFit) as info:
        plan(ref, _nodes(2, 2))
    assert str(info.value).startswith("reference 1 of 1 needs {CPU: 2.5} on one node"), info.value
    assert "lower ray.reference_cpus" in str(info.value) and info.value.role == "reference"
    # Actors that ask for nothing need no room.
    free = tiny_cfg("reference.placement=actor", "ray.reference_cpus=0")
    assert plan(free, _nodes(1)).where[("reference", 0)] is None


def test_colocated_packs_the_side_actors_onto_a_learners_node(tiny_cfg):
    from diffalign.actors.placement import DoesNotFit, plan

    base = ("objective.name=dpo", "reference.strategy=frozen", "reference.placement=actor",
            "ray.cpus_per_learner=2", "ray.sampler.num=1")
    nodes = _nodes(1, 4)  # the learner only fits node 1
    separate = plan(_online(tiny_cfg, *base), nodes)
    assert separate.where[("learner", 0)] == nodes[1].node_id
    assert separate.where[("sampler", 0)] == nodes[0].node_id  # PACK per role: first node with room
    assert separate.where[("reference", 0)] == nodes[1].node_id and separate.side_target is None
    colocated = plan(_online(tiny_cfg, *base, "ray.placement=colocated"), nodes)
    assert colocated.where[("sampler", 0)] == colocated.where[("reference", 0)] == nodes[1].node_id
    assert colocated.side_target == nodes[1].node_id
    # Together they need 2 CPUs on one node: the learner's has 1 left, the other node 1.
    tight = _nodes(1, 3)
    plan(_online(tiny_cfg, *base), tight)  # separate still fits
    with pytest.raises(DoesNotFit, match=r"the side actors \(sampler 1 of 1, reference 1 of 1\) need "
                                         r"\{CPU: 2\} together on one node \(ray.placement=colocated\)"):
        plan(_online(tiny_cfg, *base, "ray.placement=colocated"), tight)


def test_placement_fields_are_validated_at_load(tiny_cfg):
    assert tiny_cfg().ray.placement == "separate" and tiny_cfg().ray.gpus_per_learner == 1.0
    for bad, match in [("ray.placement=spread", r"ray\.placement='spread' is not allowed"),
                       ("ray.learner_strategy=pack", r"ray\.learner_strategy='pack' is not allowed"),
                       ("ray.gpus_per_learner=1.5", r"ray\.gpus_per_learner=1\.5: a fraction of a GPU"),
                       ("ray.gpus_per_learner=-1", r"ray\.gpus_per_learner must be >= 0")]:
        with pytest.raises(ConfigError, match=match):
            tiny_cfg(bad)
    with pytest.raises(ConfigError, match=r"ray\.gpus_per_learner must be > 0 with ray\.use_gpu=true"):
        tiny_cfg("ray.use_gpu=true", "ray.gpus_per_learner=0")


# --------------------------------------------------------------------------- the side placement group

def test_side_placement_times_out_naming_the_actors_and_leaves_no_group(tiny_cfg, ray_local):
    from diffalign.actors.placement import SidePlacement, SidePlacementTimeout
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    total = ray_local.cluster_resources()["CPU"]
    hold = placement_group([{"CPU": total}])
    ray_local.get(hold.ready(), timeout=60)
    before = {k for k, v in placement_group_table().items() if v["state"] != "REMOVED"}
    try:
        cfg = tiny_cfg("reference.placement=actor", "ray.reference_cpus=1", "ray.placement_timeout_s=1")
        side = SidePlacement(cfg)
        t0 = time.monotonic()
        with pytest.raises(SidePlacementTimeout) as info:
            side.start()
        assert 1 <= time.monotonic() - t0 < 15
        assert "reference 1 of 1 {CPU: 1}; strategy PACK" in str(info.value)
        assert f"CPU 0 free of {total:g}" in str(info.value)
        with pytest.raises(RuntimeError, match=r"start\(\) must be called"):
            side.actor_options("reference")
    finally:
        remove_placement_group(hold)
    after = {k for k, v in placement_group_table().items() if v["state"] != "REMOVED"}
    assert after <= before, after - before


def test_reference_actor_state_on_object_storage(tiny_cfg, s3_server, one_thread_torch):
    """With a URI output_dir the actor's state is on the shared storage: a new server (an actor Ray
    restarted on another node) reloads the same step and reference weights."""
    from diffalign.actors.reference_actor import ReferenceServer, actor_state_dir, clear_actor_state
    from diffalign.data import uri
    from diffalign.models.weights import state_fingerprint

    bucket = s3_server.make_bucket("refstate")
    cfg = tiny_cfg("objective.name=dpo", "reference.strategy=periodic", "reference.tau=1",
                   "reference.placement=actor")
    cfg.train.output_dir = f"{bucket}/run"  # set after load: the URI output_dir is not this test's subject
    state_dir = actor_state_dir(cfg)
    assert state_dir == f"{bucket}/run/reference_actor"
    a = ReferenceServer(cfg, state_dir)
    assert not a.restored
    weights = {k: v + 0.01 for k, v in a.policy.state_dict().items() if v.is_floating_point()}
    a.on_step(1, weights, None)
    assert uri.exists(uri.join(state_dir, "reference.pt")) and uri.exists(uri.join(state_dir, "step.json"))
    b = ReferenceServer(cfg, state_dir)
    assert b.restored and b.step == 1 and b.version() == a.version() >= 1
    assert b.info()["reference_fingerprint"] == a.info()["reference_fingerprint"]
    assert b.info()["reference_fingerprint"] != state_fingerprint({k: v - 0.01 for k, v in weights.items()})
    clear_actor_state(state_dir)
    assert not uri.exists(uri.join(state_dir, "reference.pt"))
    assert not ReferenceServer(cfg, state_dir).restored


@pytest.fixture
def one_thread_torch():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_pool_that_makes_its_samplers_places_them_in_its_own_group_and_removes_it(ray_local, tiny_cfg):
    """One process runs (recipes/mapo_personalize.py with ray.enabled=false, build_pairs.py): the pool
    in that process places its sampler actors in a placement group of its own, one bundle each."""
    from diffalign.actors.sampler import SamplerPool
    from ray.util.placement_group import placement_group_table

    cfg = tiny_cfg("ray.sampler.num=2", "ray.sampler.num_cpus=0.5", "ray.sampler.inference_steps=2")
    before = set(placement_group_table())
    pool = SamplerPool(cfg)
    try:
        mine = {k: v for k, v in placement_group_table().items() if k not in before}
        assert len(mine) == 1
        (pg_id, info), = mine.items()
        assert info["state"] == "CREATED" and list(info["bundles"].values()) == [{"CPU": 0.5}] * 2
        assert pool.placement.placement_group.id.hex() == pg_id
        pool.use_base_weights(version=0)  # the actors live and answer in their bundles
        assert pool.request(["a red car", "a red car"], [1, 2])["versions"] == [0, 0]
    finally:
        pool.shutdown()
    assert placement_group_table()[pg_id]["state"] == "REMOVED"
