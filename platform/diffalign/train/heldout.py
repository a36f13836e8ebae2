"""Held-out implicit preference accuracy with fixed noise and timesteps.

`heldout/implicit_acc` compares the policy with the INITIAL model on held-out pairs:
a pair counts as right when (err_w − init_err_w) < (err_l − init_err_l), i.e. the policy has
lowered its error on the chosen image more than on the rejected one (the DPO implicit reward
against the initial model; ties count half, so it is exactly 0.5 before training for every
objective). The initial errors are computed once, before any update, so no init copy is kept.
`heldout/policy_pref_acc` is the reference-free view: err_w < err_l (a tie half, as well).
Latents are the VAE posterior means (never sampled), so every evaluation sees the same inputs.
"""

from __future__ import annotations

import torch

from diffalign.data.collate import collate_pairs
from diffalign.objectives.base import tie_half_accuracy
from diffalign.train.step import make_batch


class HeldoutEvaluator:
    def __init__(self, setup, dataset, timesteps_per_pair: int = 4, batch_size: int = 16, seed: int = 1234,
                 device: torch.device | str = "cpu") -> None:
        self.setup, self.device = setup, device
        self.batches = []
        T = setup.bundle.num_train_timesteps
        gen = torch.Generator().manual_seed(seed)
        n = len(dataset)
        for start in range(0, n, batch_size):
            raw = collate_pairs([dataset[i] for i in range(start, min(n, start + batch_size))])
            raw.pop("latent_seeds", None)  # pixels are encoded to the mean, whatever the training reads
            with torch.no_grad():  # kept for the whole run: no autograd graph of a trained text encoder
                batch = make_batch(raw, setup.prompt_encoder, setup.latent_encoder, device)
            bsz = batch.chosen.shape[0]
            # Stratified timesteps so every part of [0, T) is evaluated.
            draws = []
            for k in range(timesteps_per_pair):
                lo, hi = k * T // timesteps_per_pair, (k + 1) * T // timesteps_per_pair
                t = torch.randint(lo, hi, (bsz,), generator=gen)
                noise = torch.randn(batch.chosen.shape, generator=gen)
                draws.append((noise.to(device), t.to(device)))
            cond_args = (list(raw["prompts"]), raw.get("original_sizes"), raw.get("crop_top_lefts"))
            self.batches.append((batch, draws, cond_args))
        self.init_errors = self._errors()

    def _cond(self, batch, cond_args):
        # A trained text encoder changes the conditioning every step: encode with its current weights.
        if not getattr(self.setup.prompt_encoder, "trainable", False):
            return batch.cond
        return self.setup.prompt_encoder(*cond_args).to(self.device)

    @torch.no_grad()
    def _errors(self) -> tuple[torch.Tensor, torch.Tensor]:
        unet = self.setup.bundle.unet
        was = unet.training
        unet.eval()
        ws, ls = [], []
        try:
            for batch, draws, cond_args in self.batches:
                cond2 = self._cond(batch, cond_args).repeat(2)
                ew = el = 0.0
                for noise, t in draws:
                    latents = torch.cat([batch.chosen, batch.rejected])
                    t2 = t.repeat(2)
                    noisy, target = self.setup.denoiser.noisy_and_target(
                        latents, noise.repeat(2, 1, 1, 1), t2
                    )
                    err = self.setup.denoiser.errors(unet, noisy, t2, cond2, target)
                    w, l_ = err.chunk(2)
                    ew, el = ew + w, el + l_
                ws.append(ew / len(draws))
                ls.append(el / len(draws))
        finally:
            unet.train(was)
        return torch.cat(ws).cpu(), torch.cat(ls).cpu()

    def evaluate(self) -> dict[str, float]:
        ew, el = self._errors()
        iw, il = self.init_errors
        margin = (el - il) - (ew - iw)  # > 0: chosen improved more than rejected
        return {
            "heldout/implicit_acc": float(tie_half_accuracy(margin)),
            "heldout/policy_pref_acc": float(tie_half_accuracy(el - ew)),
            "heldout/mse_w": float(ew.mean()),
            "heldout/mse_l": float(el.mean()),
            "heldout/margin_mean": float(margin.mean()),
        }
