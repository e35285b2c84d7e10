"""Linkers: everything that turns a Mention into a LinkResult, behind one contract.

    linker = build_linker("dense", kb, preset)
    result = linker.link(mention)                 # one mention
    results = list(linker.pipe(mentions))         # batched, same results

New linkers register a factory under a name; the CLI, the evaluation harness and the app
find them here.
"""
from __future__ import annotations

import importlib
import json

from .base import Linker

# name -> "module:factory"; factories take (kb, preset, **options). Imported on first use.
LINKERS: dict[str, str] = {
    "exact": "mel.linkers.baselines:ExactLinker",
    "bm25": "mel.linkers.baselines:BM25Linker",
    "dense": "mel.linkers.baselines:DenseLinker",
    "gemel": "mel.gemel.linker:GemelLinker",              # generation over the whole KB trie
    "gemel+dense": "mel.gemel.linker:gemel_with_dense",   # trie over the dense top-k
    "gemel+bm25": "mel.gemel.linker:gemel_with_bm25",     # trie over the BM25 top-k
    "gemel+dim": "mel.gemel.linker:gemel_with_dim",       # trie over DIM's top-k
    "dim": "mel.dim.linker:DimLinker",
}


def option_value(text: str):
    """A linker option's value from the command line: JSON when it parses (16, false, 0.5), else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_options(items) -> dict:
    """`["top_k=10", "candidates=bm25"]` -> {"top_k": 10, "candidates": "bm25"} (CLI `--opt`, bench specs)."""
    options = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            from ..errors import InputError
            raise InputError(f"linker option {item!r} is not KEY=VALUE: give the option's name and its value, "
                             f"e.g. --opt top_k=10")
        options[key.strip()] = option_value(value)
    return options


def register_linker(name: str, target: str) -> None:
    LINKERS[name] = target


def build_linker(name: str, kb, preset, **options) -> Linker:
    if name not in LINKERS:
        from ..errors import MELError
        raise MELError(f"unknown linker {name!r}; available: {', '.join(sorted(LINKERS))}")
    module, attr = LINKERS[name].split(":")
    factory = getattr(importlib.import_module(module), attr)
    try:
        return factory(kb, preset, **options)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        from ..errors import InputError
        known = _option_names(factory)
        raise InputError(f"linker {name!r} has no option {str(exc).rsplit(' ', 1)[-1]}"
                         + (f"; its options: {', '.join(known)}" if known else "")) from exc
    except ValueError as exc:  # a value of the wrong kind: int("abc"), an unknown query mode...
        if not options:
            raise
        from ..errors import InputError
        raise InputError(f"linker {name!r} refused its options {options}: {exc}") from exc


def _option_names(factory) -> list[str]:
    """The keyword options a linker class takes (empty for factory functions: see their docstring)."""
    import inspect
    if not inspect.isclass(factory):
        return []
    params = inspect.signature(factory.__init__).parameters.values()
    return [p.name for p in params if p.name not in ("self", "kb", "preset") and p.kind is not p.VAR_KEYWORD]


__all__ = ["Linker", "LINKERS", "build_linker", "register_linker", "parse_options", "option_value"]
