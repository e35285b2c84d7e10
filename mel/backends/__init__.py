"""Model backends: one loader per role, each model loaded once per process.

A *spec* names a model: ``"minilm"`` (packaged), ``"st:sentence-transformers/all-MiniLM-L6-v2"``,
``"clip:openai/clip-vit-base-patch32"``, ``"hf:facebook/opt-6.7b"``, ``"blip2:Salesforce/blip2-opt-2.7b"``,
``"conse"`` (a text-aligned image vector from packaged models), ``"faces"`` (the person-aware cue)...
Presets (``mel.presets``) map roles to specs. Loaders are imported lazily so that
``import mel`` stays cheap and a missing optional package only matters when it is used.
"""
from __future__ import annotations

import threading
from typing import Any

ROLES = ("image_encoder", "text_encoder", "mention_encoder", "llm", "cue")

_cache: dict[tuple[str, str, str], Any] = {}
_lock = threading.Lock()


def _load(role: str, spec: str, device: str):
    if role == "image_encoder":
        from .image import load_image_encoder
        return load_image_encoder(spec, device=device)
    if role in ("text_encoder", "mention_encoder"):
        if spec.startswith("clip:"):
            from .image import load_clip_text_encoder
            return load_clip_text_encoder(spec, device=device)
        from .text import load_text_encoder
        return load_text_encoder(spec, device=device)
    if role == "llm":
        from .llm import load_causal_lm
        return load_causal_lm(spec, device=device)
    if role == "cue":
        from .cue import load_cue_provider
        return load_cue_provider(spec, device=device)
    raise ValueError(f"unknown model role {role!r}; expected one of {ROLES}")


def get_backend(role: str, spec: str, device: str = "cpu"):
    """The model for `role` named by `spec`, loaded on first use and shared afterwards."""
    key = (role if role not in ("text_encoder", "mention_encoder") else "text", spec, device)
    with _lock:  # models are big: never load the same one twice, even from two threads
        if key not in _cache:
            _cache[key] = _load(role, spec, device)
        return _cache[key]


def loaded_backends() -> dict[str, str]:
    return {f"{role}:{spec}@{device}": type(model).__name__ for (role, spec, device), model in _cache.items()}
