"""Link millions of mentions on Ray Data: `python -m mel batch link|eval` (see mel.batch.cli).

    from mel.batch import batch_link, batch_eval
    summary = batch_link(kb="kb.sqlite", linker="dense", input="mentions.jsonl", output="out/")
    report = batch_eval(kb="kb.sqlite", linker="dense", format="wikimel", data=DIR, split="dev", output="out/")

The same `Linker` objects as everywhere (`mel.linkers.build_linker`) run inside a Ray Data actor
pool (`Dataset.map_batches` with a callable class: KB and models load once per actor). Output is
Parquet, one row per linked mention, written in parts that are published whole (write, flush,
rename), so a killed job rerun with the same command resumes from the parts already there without
duplicating rows. Unreadable rows are counted and written to `errors.jsonl` in the output folder.

Ray is optional: importing this package does not import it; running a batch job without it
raises ModelUnavailableError saying how to install it.
"""
from __future__ import annotations

from .engine import batch_eval, batch_link, require_ray

__all__ = ["batch_link", "batch_eval", "require_ray"]
