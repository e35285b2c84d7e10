"""The linker contract shared by baselines, GEMEL and DIM."""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from ..errors import InputError, require_whole
from ..types import Candidate, LinkDetails, LinkResult, Mention


def check_k(k) -> int:
    """How many candidates to return: a whole number >= 1 (a negative k once returned almost the KB)."""
    return require_whole("k (how many candidates to return)", k, 1)


def check_mention(mention) -> Mention:
    if not isinstance(mention, Mention):
        raise InputError(f"a linker takes a Mention, got {type(mention).__name__}; build one with "
                         f"Mention.from_text(caption, mention, image=...)")
    return mention


class Linker:
    """Subclasses set `name` and implement `link`; `pipe` may be overridden to batch."""

    name = "linker"

    def __init__(self, kb, preset):
        self.kb = kb
        self.preset = preset

    def models(self) -> dict[str, str]:
        """The models this linker uses (role -> spec); shown in results and the UI."""
        return {}

    def link(self, mention: Mention, k: int = 20) -> LinkResult:
        raise NotImplementedError

    def pipe(self, mentions: Iterable[Mention], k: int = 20, batch_size: int = 32) -> Iterator[LinkResult]:
        check_k(k)
        for mention in mentions:
            yield self.link(mention, k=k)

    def result(self, mention: Mention, ranked: list[tuple[int, float]], *, source: str, timings: dict,
               details: LinkDetails | None = None) -> LinkResult:
        """A LinkResult from (kb idx, score) pairs, best first; the top one is the prediction."""
        entities = self.kb.entities_at([idx for idx, _ in ranked])
        candidates = [Candidate(entity, float(score), source) for entity, (_, score) in zip(entities, ranked)]
        return LinkResult(
            linker=self.name, mention=mention,
            prediction=candidates[0].entity if candidates else None,
            score=candidates[0].score if candidates else None,
            candidates=candidates, timings=timings,
            preset=getattr(self.preset, "name", ""), models=self.models(), details=details or LinkDetails())


class BatchLinker(Linker):
    """A linker that works a batch at a time: subclasses implement `_link_batch(mentions, k)`."""

    def link(self, mention: Mention, k: int = 20) -> LinkResult:
        return next(self.pipe([mention], k=k, batch_size=1))

    def pipe(self, mentions: Iterable[Mention], k: int = 20, batch_size: int = 64) -> Iterator[LinkResult]:
        check_k(k)
        require_whole("batch_size", batch_size, 1)
        batch: list[Mention] = []
        for mention in mentions:
            batch.append(check_mention(mention))
            if len(batch) == batch_size:
                yield from self._link_batch(batch, k)
                batch = []
        if batch:
            yield from self._link_batch(batch, k)

    def _link_batch(self, mentions: list[Mention], k: int) -> Iterator[LinkResult]:
        raise NotImplementedError


class Stopwatch:
    """Named stage timings in milliseconds: `with sw("encode"): ...`; `sw.timings` at the end."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()

    def __call__(self, stage: str):
        return _Stage(self, stage)

    def total(self) -> dict[str, float]:
        self.timings["total"] = (time.perf_counter() - self._start) * 1000
        return self.timings


class _Stage:
    def __init__(self, watch: Stopwatch, stage: str):
        self.watch, self.stage = watch, stage

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        ms = (time.perf_counter() - self.t0) * 1000
        self.watch.timings[self.stage] = self.watch.timings.get(self.stage, 0.0) + ms
