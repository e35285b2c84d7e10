"""What both trainers share: the paper's optimisation recipe and reproducibility."""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError, require_finite, require_whole


@dataclass
class TrainConfig:
    """GEMEL's recipe by default: AdamW, 10% linear warm-up, clip 1.0, batch 1 x 16 accumulation."""

    lr: float = 1e-6
    epochs: int = 5
    batch_size: int = 1
    grad_accum: int = 16
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 42
    max_steps: int | None = None  # stop early (quick runs, tests)

    def __post_init__(self):
        check_whole(self, epochs=1, batch_size=1, grad_accum=1)
        require_whole("seed", self.seed, 0, 2**32 - 1)  # numpy's limit (torch takes up to 2**64 - 1)
        if self.max_steps is not None:
            check_whole(self, max_steps=1)
        check_number(self, lr=(0.0, None), weight_decay=(0.0, None), warmup_ratio=(0.0, 1.0),
                     max_grad_norm=(0.0, None))
        for name in ("lr", "max_grad_norm"):
            if getattr(self, name) == 0:
                raise InputError(f"{name.replace('_', '-')} must be > 0, got 0")


def check_whole(config, **minimum) -> None:
    """Each named field is a whole number >= its minimum, else a clear InputError (not a crash mid-run)."""
    for name, low in minimum.items():
        require_whole(name.replace("_", "-"), getattr(config, name), low)


def check_number(config, **bounds) -> None:
    """Each named field is a finite number within (low, high) bounds, inclusive; None: no bound."""
    for name, (low, high) in bounds.items():
        require_finite(name.replace("_", "-"), getattr(config, name), low, high)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer_and_scheduler(params, config: TrainConfig, total_steps: int):
    """AdamW + linear warm-up/decay over `total_steps` optimizer steps."""
    from transformers import get_linear_schedule_with_warmup
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), max(total_steps, 1))
    return optimizer, scheduler
