"""The MLP reward heads of ImageReward and of LAION's improved-aesthetic-predictor.

Kept in the models package so that both the scorers (``diffalign.eval``) and the tiny scorer builders
(``diffalign.models.tiny.scorers``) share one architecture without models importing eval.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

IMAGEREWARD_HEAD = "mlp.safetensors"
AESTHETIC_HEAD = "aesthetic_mlp.safetensors"


def load_head_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read an MLP head from ``.safetensors`` or a torch ``.pt/.pth`` state dict (no pickled code)."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"MLP head file {p!r} does not exist")
    if p.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(p)
    else:
        sd = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{p!r} does not hold a state dict")
    return sd


class RewardMLP(nn.Module):
    """The linear head of ImageReward and of improved-aesthetic-predictor.

    Both releases use ``Linear(d,1024) Drop(.2) Linear(1024,128) Drop(.2) Linear(128,64) Drop(.1)
    Linear(64,16) Linear(16,1)`` with no activations in between (their ReLUs are commented out), so the
    parameter names ``layers.{0,2,4,6,7}`` match the released state dicts.
    """

    LINEAR_INDICES = (0, 2, 4, 6, 7)

    def __init__(self, input_size: int = 768, hidden: Sequence[int] = (1024, 128, 64, 16)) -> None:
        super().__init__()
        if len(hidden) != 4:
            raise ValueError(f"RewardMLP needs 4 hidden sizes, got {list(hidden)}")
        h0, h1, h2, h3 = hidden
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, h0),
            nn.Dropout(0.2),
            nn.Linear(h0, h1),
            nn.Dropout(0.2),
            nn.Linear(h1, h2),
            nn.Dropout(0.1),
            nn.Linear(h2, h3),
            nn.Linear(h3, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor]) -> RewardMLP:
        """Build with sizes read from the weights; a leading ``mlp.`` (ImageReward.pt) is stripped."""
        sd = {
            k.removeprefix("mlp."): v for k, v in sd.items() if k.removeprefix("mlp.").startswith("layers.")
        }
        missing = [f"layers.{i}.weight" for i in cls.LINEAR_INDICES if f"layers.{i}.weight" not in sd]
        if missing:
            raise ValueError(f"MLP head state dict lacks {missing}; keys present: {sorted(sd)[:10]}")
        w = [sd[f"layers.{i}.weight"] for i in cls.LINEAR_INDICES]
        with torch.device("meta"):  # skip a random init that the loaded weights replace anyway
            mlp = cls(int(w[0].shape[1]), [int(t.shape[0]) for t in w[:4]])
        mlp.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
        return mlp.eval()
