"""Model backends: one loader per role, each model loaded once per process.

A *spec* names a model: ``"minilm"`` (packaged), ``"st:sentence-transformers/all-MiniLM-L6-v2"``,
``"clip:openai/clip-vit-base-patch32"``, ``"hf:facebook/opt-6.7b"``, ``"blip2:Salesforce/blip2-opt-2.7b"``,
``"conse"`` (a text-aligned image vector from packaged models), ``"faces"`` (the person-aware cue)...
Presets (``mel.presets``) map roles to specs. Loaders are imported lazily so that
``import mel`` stays cheap and a missing optional package only matters when it is used.

Every loaded model lives in the one model cache (``mel.backends.cache``): ``get_backend`` shares a
model per (role, spec, device), and ``clear_model_cache()`` forgets all of them (text, image, CLIP,
LLM, cue, faces, face-api, ConSE) and frees their memory. Every backend that can reach the Hugging
Face hub follows one offline rule (``mel.backends.hub.hub_offline``).
"""
from __future__ import annotations

from .cache import MODELS, cached_model, cached_models, clear_model_cache

__all__ = ["ROLES", "get_backend", "loaded_backends", "clear_model_cache", "cached_models"]

ROLES = ("image_encoder", "text_encoder", "mention_encoder", "llm", "cue")


def _load(role: str, spec: str, device: str):
    if role == "image_encoder":
        from .image import load_image_encoder
        return load_image_encoder(spec, device=device)
    if role == "text_encoder":
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
    raise AssertionError(role)


@cached_model
def _shared(role: str, spec: str, device: str):
    return _load(role, spec, device)


def get_backend(role: str, spec: str, device: str = "cpu"):
    """The model for `role` named by `spec`, loaded on first use and shared afterwards (also between
    threads: a model is never loaded twice). Text and mention encoders of one spec are one model."""
    if role not in ROLES:
        raise ValueError(f"unknown model role {role!r}; expected one of {ROLES}")
    return _shared("text_encoder" if role == "mention_encoder" else role, spec, device)


def loaded_backends() -> dict[str, str]:
    """`"role:spec@device"` -> class name of every model that get_backend holds."""
    name = f"{_shared.__module__}.{_shared.__qualname__}"
    out = {}
    for (loader, args, _), model in MODELS.entries():
        if loader == name:
            role, spec, device = args
            out[f"{'text' if role == 'text_encoder' else role}:{spec}@{device}"] = type(model).__name__
    return out
