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


_UNSET = object()


class Linker:
    """Subclasses set `name` and implement `_link`; `_pipe` may be overridden to batch. Callers use
    the public `link` and `pipe`, which the subclasses leave alone.

    Calibrated confidence, for every linker: `link` and `pipe` pass each result of `_link` / `_pipe`
    through `apply_calibration`, which sets `Candidate.probability` from the scores with the
    linker's `calibration` (mel.calibration: found by itself on first use, beside its checkpoint or
    under models/calibration/<name>@<kb>; None: probabilities stay None) and, when `nil_threshold`
    is set, answers NIL (prediction None) when the best candidate's probability is below it.
    """

    name = "linker"
    nil_threshold: float | None = None  # set with mel.calibration.use_calibration(linker, ..., nil=True)
    # whether `link(..., exclude_sample_id=ID)` keeps sample ID out of what the linker draws on (GEMEL:
    # its demonstration pool); such a linker implements `_link_excluding`. mel.calibration uses it on a
    # train slice that is also the pool.
    excludes_samples: bool = False

    def __init__(self, kb, preset):
        self.kb = kb
        self.preset = preset

    @property
    def calibration(self):
        """The mel.calibration.Calibration this linker applies (None: no probabilities)."""
        cal = self.__dict__.get("_calibration", _UNSET)
        if cal is _UNSET:
            from ..calibration import default_calibration
            cal = self.__dict__["_calibration"] = default_calibration(self)
        return cal

    @calibration.setter
    def calibration(self, value) -> None:
        self.__dict__["_calibration"] = value

    def apply_calibration(self, result: LinkResult) -> LinkResult:
        """Probabilities for `result`'s candidates (best first) and NIL below the threshold; the
        same result again gives the same answer (the probabilities come from the scores)."""
        cal = self.calibration
        if cal is None or not isinstance(result, LinkResult):
            return result
        probs = cal.probabilities([c.score for c in result.candidates])
        for c, p in zip(result.candidates, probs, strict=True):
            c.probability = round(min(max(float(p), 0.0), 1.0), 6)
        threshold = self.nil_threshold
        if threshold is None:
            return result
        top = (result.candidates[0].probability or 0.0) if result.candidates else 0.0
        note = f"NIL: the best candidate's probability {top:.3f} is below the threshold {threshold:.3f}"
        if top < threshold:
            result.prediction = None
            if note not in result.details.note:
                result.details.note = f"{result.details.note}; {note}" if result.details.note else note
        return result

    def models(self) -> dict[str, str]:
        """The models this linker uses (role -> spec); shown in results and the UI."""
        return {}

    def link(self, mention: Mention, k: int = 20, exclude_sample_id: str | None = None) -> LinkResult:
        """Link one mention: the `k` best candidates, calibrated. `exclude_sample_id` (only for a linker
        with `excludes_samples`) keeps that sample out of what the linker draws on."""
        if exclude_sample_id is None:
            return self.apply_calibration(self._link(mention, k))
        if not self.excludes_samples:
            raise InputError(f"the {self.name} linker draws on no samples: exclude_sample_id does not apply to it")
        return self.apply_calibration(self._link_excluding(mention, k, exclude_sample_id))

    def pipe(self, mentions: Iterable[Mention], k: int = 20, batch_size: int = 32) -> Iterator[LinkResult]:
        """`link` for many mentions, in order (a batching linker runs `batch_size` at a time)."""
        for result in self._pipe(mentions, k, batch_size):
            yield self.apply_calibration(result)

    def _link(self, mention: Mention, k: int) -> LinkResult:
        raise NotImplementedError

    def _link_excluding(self, mention: Mention, k: int, sample_id: str | None) -> LinkResult:
        raise NotImplementedError(f"{type(self).__name__} sets excludes_samples but has no _link_excluding")

    def _pipe(self, mentions: Iterable[Mention], k: int, batch_size: int) -> Iterator[LinkResult]:
        check_k(k)
        for mention in mentions:
            yield self._link(mention, k)

    def result(self, mention: Mention, ranked: list[tuple[int, float]], *, source: str, timings: dict,
               details: LinkDetails | None = None) -> LinkResult:
        """A LinkResult from (kb idx, score) pairs, best first; the top one is the prediction."""
        entities = self.kb.entities_at([idx for idx, _ in ranked])
        candidates = [Candidate(entity, float(score), source)
                      for entity, (_, score) in zip(entities, ranked, strict=True)]
        return LinkResult(
            linker=self.name, mention=mention,
            prediction=candidates[0].entity if candidates else None,
            score=candidates[0].score if candidates else None,
            candidates=candidates, timings=timings,
            preset=getattr(self.preset, "name", ""), models=self.models(), details=details or LinkDetails())


class BatchLinker(Linker):
    """A linker that works a batch at a time: subclasses implement `_link_batch(mentions, k)`."""

    def pipe(self, mentions: Iterable[Mention], k: int = 20, batch_size: int = 64) -> Iterator[LinkResult]:
        return super().pipe(mentions, k=k, batch_size=batch_size)  # a larger default batch

    def _link(self, mention: Mention, k: int) -> LinkResult:
        return next(self._pipe([mention], k, 1))

    def _pipe(self, mentions: Iterable[Mention], k: int, batch_size: int) -> Iterator[LinkResult]:
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

    def __init__(self) -> None:
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
