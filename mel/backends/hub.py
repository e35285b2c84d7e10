"""Loading from a local directory or the Hugging Face hub, with one offline rule for every backend.

``hub_offline()`` is the rule: the hub is off when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``
is set to a true value now, or when huggingface_hub itself is in offline mode. Every loader that can
reach the hub (text encoders, CLIP, causal LMs, BLIP-2 cues) goes through ``load_pretrained``: a
hub id is read from the local Hugging Face cache first (no network), then, unless the hub is off,
downloaded. When it cannot be had, ``ModelUnavailableError`` says why and ends with ``OFFLINE_HINT``.
"""
from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path
from typing import Callable

from ..errors import CheckpointError, InputError, ModelUnavailableError

__all__ = ["OFFLINE_HINT", "hub_offline", "resolve_model_source", "load_pretrained", "from_pretrained",
           "refuse_unsafe_pickles", "looks_like_path"]

OFFLINE_HINT = ("use `--preset offline` to run with the packaged models only (all-MiniLM-L6-v2, "
                "EfficientNet-Lite0, SmolLM2-135M; no network)")

_TRUE = ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now,
    or huggingface_hub's own offline mode, which it reads once at import)."""
    if any(os.environ.get(var, "").strip().upper() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    return bool(constants.is_offline_mode())


def _hub_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ValueError]
    try:
        from huggingface_hub.errors import HfHubHTTPError

        errors.append(HfHubHTTPError)
    except ImportError:  # pragma: no cover - old huggingface_hub
        pass
    return tuple(errors)


def looks_like_path(ref: str) -> bool:
    """A reference meant as a filesystem path rather than a hub id ("org/name")."""
    return (
        ref.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or "\\" in ref
        or ref.count("/") > 1
        or (len(ref) > 1 and ref[1] == ":")  # C:\...
    )


def resolve_model_source(ref: str, what: str = "model") -> tuple[str, bool]:
    """`(source, is_local)`: an existing local directory, or a Hugging Face hub id.

    A reference that looks like a filesystem path but does not exist raises CheckpointError
    instead of being sent to the hub.
    """
    ref = ref.strip()
    if not ref:
        raise InputError(f"{what}: empty model reference")
    path = Path(os.path.expanduser(ref))
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{what}: {ref!r} is a file; expected a model directory (with config.json)")
        return str(path), True
    if looks_like_path(ref):
        raise CheckpointError(f"{what}: no such directory {ref!r} (and it is not a Hugging Face hub id)")
    return ref, False


@contextlib.contextmanager
def refuse_unsafe_pickles(what: str, source: str):
    """A pickled checkpoint (pytorch_model.bin) that fails transformers' weights-only torch.load is
    a CheckpointError that says why; nothing retries it unsafely (a pickle can run code)."""
    try:
        yield
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "global" in line.lower()), "")
        raise CheckpointError(
            f"{what}: {source!r} holds a pickled PyTorch checkpoint that failed the safe weights-only load"
            + (f" ({detail})" if detail else "")
            + "; pickles can run code, so it is not loaded any other way. Use safetensors weights (loading the "
              "model where you trust it and calling save_pretrained(dir) writes model.safetensors)") from e


def load_pretrained(loader: Callable, source: str, is_local: bool, what: str, **kwargs):
    """Call a ``from_pretrained``-style `loader` the way every backend here loads models.

    Local directory: ``local_files_only=True``; a failure is a CheckpointError naming the directory.
    Hub id: the local Hugging Face cache first (no network at all when it is there), then the hub
    (skipped when ``hub_offline()``); a failure is a ModelUnavailableError ending with OFFLINE_HINT.
    Weights: transformers reads safetensors, and a .bin only through torch.load(weights_only=True);
    a pickle that the weights-only load refuses is a CheckpointError (refuse_unsafe_pickles).
    """
    with refuse_unsafe_pickles(what, source):
        return _load_pretrained(loader, source, is_local, what, **kwargs)


def _load_pretrained(loader: Callable, source: str, is_local: bool, what: str, **kwargs):
    errors = _hub_errors()
    if is_local:
        try:
            return loader(source, local_files_only=True, **kwargs)
        except errors as e:
            raise CheckpointError(f"{what}: cannot load from directory {source!r}: {type(e).__name__}: {e}") from e
    try:
        return loader(source, local_files_only=True, **kwargs)
    except errors as cached_error:
        first = cached_error
    if hub_offline():
        raise ModelUnavailableError(
            f"{what}: {source!r} is not in the local Hugging Face cache and the hub is switched off "
            f"(HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set), so the hub is unreachable; pass a local "
            f"directory, unset the variable on a machine with network access, or {OFFLINE_HINT}. "
            f"({type(first).__name__}: {first})"
        ) from first
    try:
        return loader(source, **kwargs)
    except errors as e:
        raise ModelUnavailableError(
            f"{what}: could not download {source!r} from the Hugging Face hub: the hub is unreachable "
            f"from here or the id is wrong, and no local copy is cached. Pass a local directory, check "
            f"the id and the network, or {OFFLINE_HINT}. ({type(e).__name__}: {e})"
        ) from e


def from_pretrained(cls, ref: str, what: str, **kwargs):
    """`cls.from_pretrained(ref)` for a local directory or a hub id (the CLIP and BLIP-2 loader).

    An existing directory: loaded as it is; any failure is a CheckpointError naming it. A path that
    does not exist: ModelUnavailableError. A hub id: `load_pretrained` (local cache, then the hub
    unless `hub_offline()`, else ModelUnavailableError ending with OFFLINE_HINT).
    """
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{what}: {path} is a file; give the directory written by save_pretrained")
        with refuse_unsafe_pickles(what, ref):
            try:
                return cls.from_pretrained(str(path), **kwargs)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(f"{what}: cannot load {cls.__name__} from {path}: {e}") from e
    if not ref.strip() or ref.startswith(".") or looks_like_path(ref):
        raise ModelUnavailableError(f"{what}: no such directory {ref!r} (and it is not a Hugging Face hub id)")
    return load_pretrained(cls.from_pretrained, ref, False, what, **kwargs)
