"""Training utilities shared by the GEMEL mapper and the DIM fusion head."""
from .checkpoint import (
    check_checkpoint_target,
    load_config,
    load_pretrained_dir,
    load_state,
    load_training_state,
    read_training_state,
    recover_leftovers,
    recover_training_dirs,
    remove_written,
    save_pretrained_dir,
    save_training_state,
    update_config,
)
from .common import TrainConfig, check_number, check_whole, make_optimizer_and_scheduler, seed_everything

__all__ = [
    "TrainConfig",
    "check_checkpoint_target",
    "check_number",
    "check_whole",
    "load_config",
    "load_pretrained_dir",
    "load_state",
    "load_training_state",
    "make_optimizer_and_scheduler",
    "read_training_state",
    "recover_leftovers",
    "recover_training_dirs",
    "remove_written",
    "save_pretrained_dir",
    "save_training_state",
    "seed_everything",
    "update_config",
]
