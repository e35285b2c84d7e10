"""`python -m mel train {gemel,dim,dim-visual,dim-prior,dim-numbers} ...`: each trainer module provides CONFIG (its training config
dataclass, whose fields become flags through transformers' HfArgumentParser), add_arguments(p) for
the other flags (data, output, resume) and run(args)."""
from __future__ import annotations

import importlib

from ..cli_kit import config_arguments

TRAINERS = {"gemel": "mel.gemel.train", "dim": "mel.dim.train", "dim-visual": "mel.dim.visual_train",
            "dim-prior": "mel.dim.prior_train", "dim-numbers": "mel.dim.number_train"}


def add_parser(subparsers) -> None:
    train = subparsers.add_parser("train", help="train GEMEL's feature mapper or DIM's fusion head")
    sub = train.add_subparsers(dest="trainer", required=True)
    for name, module_name in TRAINERS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # trainer not built yet
            raise
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else None,
                           parents=[config_arguments(module.CONFIG)])
        module.add_arguments(p)
        p.set_defaults(func=module.run)
