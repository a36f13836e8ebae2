"""The single-process trainer: exact resume, checkpoints, per-step metrics, data order, SDXL,
bf16 autocast and EMA."""

from __future__ import annotations

import math

import pytest
import torch
from diffalign.data.collate import collate_pairs
from diffalign.train.checkpoint import list_checkpoints
from diffalign.train.data_order import BatchOrder
from diffalign.train.driver import build_trainer
from diffalign.train.step import make_batch


class Recorder:
    """Callback keeping every step's metrics (and optionally a copy of the weights)."""

    def __init__(self, weights: bool = False) -> None:
        self.metrics: list[dict] = []
        self.weights: list[dict] = []
        self.start_step: int | None = None
        self.keep_weights = weights

    def on_start(self, trainer) -> None:
        self.start_step = trainer.step

    def on_step(self, trainer, metrics) -> None:
        self.metrics.append(dict(metrics))
        if self.keep_weights:
            self.weights.append({k: v.clone() for k, v in trainer.trainable_weights().items()})


def _equal_states(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _optimizer_tensors(trainer) -> list[torch.Tensor]:
    state = trainer.engine.optimizer.state_dict()["state"]
    return [state[i][k] for i in sorted(state) for k in ("exp_avg", "exp_avg_sq")]


RESUME_CASES = {
    "full-dpo-frozen": ["model.finetune=full"],
    "lora-periodic-accum": ["model.finetune=lora", "model.lora_rank=2", "reference.strategy=periodic",
                            "reference.tau=2", "optim.grad_accum=2", "optim.lr=1e-3"],
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_is_bitwise_exact(tiny_cfg, tmp_path, case):
    k = 3
    extra = RESUME_CASES[case] + [f"train.checkpoint_every={k}", "optim.batch_size=2", "data.num_pairs=6",
                                  "optim.lr=1e-3"]
    first = build_trainer(tiny_cfg(*extra, f"train.max_steps={k}", f"train.output_dir={tmp_path}/split"))
    first.fit()
    assert first.step == k
    assert [p.name for p in list_checkpoints(first.checkpoint_dir)] == [f"checkpoint-{k}"]

    rec = Recorder()
    resumed = build_trainer(tiny_cfg(*extra, f"train.max_steps={2 * k}",
                                     f"train.output_dir={tmp_path}/split"), callbacks=[rec])
    resumed.fit()
    assert rec.start_step == k and resumed.step == 2 * k
    assert len(rec.metrics) == k

    whole = build_trainer(tiny_cfg(*extra, f"train.max_steps={2 * k}", f"train.output_dir={tmp_path}/whole"))
    whole.fit()

    w_resumed, w_whole = resumed.trainable_weights(), whole.trainable_weights()
    assert _equal_states(w_resumed, w_whole)
    # and training moved the weights at all (the comparison is not between two untouched models)
    assert not _equal_states(w_whole, first.trainable_weights())
    for a, b in zip(_optimizer_tensors(resumed), _optimizer_tensors(whole)):
        assert torch.equal(a, b)
    ref_a, ref_b = resumed.setup.reference.state_dict(), whole.setup.reference.state_dict()
    assert ref_a["version"] == ref_b["version"]
    assert _equal_states(ref_a["weights"], ref_b["weights"])
    if "periodic" in case:
        assert ref_b["version"] == (2 * k) // 2


def test_checkpoint_pruning_keeps_the_newest(tiny_cfg):
    trainer = build_trainer(tiny_cfg("train.max_steps=5", "train.checkpoint_every=1",
                                     "train.keep_checkpoints=2"))
    trainer.fit()
    names = [p.name for p in list_checkpoints(trainer.checkpoint_dir)]
    assert names == ["checkpoint-4", "checkpoint-5"]
    leftovers = [p.name for p in trainer.checkpoint_dir.iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []
    for p in list_checkpoints(trainer.checkpoint_dir):
        assert (p / "weights.safetensors").exists() and (p / "state.pt").exists()


def test_metrics_per_step(tiny_cfg):
    rec = Recorder()
    trainer = build_trainer(tiny_cfg("train.max_steps=3", "optim.lr=2e-4"), callbacks=[rec])
    summary = trainer.fit()
    assert len(rec.metrics) == 3
    for m in rec.metrics:
        for key in ("loss", "implicit_acc", "grad_norm", "lr", "pairs_per_s", "ref/version", "ref/frozen",
                    "guard/skipped_steps"):
            assert key in m, key
            assert math.isfinite(m[key]), key
        assert m["lr"] == pytest.approx(2e-4)
        assert m["pairs_per_s"] > 0 and m["grad_norm"] > 0
        assert 0.0 <= m["implicit_acc"] <= 1.0
        bins = [k for k in m if k.startswith("bins/acc_")]
        assert bins, "per-timestep-interval accuracy missing"
        assert all(0.0 <= m[k] <= 1.0 for k in bins)
        assert all(f"bins/scale_{k.split('_')[-1]}" in m for k in bins)
    # the loss is the objective's value: the first step's loss matches a direct evaluation (log 2 at init)
    assert rec.metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert summary["loss"] == rec.metrics[-1]["loss"]


def test_heldout_accuracy_is_half_before_training(tiny_cfg):
    trainer = build_trainer(tiny_cfg("train.eval_every=2", "train.max_steps=2"))
    before = trainer.evaluate()
    assert before["heldout/implicit_acc"] == 0.5
    assert before["heldout/margin_mean"] == 0.0
    summary = trainer.fit()
    assert "heldout/implicit_acc" in summary


def test_batch_order_ranks_are_disjoint_and_cover_the_global_batch():
    n, bsz, world = 22, 3, 3
    single = BatchOrder(n, bsz * world, seed=4)
    ranks = [BatchOrder(n, bsz, seed=4, rank=r, world_size=world) for r in range(world)]
    seen: list[int] = []
    for micro in range(6):
        parts = [r.indices(micro) for r in ranks]
        assert all(len(p) == bsz for p in parts)
        flat = [i for p in parts for i in p]
        assert flat == single.indices(micro)  # rank r reads slice r of the global batch
        seen += flat
    # one epoch (22 items) reads each item exactly once before any repeats
    assert sorted(seen[:n]) == list(range(n))
    # the order is a function of (seed, position) only
    assert BatchOrder(n, bsz, seed=4, rank=1, world_size=world).indices(5) == ranks[1].indices(5)
    assert BatchOrder(n, bsz, seed=5, rank=1, world_size=world).indices(0) != ranks[1].indices(0)
    with pytest.raises(ValueError, match="empty"):
        BatchOrder(0, 2, seed=0)


def test_sdxl_family_trains(tiny_cfg):
    rec = Recorder()
    trainer = build_trainer(tiny_cfg("model.family=sdxl", "train.max_steps=2", "optim.batch_size=2",
                               "data.num_pairs=4", "data.heldout_pairs=2"), callbacks=[rec])
    assert trainer.setup.bundle.family == "sdxl"
    before = trainer.trainable_weights()
    trainer.fit()
    assert trainer.step == 2 and len(rec.metrics) == 2
    assert all(math.isfinite(m["loss"]) for m in rec.metrics)
    assert not _equal_states(before, trainer.trainable_weights())


def test_bf16_autocast_on_cpu_gives_float32_loss(tiny_cfg):
    trainer = build_trainer(tiny_cfg("model.mixed_precision=bf16", "train.max_steps=2", "optim.batch_size=2"))
    assert trainer.setup.step.autocast_dtype == torch.bfloat16
    raw = collate_pairs([trainer.train_data[i] for i in range(2)])
    batch = make_batch(raw, trainer.setup.prompt_encoder, trainer.setup.latent_encoder, "cpu")
    res = trainer.setup.step(trainer.engine.forward_module, batch, torch.Generator().manual_seed(0))
    assert res.loss.dtype == torch.float32
    assert res.out.per_sample.dtype == torch.float32
    assert torch.isfinite(res.loss)
    before = trainer.trainable_weights()
    trainer.fit()
    after = trainer.trainable_weights()
    assert all(v.dtype == torch.float32 for v in after.values())  # master weights stay float32
    assert not _equal_states(before, after)
    assert all(torch.isfinite(v).all() for v in after.values())


def test_ema_final_weights(tiny_cfg):
    decay = 0.5
    rec = Recorder(weights=True)
    cfg = tiny_cfg(f"train.ema_decay={decay}", "train.max_steps=3", "optim.lr=1e-3")
    trainer = build_trainer(cfg, callbacks=[rec])
    start = trainer.trainable_weights()
    trainer.fit()
    raw, final = trainer.trainable_weights(), trainer.final_weights()
    assert set(final) == set(raw)
    assert not _equal_states(final, raw)
    # EMA by hand: e_0 = w_0, e_s = d * e_{s-1} + (1 - d) * w_s
    expected = {k: v.clone() for k, v in start.items()}
    for weights in rec.weights:
        for k in expected:
            expected[k].mul_(decay).add_(weights[k], alpha=1 - decay)
    for k in expected:
        assert torch.allclose(final[k], expected[k], atol=1e-7)


def test_without_ema_final_weights_are_the_trained_ones(tiny_cfg):
    trainer = build_trainer(tiny_cfg("train.max_steps=1"))
    trainer.fit()
    assert _equal_states(trainer.final_weights(), trainer.trainable_weights())


def test_optimizer_is_fused_adamw_on_cpu_and_matches_the_reference_update(tiny_cfg):
    """The Trainer's AdamW uses the fused kernel on CPU; its update equals AdamW written out."""
    from diffalign.train.engine import build_optimizer, fused_adamw_supported

    cfg = tiny_cfg()
    trainer = build_trainer(cfg)
    assert trainer.engine.optimizer.defaults["fused"] is True
    assert not fused_adamw_supported([torch.zeros(2, dtype=torch.int64)])

    o = cfg.optim
    torch.manual_seed(0)
    p = torch.randn(64, requires_grad=True)
    start = p.detach().clone()
    opt = build_optimizer([{"params": [p], "lr": o.lr}], o)
    b1, b2 = o.betas
    m = torch.zeros(64)
    v = torch.zeros(64)
    expected = start.clone()
    for t in range(1, 4):
        g = torch.randn(64)
        p.grad = g.clone()
        opt.step()
        # AdamW (Loshchilov & Hutter): decoupled decay, bias-corrected moments.
        expected = expected * (1 - o.lr * o.weight_decay)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
        expected = expected - o.lr * mhat / (vhat.sqrt() + o.eps)
    assert not torch.equal(p.detach(), start)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
