"""GEMEL's feature mapper: the only trained part of the model.

One `Linear(d_vision, d_embed * n_tokens)` turns an image feature vector into `n_tokens`
soft tokens that live in the LLM's input-embedding space (paper: 4 tokens from CLIP ViT-L/14's
pooled 1024-d output). `d_embed` is the width of the LLM's *input embeddings*, which is not
always its hidden size (OPT-350M embeds at 512 and projects up to 1024).

Saved as a directory (config.json + model.safetensors) through mel.training, never pickled.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..training import load_pretrained_dir, save_pretrained_dir


@dataclass
class MapperConfig:
    d_vision: int              # width of the image encoder's feature vector
    d_embed: int               # width of the LLM's input embeddings
    n_tokens: int = 4          # visual prefix tokens per image (paper: 4)
    image_encoder: str = ""    # spec of the encoder the mapper was trained on (checked at load)
    llm: str = ""              # spec of the LLM it was trained for (checked at load)
    # which image vector it maps (mel.gemel.features): "encoder" (the preset's image encoder) or "conse"
    # (the text-aligned ConSE vector); an old checkpoint without the field was trained on "encoder"
    image_feature: str = "encoder"
    # the prompt it was trained with (mel.gemel.prompt.PROMPT_STYLES): "paper", or "cue" (beyond the paper);
    # the linker's default prompt when this mapper is used. Old checkpoints: "paper"
    prompt: str = "paper"

    def __post_init__(self):
        for name in ("d_vision", "d_embed", "n_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"MapperConfig.{name} must be a positive integer, got {value!r}")
        from .features import IMAGE_FEATURES
        from .prompt import PROMPT_STYLES
        if self.image_feature not in IMAGE_FEATURES:
            raise CheckpointError(f"MapperConfig.image_feature must be one of {IMAGE_FEATURES}, got "
                                  f"{self.image_feature!r}")
        if self.prompt not in PROMPT_STYLES:
            raise CheckpointError(f"MapperConfig.prompt must be one of {PROMPT_STYLES}, got {self.prompt!r}")


class FeatureMapper(nn.Module):
    def __init__(self, config: MapperConfig):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.d_vision, config.d_embed * config.n_tokens)

    @property
    def n_tokens(self) -> int:
        return self.config.n_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(n_images, d_vision) -> (n_images, n_tokens, d_embed)."""
        if features.dim() == 1:
            features = features[None]
        if features.shape[-1] != self.config.d_vision:
            raise CheckpointError(
                f"the feature mapper expects {self.config.d_vision}-d image features but got "
                f"{features.shape[-1]}-d ones: it was trained for another image encoder "
                f"({self.config.image_encoder or 'unknown'}); use its preset or train a mapper for this one")
        out = self.proj(features.to(self.proj.weight.dtype))
        return out.view(features.shape[0], self.config.n_tokens, self.config.d_embed)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, extra: dict | None = None) -> Path:
        return save_pretrained_dir(self, self.config, path, extra=extra)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, d_vision: int | None = None, d_embed: int | None = None,
                        ) -> tuple["FeatureMapper", dict]:
        """Load a mapper directory; `d_vision`/`d_embed` (when given) must match what it was trained for."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"feature mapper {path} does not exist (or is not a directory); train one with "
                                  f"`python -m mel train gemel ... --out {path}`")
        mapper, payload = load_pretrained_dir(cls, MapperConfig, path)
        cfg = mapper.config
        if d_vision is not None and cfg.d_vision != d_vision:
            raise CheckpointError(
                f"{path} maps {cfg.d_vision}-d image features (encoder {cfg.image_encoder or '?'}) but this image "
                f"encoder gives {d_vision}-d ones; use the preset it was trained with or train a new mapper")
        if d_embed is not None and cfg.d_embed != d_embed:
            raise CheckpointError(
                f"{path} produces {cfg.d_embed}-d tokens (LLM {cfg.llm or '?'}) but this LLM embeds at "
                f"{d_embed}; use the preset it was trained with or train a new mapper")
        mapper.eval()
        return mapper, payload
