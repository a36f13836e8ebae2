"""Weight sync without Ray: strict packets, version checks, probe comparison and its tolerances."""

from __future__ import annotations

import copy

import pytest
import torch
from diffalign.actors.weight_sync import (
    ProbeBatch,
    SyncVerifier,
    WeightMismatchError,
    WeightPacket,
    WeightSyncError,
    apply_packet,
    compute_dtype,
    lowest_precision,
    make_packet,
    packet_dtype,
    probe_outputs,
    verify_probe,
)
from diffalign.models.lora import TEXT_TARGETS, add_lora
from diffalign.models.tiny.diffusion import build_tiny_bundle
from diffalign.models.weights import state_fingerprint


def _lora_unet(seed: int):
    unet = build_tiny_bundle("sd15", seed=0).unet
    torch.manual_seed(seed)
    add_lora(unet, rank=4)
    return unet


@pytest.fixture(scope="module")
def pair():
    """(sender, receiver): same base model, different adapters; the sender's lora_B made non-zero so
    the adapters change the outputs."""
    sender, receiver = _lora_unet(1), _lora_unet(2)
    with torch.no_grad():
        for name, p in sender.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    return sender, receiver


@pytest.fixture
def receiver(pair):
    return copy.deepcopy(pair[1])


def _lora_keys(module) -> list[str]:
    return [n for n, _ in module.named_parameters() if "lora_" in n]


def test_correct_sync_passes_probe(pair, receiver):
    sender = pair[0]
    probe = ProbeBatch.build(sender, seed=0)
    assert not verify_probe(probe_outputs(receiver, probe), probe_outputs(sender, probe))[0]
    packet = make_packet(sender, version=3)
    assert packet.lora and set(packet.weights) == set(_lora_keys(sender))
    assert apply_packet(receiver, packet, expected_version=3) == 3
    verifier = SyncVerifier(probe_every=2)
    metrics = verifier.after_sync(3, [3], lambda: probe_outputs(sender, probe),
                                  lambda: [probe_outputs(receiver, ProbeBatch.build(receiver, seed=0))])
    assert metrics["sync/probe_max_abs_err"] <= 1e-5 * float(probe_outputs(sender, probe).abs().max())
    assert verifier.probes == 1


def test_dropped_lora_key_fails_loudly_and_loads_nothing(pair, receiver):
    weights = make_packet(pair[0], version=1).weights
    dropped = sorted(weights)[5]
    del weights[dropped]
    packet = WeightPacket(1, weights, True, state_fingerprint(weights))
    before = {k: v.clone() for k, v in receiver.named_parameters() if "lora_" in k}
    with pytest.raises(WeightMismatchError, match="missing") as info:
        apply_packet(receiver, packet)
    assert dropped in str(info.value)
    after = dict(receiver.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before), "a failed sync must not load anything"


@pytest.mark.parametrize("kind", ["unexpected", "mis-shaped"])
def test_extra_or_misshaped_key_fails(pair, receiver, kind):
    weights = make_packet(pair[0], 1).weights
    if kind == "unexpected":
        key = "down_blocks.0.attentions.0.proj_in.lora_C.default.weight"
        weights[key] = torch.zeros(2, 2)
    else:
        key = sorted(weights)[0]
        weights[key] = torch.zeros(weights[key].shape[0] + 1, *weights[key].shape[1:])
    packet = WeightPacket(1, weights, True, state_fingerprint(weights))
    with pytest.raises(WeightMismatchError, match=kind) as info:
        apply_packet(receiver, packet)
    assert key in str(info.value)


def test_version_mismatch_raises(pair, receiver):
    packet = make_packet(pair[0], version=3)
    with pytest.raises(WeightSyncError, match="version 3, expected 4"):
        apply_packet(receiver, packet, expected_version=4)
    with pytest.raises(WeightSyncError, match="version -1"):
        SyncVerifier().check_version(3, -1, who="sampler 0")
    with pytest.raises(WeightSyncError, match="receiver 1"):
        SyncVerifier().after_sync(5, [5, 4])


def test_tampered_packet_and_lora_vs_full_rejected(pair, receiver):
    packet = make_packet(pair[0], version=1)
    next(iter(packet.weights.values())).add_(1.0)
    with pytest.raises(WeightSyncError, match="fingerprint"):
        apply_packet(receiver, packet)
    full = build_tiny_bundle("sd15", seed=0).unet
    with pytest.raises(WeightSyncError, match="LoRA adapters"):
        apply_packet(full, make_packet(pair[0], 1))


def test_probe_catches_diverged_receiver(pair, receiver):
    sender = pair[0]
    apply_packet(receiver, make_packet(sender, 2))
    with torch.no_grad():  # a 2% drift of the adapters after the sync
        for name, p in receiver.named_parameters():
            if "lora_" in name:
                p.mul_(1.02)
    probe = ProbeBatch.build(sender, seed=0)
    with pytest.raises(WeightSyncError, match="probe outputs differ"):
        SyncVerifier(probe_every=1).after_sync(2, [2], lambda: probe_outputs(sender, probe),
                                               lambda: [probe_outputs(receiver, probe)])


def test_probe_schedule():
    v = SyncVerifier(probe_every=3)
    assert [v.next_sync() for _ in range(7)] == [True, False, False, True, False, False, True]
    off = SyncVerifier(probe_every=0)
    assert not any(off.next_sync() for _ in range(3))


def test_bf16_tolerance(pair):
    sender = pair[0]
    probe = ProbeBatch.build(sender, seed=0)
    ref = probe_outputs(sender, probe)
    low = probe_outputs(copy.deepcopy(sender).to(torch.bfloat16), probe)
    ok32, err = verify_probe(low, ref, torch.float32)
    ok16, err16 = verify_probe(low, ref, torch.bfloat16)
    assert err == err16 > 0
    assert not ok32 and ok16
    # Synthetic: a 0.5% relative error is bf16 rounding, not fp32 noise; a 10% one is neither.
    x = torch.linspace(-2, 2, 64)
    assert verify_probe(x * 1.005, x, torch.bfloat16)[0] and not verify_probe(x * 1.005, x, torch.float32)[0]
    assert not verify_probe(x * 1.1, x, torch.bfloat16)[0]
    assert not verify_probe(x[:10], x, torch.float32)[0]
    assert compute_dtype(sender) == torch.float32 and compute_dtype(sender, torch.bfloat16) == torch.bfloat16
    assert lowest_precision(torch.float32, torch.bfloat16, torch.float16) == torch.bfloat16


def test_probe_batch_deterministic_and_sdxl():
    unet = build_tiny_bundle("sdxl", seed=0).unet
    a, b = ProbeBatch.build(unet, seed=7), ProbeBatch.build(unet, seed=7)
    assert torch.equal(a.noisy, b.noisy) and torch.equal(a.cond.pooled_embeds, b.cond.pooled_embeds)
    out = probe_outputs(unet, a)
    assert out.shape == a.noisy.shape and torch.isfinite(out).all()
    assert not torch.equal(ProbeBatch.build(unet, seed=8).noisy, a.noisy)


def test_multi_module_packet_keys():
    def build(seed: int):
        bundle = build_tiny_bundle("sd15", seed=0)
        torch.manual_seed(seed)
        add_lora(bundle.unet, 4)
        add_lora(bundle.text_encoders[0], 4, targets=TEXT_TARGETS)
        return [bundle.unet, bundle.text_encoders[0]]

    src, dst = build(1), build(2)
    packet = make_packet(src, version=5)
    assert any(k.startswith("text_encoder_1.") for k in packet.weights)
    apply_packet(dst, packet, expected_version=5)
    for a, b in zip(src, dst):
        sa, sb = dict(a.named_parameters()), dict(b.named_parameters())
        assert all(torch.equal(sa[k], sb[k]) for k in sa if "lora_" in k)
    with pytest.raises(WeightMismatchError, match="text_encoder_1"):
        apply_packet(dst[:1] + [build_tiny_bundle("sd15", seed=0).text_encoders[0]], packet)


def _full_unet(seed: int):
    unet = build_tiny_bundle("sd15", seed=0).unet
    if seed:  # a different fine-tune of the same architecture
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            for p in unet.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return unet


def test_bf16_packet_half_the_bytes_fingerprinted_strict_and_probe_checked():
    sender, receiver = _full_unet(1), _full_unet(2)
    p32 = make_packet(sender, version=4)
    p16 = make_packet(sender, version=4, dtype=torch.bfloat16)
    assert set(p16.weights) == set(p32.weights) == {n for n, _ in sender.named_parameters()}
    assert all(t.dtype == torch.bfloat16 for t in p16.weights.values()) and p16.dtype == torch.bfloat16
    assert p32.dtype == torch.float32 and all(t.dtype == torch.float32 for t in p32.weights.values())
    assert p16.num_bytes * 2 == p32.num_bytes
    assert packet_dtype("bf16") == torch.bfloat16 and packet_dtype("fp16") == torch.float16
    assert packet_dtype("no") == torch.float32
    # The fingerprint is of what is sent (the bf16 tensors), not of the fp32 weights.
    assert p16.fingerprint == state_fingerprint(p16.weights) != p32.fingerprint
    # The sender's own weights are untouched by the cast.
    assert all(p.dtype == torch.float32 for p in sender.parameters())

    tampered = WeightPacket(4, {k: v.clone() for k, v in p16.weights.items()}, False, p16.fingerprint)
    next(iter(tampered.weights.values())).add_(1.0)
    with pytest.raises(WeightSyncError, match="fingerprint"):
        apply_packet(receiver, tampered)
    partial = {k: v for k, v in p16.weights.items() if k != sorted(p16.weights)[3]}
    with pytest.raises(WeightMismatchError, match="missing"):
        apply_packet(receiver, WeightPacket(4, partial, False, state_fingerprint(partial)))

    assert apply_packet(receiver, p16, expected_version=4) == 4
    got = dict(receiver.named_parameters())
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], v.float())
               for k, v in p16.weights.items())

    probe = ProbeBatch.build(sender, seed=0)
    ref = probe_outputs(sender, probe)
    out = probe_outputs(receiver, probe)
    dtype = lowest_precision(compute_dtype(sender), compute_dtype(receiver), p16.dtype)
    assert dtype == torch.bfloat16
    ok16, err = verify_probe(out, ref, dtype)
    assert ok16 and err > 0
    assert not verify_probe(out, ref, torch.float32)[0], "bf16 rounding must exceed the fp32 tolerance"
    metrics = SyncVerifier(probe_every=1).after_sync(4, [4], lambda: ref, lambda: [out], dtype=dtype)
    assert metrics["sync/probe_max_abs_err"] == err

    # Negative control: a consistent packet (fingerprint matches) of weights 10% off.
    wrong = {k: v * 1.1 for k, v in p16.weights.items()}
    apply_packet(receiver, WeightPacket(5, wrong, False, state_fingerprint(wrong)), expected_version=5)
    with pytest.raises(WeightSyncError, match="probe outputs differ"):
        SyncVerifier(probe_every=1).after_sync(5, [5], lambda: ref, lambda: [probe_outputs(receiver, probe)],
                                               dtype=dtype)


def test_lora_packet_sends_adapter_tensors_only(pair, receiver):
    sender = pair[0]
    lora_keys = set(_lora_keys(sender))
    p16 = make_packet(sender, version=2, dtype=torch.bfloat16)
    assert p16.lora and set(p16.weights) == lora_keys and all("lora_" in k for k in p16.weights)
    assert all(t.dtype == torch.bfloat16 for t in p16.weights.values())
    full_bytes = sum(p.numel() * p.element_size() for p in sender.parameters())
    assert p16.num_bytes * 2 == make_packet(sender, 2).num_bytes and p16.num_bytes < full_bytes / 10
    base_before = {k: v.clone() for k, v in receiver.named_parameters() if "lora_" not in k}
    apply_packet(receiver, p16, expected_version=2)
    after = dict(receiver.named_parameters())
    assert all(torch.equal(base_before[k], after[k]) for k in base_before)  # base weights never sent
    assert all(torch.equal(after[k], v.float()) for k, v in p16.weights.items())
    probe = ProbeBatch.build(sender, seed=0)
    ok, _ = verify_probe(probe_outputs(receiver, probe), probe_outputs(sender, probe),
                         lowest_precision(torch.float32, p16.dtype))
    assert ok
