"""Online MaPO on 2 Ray Train learners: every rank requests its own on-policy samples from the
driver's sampler actors, rank 0 alone publishes weights on the board, a killed sampler re-syncs
itself from the board, and the samplers outlive a learner attempt that Ray Train restarts."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "mapo_personalize.yaml"
MAX_STEPS, BATCH, MAX_STALENESS, SYNC_EVERY = 6, 2, 2, 2
KILL_SAMPLER_AT, KILL_LEARNER_AT = 2, 4


def _info(actor) -> dict:
    """The sampler's info; while Ray restarts it, calls fail at once, so retry (bounded)."""
    import ray
    from ray.exceptions import ActorUnavailableError

    deadline = time.monotonic() + 120
    while True:
        try:
            return ray.get(actor.info.remote(), timeout=120)
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class RecordRank:
    """Trainer callback on every rank: what the trainer really trained on (the batch's rejected
    versions, requesters, epochs per micro-step), the online metrics per step, and the sampler's
    state. Rank 0 kills the sampler actor after step KILL_SAMPLER_AT (once: a marker file)."""

    def __init__(self, cfg, rank: int) -> None:
        self.rank, self.out = rank, Path(cfg.train.output_dir) / "ranks"
        self.marker = Path(cfg.train.output_dir) / ".sampler_killed"
        self.attempt = None

    def _write(self, record: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with (self.out / f"rank-{self.rank}.jsonl").open("a") as f:
            f.write(json.dumps({"attempt": self.attempt, **record}) + "\n")

    def on_start(self, trainer) -> None:
        import uuid

        self.attempt = uuid.uuid4().hex[:8]
        self.source = trainer.batch_source
        accum = trainer.cfg.optim.grad_accum

        def recorded(items, micro_step):
            batch = self.source(items, micro_step)
            self._write({"event": "batch", "version": micro_step // accum,
                         "versions": batch["rejected_versions"], "requesters": batch["rejected_requesters"],
                         "epochs": batch["rejected_epochs"]})
            return batch

        trainer.batch_source = recorded

    def on_step(self, trainer, metrics: dict) -> None:
        import ray

        keys = ("online/sync_share", "online/sync_s", "online/sampler_restarts", "online/stale_dropped",
                "sync/packet_mb", "online/requested")
        actor = self.source.pool.actors[0]
        pid = _info(actor)["pid"] if self.rank == 0 else None
        self._write({"event": "step", "step": trainer.step, "sampler_pid": pid,
                     **{k: metrics.get(k) for k in keys}})
        if self.rank == 0 and trainer.step == KILL_SAMPLER_AT and not self.marker.exists():
            self.marker.write_text("killed\n")
            self._write({"event": "sampler_before_kill", "info": _info(actor)})
            ray.kill(actor, no_restart=False)  # Ray restarts it (ray.sampler.max_restarts)

    def on_end(self, trainer, summary: dict) -> None:
        info = _info(self.source.pool.actors[0])
        self._write({"event": "end", "requested": self.source.requested, "taken": self.source.buffer.taken,
                     "board_epoch": self.source.pool.board_epoch, "info": info})


def record_ranks(cfg, rank: int) -> list:
    """The `callbacks_factory` of the run (pickled to every worker)."""
    return [RecordRank(cfg, rank)]


def _records(out: Path, rank: int) -> list[dict]:
    path = out / "ranks" / f"rank-{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_learners_sample_per_rank_from_driver_owned_samplers(ray_local, tmp_path):
    import ray
    import ray._private.state as ray_state
    from diffalign.actors.learner import FaultInjection, effective_steps, read_step_log, train_with_ray
    from diffalign.config import load_config
    from ray import cloudpickle

    # The workers unpickle RecordRank: they cannot import this test module by name.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out_dir = tmp_path / "run"
    cfg = load_config(CONFIG, [
        f"train.output_dir={out_dir}", f"data.path={ROOT / 'examples' / 'tiny_subject'}",
        "ray.enabled=true", "ray.num_learners=2", f"train.max_steps={MAX_STEPS}", "train.checkpoint_every=2",
        "train.progress=false", "tracking.mlflow=false", f"optim.batch_size={BATCH}",
        f"online.max_staleness={MAX_STALENESS}", f"ray.sampler.sync_every={SYNC_EVERY}",
        "online.samples_per_request=2", "ray.sampler.inference_steps=2", "ray.sampler.probe_every=2",
        "ray.sampler.num=1", "ray.max_failures=1",
    ])
    # Rank 1 dies after step 4 (checkpointed): Ray Train restarts both learners from it.
    out = train_with_ray(cfg, callbacks_factory=record_ranks,
                         fault=FaultInjection(kill_at_step=KILL_LEARNER_AT, rank=1))

    # No step lost: two attempts, the second resumed from a checkpoint at or before step 4 (Ray Train
    # may not have registered the newest one yet), steps 1..6 survive exactly once.
    steps_log = read_step_log(out["step_log"])
    starts = [r for r in steps_log if r["event"] == "start"]
    assert len(starts) == 2 and starts[0]["restored_step"] == 0
    assert starts[1]["restored_step"] in (KILL_LEARNER_AT - 2, KILL_LEARNER_AT)
    assert effective_steps(steps_log) == list(range(1, MAX_STEPS + 1))
    assert out["step"] == MAX_STEPS and out["ranks_in_sync"]

    recs = {r: _records(out_dir, r) for r in (0, 1)}
    for rank, rows in recs.items():
        batches = [x for x in rows if x["event"] == "batch"]
        # Each rank trained only on samples it requested itself, never older than max_staleness.
        assert batches and all(req == rank for b in batches for req in b["requesters"]), rank
        ages = [b["version"] - v for b in batches for v in b["versions"]]
        assert all(0 <= a <= MAX_STALENESS for a in ages), (rank, ages)
        steps = [x for x in rows if x["event"] == "step"]
        assert all(0.0 <= x["online/sync_share"] <= 1.0 and x["online/sync_s"] >= 0 for x in steps)
        ends = [x for x in rows if x["event"] == "end"]
        assert len(ends) == 1  # only the second attempt finished
        end = ends[0]
        assert end["requested"] >= end["taken"] == sum(len(b["versions"]) for b in batches
                                                       if b["attempt"] == end["attempt"])
        # The second attempt restored older weights: a new board epoch, and it trained on that only.
        assert end["board_epoch"] == 1
        assert all(e == 1 for b in batches if b["attempt"] == end["attempt"] for e in b["epochs"])
    # Rank 0 asked only for its own share (no funnel): fewer samples than the two ranks trained on.
    end0, end1 = (next(x for x in recs[r] if x["event"] == "end") for r in (0, 1))
    assert end1["requested"] > 0 and end0["requested"] < end0["taken"] + end1["taken"]
    # Only rank 0 publishes: it blocks in syncs (and reports packet sizes), rank 1 never publishes.
    steps0 = [x for x in recs[0] if x["event"] == "step"]
    steps1 = [x for x in recs[1] if x["event"] == "step"]
    assert all(x["sync/packet_mb"] > 0 for x in steps0 if x["step"] % SYNC_EVERY == 0)
    assert all(x["sync/packet_mb"] is None for x in steps1)
    assert sum(x["online/sync_s"] for x in steps0) > sum(x["online/sync_s"] for x in steps1)

    # The killed sampler came back (new process) and re-synced itself from the board: its pulls
    # are its own, and both ranks' requests reached it afterwards.
    before = next(x["info"] for x in recs[0] if x["event"] == "sampler_before_kill")
    after = end0["info"]
    assert end1["info"]["pid"] == after["pid"] != before["pid"]
    assert after["reconstructed"] and not before["reconstructed"]
    assert after["board_pulls"] and min(after["board_pulls"]) >= KILL_SAMPLER_AT
    assert set(after["requests_by_rank"]) == {"0", "1"}  # JSON keys
    assert max(x["online/sampler_restarts"] for x in steps0 + steps1) >= 1
    # ...and it outlived the learner attempt that died: the same process served both attempts, so
    # its owner is not a learner worker. Its owner is this driver, which killed it at the end.
    attempts = {x["attempt"] for x in steps0}
    assert len(attempts) == 2
    restarted_pids = {x["attempt"]: x["sampler_pid"] for x in steps0 if x["step"] > KILL_SAMPLER_AT}
    assert set(restarted_pids.values()) == {after["pid"]}, restarted_pids  # one process, both attempts
    (actor_id,) = out["sampler_actor_ids"]
    probe = ray.remote(num_cpus=0)(_Probe).remote()
    ray.get(probe.ping.remote(), timeout=60)
    try:
        mine = ray_state.actors(probe._actor_id.hex())["OwnerAddress"]
        theirs = ray_state.actors(actor_id)
        assert theirs["OwnerAddress"]["Port"] == mine["Port"], (theirs, mine)
        deadline = time.monotonic() + 60  # the driver's ray.kill reaches the GCS asynchronously
        while theirs["State"] != "DEAD" and time.monotonic() < deadline:
            time.sleep(0.5)
            theirs = ray_state.actors(actor_id)
        assert theirs["State"] == "DEAD" and theirs["NumRestarts"] == 1, theirs
    finally:
        ray.kill(probe)


class _Probe:
    """An actor this test's driver creates, to read the driver's own owner address."""

    def ping(self) -> int:
        return 1
