"""The one model cache of the process: every model that mel.backends loads is kept here, once.

    @cached_model
    def load_lite0(device: str = "cpu"): ...   # built on the first call per arguments, shared afterwards

    clear_model_cache()                        # forget every loaded model (text, image, CLIP, LLM, cue,
                                               # faces, face-api, ConSE) and free their memory
    cached_models()                            # what is loaded: {"...load_lite0('cpu')": "EfficientNetLite"}

A loader's entries are keyed by its arguments exactly as given (like functools.lru_cache, so
`f()` and `f("cpu")` are two entries); each decorated loader also has `cache_clear()` (its own
entries only) and `__wrapped__` (the uncached function).

Concurrency: a model is built once even when two threads ask for it at the same time. Builds run
one at a time under a re-entrant lock (a loader may load another model: ConSE loads its text
encoder), while a model that is already loaded is returned without waiting for a build.
"""
from __future__ import annotations

import functools
import gc
import os
import sys
import threading
from typing import Any, Callable, TypeVar

__all__ = ["ModelCache", "MODELS", "cached_model", "clear_model_cache", "cached_models"]

F = TypeVar("F", bound=Callable[..., Any])


class ModelCache:
    """Models keyed by `(loader name, args, kwargs)`."""

    def __init__(self):
        self._models: dict[tuple, Any] = {}
        self._new_locks()
        # a fork while another thread holds a lock (an app thread loading a model) would leave the
        # child's copy locked forever: the child starts with fresh locks
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._new_locks)

    def _new_locks(self) -> None:
        self._lock = threading.Lock()    # guards _models; held only for dictionary operations
        self._build = threading.RLock()  # one build at a time; re-entrant for loaders that load models

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        """The model under `key`, calling `build()` (once) when there is none yet."""
        with self._lock:
            if key in self._models:
                return self._models[key]
        with self._build:
            with self._lock:
                if key in self._models:  # built by another thread while this one waited
                    return self._models[key]
            model = build()
            with self._lock:
                self._models[key] = model
            return model

    def clear(self, loader: str | None = None) -> int:
        """Forget the models of `loader` (its qualified name), or all of them; how many went."""
        with self._lock:
            keys = [k for k in self._models if loader is None or k[0] == loader]
            for k in keys:
                del self._models[k]
        return len(keys)

    def entries(self) -> list[tuple[tuple, Any]]:
        with self._lock:
            return list(self._models.items())

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)


MODELS = ModelCache()


def _loader_name(fn: Callable) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def cached_model(fn: F) -> F:
    """Decorator: keep what `fn(*args, **kwargs)` returns in MODELS, one entry per argument tuple."""
    name = _loader_name(fn)

    @functools.wraps(fn)
    def load(*args, **kwargs):
        key = (name, args, tuple(sorted(kwargs.items())))
        return MODELS.get(key, lambda: fn(*args, **kwargs))

    load.cache_clear = lambda: MODELS.clear(name)  # type: ignore[attr-defined]
    return load  # type: ignore[return-value]


def _describe(key: tuple) -> str:
    name, args, kwargs = key
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs]
    return f"{name}({', '.join(parts)})"


def cached_models() -> dict[str, str]:
    """Every loaded model: `"loader(args)"` -> the model's class name."""
    return {_describe(key): type(model).__name__ for key, model in MODELS.entries()}


def clear_model_cache() -> int:
    """Forget every loaded model and give its memory back (CPU, and the CUDA cache when CUDA is in
    use); the next load builds it again. Objects a caller still holds stay valid. Returns how many
    models were dropped."""
    n = MODELS.clear()
    gc.collect()  # models hold reference cycles (modules <-> hooks): free them now, not at some later GC
    torch = sys.modules.get("torch")  # no torch imported: no model can be on a GPU
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    return n
