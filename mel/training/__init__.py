"""Training utilities shared by the GEMEL mapper and the DIM fusion head."""
from .checkpoint import load_config, load_state, save_pretrained_dir, load_pretrained_dir, save_training_state, load_training_state
from .common import seed_everything, TrainConfig, make_optimizer_and_scheduler
