"""Backward / clip / optimizer step behind one interface, so the loop is the same for a plain
PyTorch model, DDP and DeepSpeed (whose engine owns backward and the optimizer)."""

from __future__ import annotations

import math

import torch
from diffusers.optimization import get_scheduler

from diffalign.config import OptimConfig

# Devices and dtypes torch's fused AdamW kernel takes (CPU since torch 2.4).
_FUSED_DEVICES = ("cuda", "cpu")
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fused_adamw_supported(params: list[torch.Tensor]) -> bool:
    """True when every parameter sits on one device type the fused AdamW kernel supports."""
    types = {p.device.type for p in params}
    return (len(types) == 1 and types <= set(_FUSED_DEVICES)
            and all(p.dtype in _FUSED_DTYPES for p in params))


def build_optimizer(
    param_groups: list[dict], cfg: OptimConfig, fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW over `param_groups`; fused (one kernel for all tensors) wherever torch has it.

    The fused kernel does the same update as the default for-each one and is the faster of the two
    on CUDA and on CPU (tiny UNet, 0.8M parameters, one thread: 2.2 ms against 11.6 ms per step).
    """
    kw = dict(betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if fused is None:
        fused = fused_adamw_supported([p for g in param_groups for p in g["params"]])
    return torch.optim.AdamW(param_groups, fused=fused or None, **kw)


class LrFactorMixin:
    """A learning-rate multiplier on top of the LR schedule (lowered by guard rollbacks).

    Subclasses set `scheduler` and `lr_factor` and name the torch optimizer whose groups carry the lr.
    """

    scheduler: object
    lr_factor: float

    def _lr_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer

    def _apply_lr_factor(self) -> None:
        if self.lr_factor != 1.0:
            for g, lr in zip(self._lr_optimizer().param_groups, self.scheduler.get_last_lr()):
                g["lr"] = lr * self.lr_factor

    def set_lr_factor(self, factor: float) -> None:
        self.lr_factor = factor
        self._apply_lr_factor()

    def lr(self) -> float:
        return float(self._lr_optimizer().param_groups[0]["lr"])


class TorchEngine(LrFactorMixin):
    """Plain or DDP-wrapped module with a torch optimizer and LR schedule."""

    def __init__(
        self,
        module: torch.nn.Module,
        params: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        cfg: OptimConfig,
        max_steps: int,
        forward_module: torch.nn.Module | None = None,
    ) -> None:
        self.module = module  # unwrapped (for saving, eval, sampling)
        self.forward_module = forward_module or module  # DDP wrapper when distributed
        self.params = params
        self.optimizer = optimizer
        self.grad_clip = cfg.grad_clip
        self.scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max_steps
        )
        self.lr_factor = 1.0
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_norm_and_clip(self) -> float:
        """Global grad norm before clipping (clips in place when grad_clip > 0)."""
        max_norm = self.grad_clip if self.grad_clip and self.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        return float(norm)

    def step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self._apply_lr_factor()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "lr_factor": self.lr_factor,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.lr_factor = state.get("lr_factor", 1.0)
        self._apply_lr_factor()
