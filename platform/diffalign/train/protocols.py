"""The extension points of the training loop, typed as Protocols: what a callback, an engine and a
batch source provide. The loop calls a callback's methods only where the callback defines them, so a
callback may implement just the events it cares about; subclassing `Callback` gives no-op defaults
for the rest (and a type checker the whole interface).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

# The loop's `Trainer`, not imported: the loop imports these protocols, and the graph stays acyclic
# even for tools that count type-only imports.
Trainer = Any


class Callback(Protocol):
    """Trainer events (each optional).

    - on_start(trainer): after resume / restore, before the first step;
    - on_before_backward(trainer, loss) -> loss: may replace the micro-batch loss (e.g. the mean
      over ranks for the guards) before backward;
    - on_after_backward(trainer, params): gradients of the accumulated step exist (fault tests);
    - on_step(trainer, metrics): after each optimizer step; may add metrics for later callbacks;
    - on_event(trainer, event): a guard skipped a step or rolled back;
    - on_checkpoint(trainer, path): a checkpoint was written;
    - on_end(trainer, summary): training finished (samplers and scorers still up);
    - on_weights_saved(trainer, path): rank 0 wrote the final weights (diffusers format).
    """

    def on_start(self, trainer: Trainer) -> None: ...

    def on_before_backward(self, trainer: Trainer, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def on_after_backward(self, trainer: Trainer, params: Sequence[torch.nn.Parameter]) -> None: ...

    def on_step(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...

    def on_event(self, trainer: Trainer, event: dict[str, Any]) -> None: ...

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None: ...

    def on_end(self, trainer: Trainer, summary: dict[str, float]) -> None: ...

    def on_weights_saved(self, trainer: Trainer, path: Path) -> None: ...


@runtime_checkable
class Engine(Protocol):
    """Optimizer + backward for the policy: `TorchEngine` (plain or DDP) or the DeepSpeed adapter."""

    forward_module: torch.nn.Module
    params: list[torch.nn.Parameter]
    lr_factor: float

    def backward(self, loss: torch.Tensor) -> None: ...

    def grad_norm_and_clip(self) -> float: ...

    def step(self) -> None: ...

    def zero_grad(self) -> None: ...

    def lr(self) -> float: ...

    def set_lr_factor(self, factor: float) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class BatchSource(Protocol):
    """(dataset items of one micro-batch, micro-step number) -> a collated batch. A pure function of
    its arguments offline (`collate_pairs`); online it adds on-policy rejected samples."""

    def __call__(self, items: Sequence[dict], micro_step: int) -> dict: ...
