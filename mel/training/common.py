"""What both trainers share: the paper's optimisation recipe and reproducibility."""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch


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
