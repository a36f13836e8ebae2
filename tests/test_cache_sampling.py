"""Latent sampling and flips per read (`data.latent_sampling`), cached and uncached.

With `sample`, every read of a pair draws `latent_dist.sample()` and, where the reader flips, a new
flip, as diffusers' Diffusion-DPO and the official MaPO do; the draw is a function of (seed, epoch,
index), so a cached read equals the uncached read of the same step and resume stays exact. A VAE
with a known posterior (mean = 2x2 average pool, a fixed std) lets the tests compare the draws with
the encoder's distribution; `mean` (fixed latents) is the negative control throughout.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffalign.config import ConfigError, load_config
from diffalign.data.collate import collate_pairs
from diffalign.data.latent_cache import LatentPairDataset, StaleCacheError, precompute_latents
from diffalign.data.stream import MaterializedPairs, PairRecord
from diffalign.data.synthetic import PROMPTS
from diffalign.data.transforms import PairTransform, latent_draws, to_tensor
from diffalign.models.conditioning import Conditioning
from diffalign.train.cache import CachedPairs, SampledPixels
from diffalign.train.driver import build_trainer
from diffalign.train.step import LatentEncoder, make_batch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image


class _Config(dict):
    """A diffusers-style config: a dict whose keys read as attributes."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class KnownVAE(torch.nn.Module):
    """A deterministic encoder with a known posterior: mean = `pool` x `pool` average pool of the pixels
    (RGB plus their channel mean as a 4th channel), std = `sigma` everywhere."""

    def __init__(self, sigma: float = 0.3, scaling_factor: float = 2.0, pool: int = 2) -> None:
        super().__init__()
        self._param = torch.nn.Parameter(torch.zeros(()))  # dtype / device, as a real VAE has
        self.config = _Config(scaling_factor=scaling_factor, shift_factor=None, pool=pool, sigma=sigma)
        self.sigma, self.pool = sigma, pool

    @property
    def device(self) -> torch.device:
        return self._param.device

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x.float(), self.pool)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)

    def encode(self, x: torch.Tensor):
        m = self.mean(x)
        logvar = torch.full_like(m, 2 * math.log(self.sigma))
        return SimpleNamespace(latent_dist=DiagonalGaussianDistribution(torch.cat([m, logvar], 1)))


def encoder(**kw) -> tuple[LatentEncoder, KnownVAE]:
    vae = KnownVAE(**kw)
    return LatentEncoder(SimpleNamespace(vae=vae)), vae


class FixedPairs(torch.utils.data.Dataset):
    """Pixel pairs with no reader randomness (no transform, no flips)."""

    def __init__(self, n: int, size: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.chosen = torch.rand(n, 3, size, size, generator=g) * 2 - 1
        self.rejected = torch.rand(n, 3, size, size, generator=g) * 2 - 1

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, i: int) -> dict:
        return {"prompt": PROMPTS[i % len(PROMPTS)], "chosen": self.chosen[i], "rejected": self.rejected[i]}


def random_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def flipping_pairs(n: int, resolution: int = 16, size: tuple[int, int] = (16, 16)) -> MaterializedPairs:
    """A real reader (PairTransform with random_flip) over random images; row index = position."""
    rng = np.random.default_rng(0)
    records = [PairRecord(PROMPTS[i % len(PROMPTS)], random_image(rng, size), random_image(rng, size), i,
                          "memory", f"row {i}") for i in range(n)]
    return MaterializedPairs(records, PairTransform(resolution, random_flip=True), seed=0)


def no_text(prompts, sizes=None, crops=None) -> Conditioning:
    return Conditioning(torch.zeros(len(prompts), 1, 1))


def z_scores(reads: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    return (reads - mean) / std


# ---- the draws follow the encoder's posterior ------------------------------------------------------


def test_cached_samples_have_the_encoders_mean_and_std():
    enc, vae = encoder(sigma=0.3, scaling_factor=2.0)
    data = FixedPairs(6)
    cache = CachedPairs(data, enc, sampling="sample", seed=0, progress=False)
    epochs = 300
    want_w = 2.0 * vae.mean(data.chosen)  # scaled posterior means; scaled std = 2.0 * 0.3
    want_l = 2.0 * vae.mean(data.rejected)
    reads = [[cache.item(i, e) for i in range(len(data))] for e in range(epochs)]
    w = torch.stack([torch.stack([r["chosen_latents"] for r in row]) for row in reads])  # (E, n, C, h, w)
    l_ = torch.stack([torch.stack([r["rejected_latents"] for r in row]) for row in reads])
    zw, zl = z_scores(w, want_w, 0.6), z_scores(l_, want_l, 0.6)
    z = torch.cat([zw, zl])
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1.0) < 0.01
    # per element: the mean over reads is the posterior mean (5 standard errors)
    assert float((w.mean(0) - want_w).abs().max()) < 5 * 0.6 / math.sqrt(epochs)
    # a new draw every epoch, independent for the chosen and the rejected image
    corr = lambda a, b: float((a * b).mean())  # noqa: E731 - z-scores: mean 0, std 1
    assert abs(corr(zw[1:], zw[:-1])) < 0.01 and abs(corr(zw, zl)) < 0.01
    assert abs(float(z.flatten(2).std(0).mean()) - 1.0) < 0.05

    # negative control: `mean` reads the posterior mean every time (the checks above would fail)
    fixed = CachedPairs(data, enc, sampling="mean", progress=False)
    m = torch.stack([fixed.item(0, e)["chosen_latents"] for e in range(5)])
    assert float(z_scores(m, want_w[0], 0.6).std()) < 1e-6
    torch.testing.assert_close(m[3], want_w[0])


def test_uncached_reads_draw_the_same_samples_as_cached_ones():
    enc, vae = encoder(sigma=0.3)
    data = FixedPairs(5)
    cache = CachedPairs(data, enc, sampling="sample", seed=7, progress=False)
    pixels = SampledPixels(data, seed=7)
    for epoch in (0, 1, 4):
        idx = [3, 0, 4]
        raw = collate_pairs([pixels.item(i, epoch) for i in idx])
        batch = make_batch(raw, no_text, enc, "cpu")
        cached = collate_pairs([cache.item(i, epoch) for i in idx])
        torch.testing.assert_close(batch.chosen, cached["chosen_latents"], atol=1e-6, rtol=0)
        torch.testing.assert_close(batch.rejected, cached["rejected_latents"], atol=1e-6, rtol=0)
        assert not torch.allclose(batch.chosen, 2.0 * vae.mean(data.chosen[idx]), atol=1e-3)  # sampled
    # another run seed draws other samples; without seeds the pixels encode to the mean
    other = make_batch(collate_pairs([SampledPixels(data, seed=8).item(0, 0)]), no_text, enc, "cpu")
    assert not torch.allclose(other.chosen[0], cache.item(0, 0)["chosen_latents"], atol=1e-3)
    plain = make_batch(collate_pairs([data[0]]), no_text, enc, "cpu")
    torch.testing.assert_close(plain.chosen[0], 2.0 * vae.mean(data.chosen[:1])[0])


def test_mean_keeps_the_first_reads_encoder_mean():
    """`mean`: each item is the encoder mean of its first read, whatever the epoch."""
    enc, _ = encoder()
    data = flipping_pairs(6)
    cache = CachedPairs(data, enc, sampling="mean", progress=False)
    first = collate_pairs([data[i] for i in range(6)])
    want = enc(torch.cat([first["chosen"], first["rejected"]]))
    assert cache.latents.shape[1:4] == (1, 2, 1) and not cache.flips
    for epoch in (0, 3):
        got = collate_pairs([cache.item(i, epoch) for i in range(6)])
        assert torch.equal(torch.cat([got["chosen_latents"], got["rejected_latents"]]), want)
        assert got["crop_top_lefts"] == first["crop_top_lefts"]


# ---- flips ----------------------------------------------------------------------------------------


def _orientation(x: torch.Tensor, unflipped: torch.Tensor) -> bool:
    """True when latents x are nearer the mirror image of `unflipped` than `unflipped` itself."""
    return bool((x - unflipped.flip(-1)).norm() < (x - unflipped).norm())


def test_flips_appear_at_half_the_reads_and_change_across_epochs():
    enc, vae = encoder(sigma=0.05)
    n, epochs = 48, 16
    data = flipping_pairs(n)
    # the image as stored (16 x 16 at resolution 16: no resize, no crop), never flipped
    unflipped_w = torch.stack([to_tensor(r.chosen) for r in data.records])
    unflipped_l = torch.stack([to_tensor(r.rejected) for r in data.records])
    mean_w, mean_l = 2.0 * vae.mean(unflipped_w), 2.0 * vae.mean(unflipped_l)
    # the cache holds both orientations: the encodings of the image and of its mirror image
    cache = CachedPairs(data, enc, sampling="sample", seed=0, progress=False)
    assert cache.flips and cache.latents.shape[1:4] == (2, 2, 2)
    views = cache.latents[:, :, 0, 0]  # (n, view, C, h, w) chosen means
    close = lambda a, b: torch.allclose(a, b, atol=1e-6)  # noqa: E731 - pooling order rounds the last bit
    for i in range(n):
        as_read, mirror = views[i]
        assert close(mirror, as_read.flip(-1)) and not close(mirror, as_read)
        assert close(as_read, mean_w[i]) or close(as_read, mean_w[i].flip(-1))

    flips = torch.zeros(epochs, n, dtype=torch.bool)
    for e in range(epochs):
        for i in range(n):
            item = cache.item(i, e)
            flips[e, i] = _orientation(item["chosen_latents"], mean_w[i])
            assert _orientation(item["rejected_latents"], mean_l[i]) == flips[e, i]  # the pair stays aligned
    rate = float(flips.float().mean())
    assert abs(rate - 0.5) < 0.07, rate
    assert 0.2 < float(flips[0].float().mean()) < 0.8  # independent of the first read's own flip
    assert all(0 < int(flips[:, i].sum()) < epochs for i in range(n))  # every pair flips in some epochs
    # the uncached reader flips at the same rate (its own flips, per read)
    raw = torch.tensor([[bool(torch.equal(data.item(i, e)["chosen"], unflipped_w[i].flip(-1)))
                         for i in range(n)] for e in range(epochs)])
    assert abs(float(raw.float().mean()) - rate) < 0.1

    # negative control: `mean` keeps the orientation of the first read for the whole run
    fixed = CachedPairs(data, enc, sampling="mean", progress=False)
    kept = torch.tensor([[_orientation(fixed.item(i, e)["chosen_latents"], mean_w[i]) for i in range(n)]
                         for e in range(epochs)])
    assert (kept == kept[0]).all()


def test_a_mirrored_read_reports_the_crop_of_the_mirrored_image():
    """24 x 20 images at resolution 16: resized to 19 x 16, centre crop at left 2; the mirror of that
    crop is the crop of the mirrored image at left 19 - 16 - 2 = 1 (what SDXL's time ids describe)."""
    transform = PairTransform(16, random_flip=True)
    assert transform.mirrored_crop((20, 24), (0, 2)) == (0, 1)
    image = random_image(np.random.default_rng(1), (24, 20))
    resized = image.resize((19, 16), Image.Resampling.BILINEAR)
    mirror_of_crop = to_tensor(resized.crop((2, 0, 18, 16))).flip(-1)
    crop_of_mirror = to_tensor(resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT).crop((1, 0, 17, 16)))
    assert torch.equal(mirror_of_crop, crop_of_mirror)

    enc, vae = encoder(sigma=0.05)
    data = flipping_pairs(8, size=(24, 20))
    cache = CachedPairs(data, enc, sampling="sample", seed=0, progress=False)
    for i in range(8):
        first = data[i]
        as_read = 2.0 * vae.mean(first["chosen"][None])[0]
        for e in range(6):
            item = cache.item(i, e)
            mirrored = _orientation(item["chosen_latents"], as_read)
            want = transform.mirrored_crop(first["original_size"], first["crop_top_left"]) if mirrored \
                else first["crop_top_left"]
            assert item["crop_top_left"] == want and item["original_size"] == first["original_size"]


# ---- purity, resume, memory, config --------------------------------------------------------------


def test_a_read_is_a_function_of_seed_epoch_and_index():
    enc, _ = encoder()
    data = flipping_pairs(6)
    a = CachedPairs(data, enc, sampling="sample", seed=3, progress=False)
    b = CachedPairs(data, enc, sampling="sample", seed=3, progress=False)
    later_first = [b.item(i, e) for e in (5, 0, 2) for i in (4, 1)]  # any order, any history
    again = [a.item(i, e) for e in (5, 0, 2) for i in (4, 1)]
    for x, y in zip(later_first, again):
        assert torch.equal(x["chosen_latents"], y["chosen_latents"])
        assert x["crop_top_left"] == y["crop_top_left"]
    assert latent_draws(3, 5, 4) == latent_draws(3, 5, 4) != latent_draws(3, 6, 4)
    assert not torch.equal(a.item(4, 5)["chosen_latents"], a.item(4, 6)["chosen_latents"])


def _weights_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("cache", ["true", "false"])
def test_resume_is_exact_with_sampled_latents_and_flips(tiny_cfg, tmp_path, cache):
    """4 pairs, 2 per step: step 2 starts the second epoch, whose draws and flips are new."""
    data = flipping_pairs(4, resolution=32, size=(32, 32))
    extra = ("data.num_pairs=4", "optim.batch_size=2", "optim.lr=1e-3", "train.checkpoint_every=2",
             f"data.cache_latents={cache}")
    make = lambda steps, out: build_trainer(  # noqa: E731
        tiny_cfg(*extra, f"train.max_steps={steps}", f"train.output_dir={tmp_path}/{out}"),
        train_data=data, heldout_data=None)
    first = make(2, "split")
    assert isinstance(first.train_data, CachedPairs if cache == "true" else SampledPixels)
    first.fit()
    resumed = make(4, "split")
    resumed.fit()
    whole = make(4, "whole")
    whole.fit()
    assert resumed.step == whole.step == 4
    assert _weights_equal(resumed.trainable_weights(), whole.trainable_weights())
    assert not _weights_equal(whole.trainable_weights(), first.trainable_weights())


@pytest.mark.parametrize("family_px, per_image_kib", [(512, 64), (1024, 256)])
def test_cache_memory_per_pair(family_px, per_image_kib):
    """SD1.5 at 512 px (latents 4 x 64 x 64) and SDXL at 1024 px (4 x 128 x 128), float32."""
    enc, _ = encoder(pool=8)
    data = FixedPairs(1, size=family_px)
    kib = {}
    for sampling in ("mean", "sample"):
        kib[sampling] = CachedPairs(data, enc, sampling=sampling, progress=False).nbytes / 1024
    flipped = CachedPairs(flipping_pairs(1, resolution=family_px, size=(family_px, family_px)), enc,
                          sampling="sample", progress=False).nbytes / 1024
    assert kib["mean"] == 2 * per_image_kib  # chosen + rejected means
    assert kib["sample"] == 4 * per_image_kib  # + their stds
    assert flipped == 8 * per_image_kib  # + the mirror images' means and stds


def test_latent_sampling_setting():
    assert load_config(None, []).data.latent_sampling == "sample"
    assert load_config(None, ["data.latent_sampling=mean"]).data.latent_sampling == "mean"
    with pytest.raises(ConfigError, match="data.latent_sampling"):
        load_config(None, ["data.latent_sampling=median"])
    with pytest.raises(ValueError, match="latent_sampling"):
        CachedPairs(FixedPairs(1), encoder()[0], sampling="median", progress=False)


def test_heldout_pairs_are_encoded_to_the_mean(tiny_cfg):
    trainer = build_trainer(tiny_cfg("train.eval_every=1", "data.heldout_pairs=4"))
    assert isinstance(trainer.train_data, CachedPairs) and trainer.train_data.sampling == "sample"
    batch = trainer.heldout.batches[0][0]
    from diffalign.data.synthetic import SyntheticPairs

    held = SyntheticPairs(4, 32, seed=trainer.cfg.train.seed + 7919)
    pixels = torch.stack([held[i]["chosen"] for i in range(4)])
    torch.testing.assert_close(batch.chosen, trainer.setup.latent_encoder(pixels))


def test_the_on_disk_cache_draws_what_the_in_memory_cache_draws(tmp_path):
    """precompute_latents(with_std, mirrored) + LatentPairDataset(sampling="sample") read the same
    samples, flips and crops as CachedPairs for every (epoch, index)."""
    enc, vae = encoder(sigma=0.2)
    data = flipping_pairs(6, size=(24, 20))
    index = precompute_latents(data, vae, tmp_path / "c", batch_size=4, shard_size=4, progress=False,
                               with_std=True, mirrored=True)
    assert index["with_std"] and index["mirrored"] and index["crop_top_lefts_mirrored"] is not None
    disk = LatentPairDataset(tmp_path / "c", vae=vae, resolution=16, sampling="sample", seed=5)
    memory = CachedPairs(data, enc, sampling="sample", seed=5, progress=False)
    for epoch in range(4):
        for i in range(6):
            a, b = disk.item(i, epoch), memory.item(i, epoch)
            for key in ("chosen_latents", "rejected_latents"):
                torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
            assert a["crop_top_left"] == b["crop_top_left"] and a["original_size"] == b["original_size"]
    # the means of a mean-mode reader are the stored means, epoch after epoch
    means = LatentPairDataset(tmp_path / "c", vae=vae, resolution=16)
    assert torch.equal(means.item(2, 0)["chosen_latents"], means.item(2, 3)["chosen_latents"])
    torch.testing.assert_close(means[2]["chosen_latents"], memory.latents[2, 0, 0, 0])

    # a cache without stds cannot be sampled from, nor reused for a request that needs them
    precompute_latents(data, vae, tmp_path / "plain", progress=False)
    with pytest.raises(StaleCacheError, match="std"):
        LatentPairDataset(tmp_path / "plain", sampling="sample")
    with pytest.raises(StaleCacheError, match="with_std"):
        precompute_latents(data, vae, tmp_path / "plain", progress=False, with_std=True)
