"""The rectified-flow denoiser against diffusers' own scheduler and pipelines on fixed inputs:
noising (`scale_noise`), the sigma tables with each family's shift, latent packing, and the
transformer call (one Euler step of the real pipeline equals x - sigma * our predicted velocity)."""

from __future__ import annotations

import pytest
import torch
from diffalign.models.build import build_denoiser
from diffalign.models.conditioning import Conditioning, PromptEncoder
from diffalign.models.flow_denoiser import image_ids, pack_latents, pipeline_latents, unpack_latents
from diffalign.models.tiny.flow import build_tiny_flow_bundle
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

FAMILIES = ("sd3", "flux", "qwenimage")


@pytest.fixture(scope="module")
def bundles():
    out = {}
    for fam in FAMILIES:
        b = build_tiny_flow_bundle(fam, seed=0, resolution=32)
        b.extras["max_sequence_length"] = 8  # short text keeps the checks fast
        out[fam] = b
    return out


def test_noising_and_target_equal_scale_noise():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    from diffalign.models.flow_denoiser import FlowDenoiser
    from diffalign.timesteps import flow_sigmas

    den = FlowDenoiser("sd3", sched, flow_sigmas(1000, 3.0))
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 16, 4, 4, generator=g), torch.randn(4, 16, 4, 4, generator=g)
    t = torch.tensor([0, 250, 700, 999])
    noisy, target = den.noisy_and_target(x0, noise, t)
    # Index t (ascending in noise) is the scheduler's timestep T - 1 - t (descending).
    for i, ti in enumerate(t.tolist()):
        ts = sched.timesteps[999 - ti].reshape(1)
        ref = sched.scale_noise(x0[i:i + 1], ts, noise[i:i + 1])
        torch.testing.assert_close(noisy[i:i + 1], ref, rtol=1e-5, atol=1e-6)
        s = float(sched.sigmas[999 - ti])
        torch.testing.assert_close(den.sigma(t[i:i + 1]), torch.tensor([s]))
    torch.testing.assert_close(target, noise - x0)


def test_sigma_tables_follow_each_family_scheduler(bundles):
    sd3 = build_denoiser(bundles["sd3"])
    ref = bundles["sd3"].noise_scheduler.sigmas.flip(0).float()  # static shift 3.0
    torch.testing.assert_close(sd3.sigmas, ref)
    for fam in ("flux", "qwenimage"):
        b = bundles[fam]
        den = build_denoiser(b)
        cfg = b.noise_scheduler.config
        # What the pipeline samples at this resolution: mu from the packed image sequence length.
        seq = (b.resolution // b.latent_scale // 2) ** 2
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(seq, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
        unshifted = torch.linspace(1, 1000, 1000, dtype=torch.float64) / 1000
        expect = b.noise_scheduler.time_shift(mu, 1.0, unshifted)
        torch.testing.assert_close(den.sigmas.double(), expect, rtol=1e-6, atol=1e-7)
    b = bundles["sd3"]
    b.extras["flow_shift"] = 1.0
    try:
        torch.testing.assert_close(build_denoiser(b).sigmas.double(),
                                   torch.linspace(1, 1000, 1000, dtype=torch.float64) / 1000)
    finally:
        del b.extras["flow_shift"]


def test_packing_matches_flux_pipeline():
    x = torch.randn(2, 16, 6, 4)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 4))
    torch.testing.assert_close(unpack_latents(packed, 6, 4), x)
    # _unpack_latents takes pixel sizes and the VAE factor.
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, 48, 32, 8), x)
    torch.testing.assert_close(image_ids(6, 4, "cpu", torch.float32),
                               FluxPipeline._prepare_latent_image_ids(2, 3, 2, "cpu", torch.float32))


@pytest.mark.parametrize("family", FAMILIES)
def test_one_euler_step_of_the_pipeline_equals_our_velocity(bundles, family):
    """A one-step pipeline call from latents x at sigma_max lands on x - sigma * v: v is what our
    denoiser predicts at the largest timestep, so timestep units, packing, ids, text conditioning,
    guidance embedding and mask are all as the pipeline calls the transformer."""
    b = bundles[family]
    den = build_denoiser(b)
    side = b.resolution // b.latent_scale
    x = torch.randn(1, 16, side, side, generator=torch.Generator().manual_seed(3))
    prompt = ["a red cube on a table"]
    pipe = b.pipeline()
    seen = []

    def first_step(pipe, i, t, kwargs):  # the latents after the first Euler step
        if i == 0:
            seen.append(kwargs["latents"].clone())
        return kwargs

    # Two steps: Qwen-Image's terminal stretch divides by zero with a single one.
    kw = dict(num_inference_steps=2, height=b.resolution, width=b.resolution, output_type="latent",
              max_sequence_length=8, callback_on_step_end=first_step)
    if family == "sd3":
        pipe(prompt, latents=x, guidance_scale=1.0, **kw)
    elif family == "flux":
        pipe(prompt, latents=pack_latents(x), guidance_scale=den.guidance, **kw)
    else:
        pipe(prompt, latents=pack_latents(x), true_cfg_scale=1.0, **kw)
    out = pipeline_latents(b, seen[0])
    s0, s1 = (float(v) for v in pipe.scheduler.sigmas[:2])
    t = torch.tensor([999])
    # The first sampling sigma is the top of the training table (1 with or without shift).
    assert s0 == pytest.approx(float(den.sigma(t)), abs=1e-6) == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        v = den.predict(b.unet, x, t, PromptEncoder(b)(prompt))
    torch.testing.assert_close(out, x + (s1 - s0) * v, rtol=1e-4, atol=1e-5)


def test_qwen_mask_recovered_from_zero_padding(bundles):
    b = bundles["qwenimage"]
    enc = PromptEncoder(b)
    prompts = ["cube", "a much longer prompt about a blue ball on green grass"]
    embeds, pooled = enc.text_embeddings(prompts)
    assert pooled is None and embeds.shape[1] == 8
    cond = enc.conditioning(embeds, None)
    ref, ref_mask = b.pipeline().encode_prompt(prompts, max_sequence_length=8)
    lengths = cond.mask.sum(dim=1)
    expect = ref_mask.sum(dim=1) if ref_mask is not None else torch.full((2,), ref.shape[1])
    assert lengths.tolist() == expect.tolist() and cond.prompt_embeds.shape[1] == int(expect.max())
    torch.testing.assert_close(cond.prompt_embeds, ref[:, :cond.prompt_embeds.shape[1]].float())
    # Stacking conditionings of different text lengths pads with zeros and masks them out.
    short = enc(["cube"])
    both = Conditioning.cat([short, cond])
    assert both.prompt_embeds.shape[1] == cond.prompt_embeds.shape[1]
    assert both.mask[0].sum() == short.prompt_embeds.shape[1]


def test_every_family_learns_a_velocity_step(bundles):
    """Gradients reach the transformer through the velocity MSE, and a few SGD steps on one batch
    lower it (a wrong target or a detached prediction would not)."""
    for fam in FAMILIES:
        b = build_tiny_flow_bundle(fam, seed=1, resolution=32)
        b.extras["max_sequence_length"] = 8
        den = build_denoiser(b)
        cond = PromptEncoder(b)(["a", "b"])
        g = torch.Generator().manual_seed(0)
        x0 = torch.randn(2, 16, 4, 4, generator=g)
        noise = torch.randn(2, 16, 4, 4, generator=g)
        t = torch.tensor([300, 800])
        noisy, target = den.noisy_and_target(x0, noise, t)
        b.unet.requires_grad_(True)
        opt = torch.optim.Adam(b.unet.parameters(), lr=3e-3)
        first = None
        for _ in range(15):
            loss = den.errors(b.unet, noisy, t, cond, target).mean()
            first = first if first is not None else float(loss.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert float(loss.detach()) < 0.7 * first, (fam, first, float(loss))
