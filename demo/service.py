"""The app's service layer: everything the UI does, as plain Python (the UI only renders).

    service = LinkService(ServiceConfig(preset="offline"))
    service.load()                                   # KB, linkers, pool, store; once per process
    view = service.link(caption, start, end, image="photo.jpg", annotator="alice")
    ack = service.correct("alice", view.mention_id, "accept_dim", view.ranked[0]["id"])
    service.undo("alice")

Two linkers run on every mention: a generative one (GEMEL: its generated name, entity, score
and the demonstrations it retrieved) and a ranking one (DIM: the expert cue and the ranked
candidates). A linker that cannot be built here (missing checkpoint, model not downloadable)
is reported as unavailable with the reason; the ranking panel then falls back to the dense
baseline and says so, instead of the app refusing to start.

The generator is `gemel+bm25` by default (the LLM scores BM25's top 20: more accurate with the
small offline LLM than generating over the whole KB: WikiMEL dev H@1 0.7650 vs 0.5100 on the first
200 mentions); `generator="gemel"` is the paper's whole-KB generation. Each panel carries what its
confidences are (`PanelResult.calibration`, mel.calibration.calibration_summary): calibrated
probabilities where the linker has a calibration for this KB, else none; with `nil=True` a
calibrated linker answers NIL below its calibration's threshold (the result's note says so).

Every mention linked, every prediction shown and every correction goes to the annotation
store (annotations.AnnotationStore). With `live_pool` on, a correction joins GEMEL's
demonstration pool before the next link retrieves demonstrations, and an undone one leaves it:
saving and undoing only queue the change (they never wait for a running link), and the next
link applies the queue under the link lock, checked against the corrections the store holds.

The pool is shared, but each annotator sees a view of it (`pool_view`): the pool's own examples,
their own corrections and decisions, and decisions a reviewer confirmed; never another
annotator's unreviewed ones, so one annotator's mistake does not change another's suggestions.
Predictions stored for a project's tasks (shared by its annotators) use the view of nobody:
the pool's examples and reviewed decisions only.

Every input has a bound (MAX_QUERY_CHARS, MAX_SEARCH_K, MAX_ID_CHARS, the caption limit of
mel.types): one request cannot keep the others waiting by sending a huge value.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from annotations import FORMATS, AnnotationStore, NotAllowedError, export_corrections
from annotations.store import ACTIONS, LINK_ACTIONS, STANDING
from mel.errors import InputError, MELError
from mel.spans import follow_edit, resolve_mention, resolve_span, span_holds
from mel.types import NIL, DimDetails, Entity, Example, GemelDetails, LinkResult, Mention, check_typed_text

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]

MAX_QUERY_CHARS = 200   # a KB search is for a name or a few words
MAX_SEARCH_K = 50       # search results returned at most
MAX_ID_CHARS = 200      # mention ids are 32 hex digits; KB ids are short
CORRECTION_SAMPLE = "correction-"  # sample_id prefix of corrections in the live pool


def check_id(value, field: str, hint: str) -> str:
    """`value` as an id: text of at most MAX_ID_CHARS characters, no control characters, no
    unpaired surrogates (which SQLite and UTF-8 cannot store); else InputError naming `field`."""
    if not isinstance(value, str):
        raise InputError(f"{field} must be text, got {type(value).__name__}; {hint}")
    if len(value) > MAX_ID_CHARS:
        raise InputError(f"{field} has {len(value):,} characters, more than the limit of {MAX_ID_CHARS}; {hint}")
    for i, ch in enumerate(value):
        if 0xD800 <= ord(ch) <= 0xDFFF:
            raise InputError(f"{field} contains the unpaired surrogate U+{ord(ch):04X} at position {i} (half of an "
                             f"emoji or symbol), which is not text; {hint}")
        if ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F:
            raise InputError(f"{field} contains the control character U+{ord(ch):04X} at position {i}; {hint}")
    return value


IMAGE_FORMATS = "JPEG, PNG, WebP, GIF, BMP or TIFF"


def check_upload(path) -> None:
    """Decode an uploaded file with PIL (mel.imageio) as soon as it arrives; InputError if it is not
    an image this app reads, saying so and which formats work (a text file renamed to .png, a
    truncated photo, a decompression bomb). The caller keeps everything else the user entered."""
    from mel.imageio import load_image
    if path is None:
        return
    name = Path(str(path)).name
    try:
        load_image(str(path), name=f"the file {name!r}")
    except InputError as exc:
        raise InputError(f"{exc}. It was not attached: upload a photo in {IMAGE_FORMATS} format "
                         f"(your caption and mention are kept)") from None


def locate_mention(caption, mention, start, end) -> tuple[int, int]:
    """The span the Link button would link, checked as LinkService.link checks it (InputError with
    what was wrong and what to do: no caption, a mention not in the caption, a span too long)."""
    s, e = resolve_span(caption, mention, start, end)
    resolve_mention(caption, None, s, e)
    return s, e


def retarget_offsets(caption, mention, start, end) -> tuple[int | None, int | None]:
    """start / end after the user typed `mention`: kept where they still hold that text (a
    highlighted second occurrence stays the second), else where the typed text first occurs in
    the caption (any case), else cleared (None, None): never the stale span of an old highlight."""
    if not isinstance(caption, str) or not isinstance(mention, str) or not mention.strip() or not caption.strip():
        return None, None
    try:
        return resolve_span(caption, mention, start, end)
    except (MELError, TypeError, ValueError, OverflowError):
        return None, None


def follow_caption_edit(before, start, end, caption, mention, selected: bool) -> tuple[int | None, int | None] | None:
    """The mention's offsets after the caption went from `before` to `caption` (None: not known). A
    mention that was at [start, end) of `before` moves with an edit made elsewhere (a second
    "Collins" stays the second); a typed one is then found as retarget_offsets finds it. None: a
    selected mention (`selected`) the edit went through or took out, or whose place is not known."""
    if isinstance(before, str) and isinstance(caption, str) and span_holds(before, mention, start, end):
        moved = follow_edit(before, caption, int(start), int(end))
        if moved is None and selected:
            return None
        start, end = moved or (start, end)
    if selected:   # a selected word is never moved onto another copy of its text: kept where it is, or cleared
        return (int(start), int(end)) if span_holds(caption, mention, start, end) else None
    return retarget_offsets(caption, mention, start, end)


def check_search_k(k) -> int:
    """How many search results: a whole number from 1 to MAX_SEARCH_K."""
    whole = None
    if not isinstance(k, bool):
        try:
            whole = int(k) if float(k) == int(k) else None
        except (TypeError, ValueError, OverflowError):
            whole = None
    if whole is None or not 1 <= whole <= MAX_SEARCH_K:
        shown = repr(k) if len(repr(k)) <= 40 else repr(k)[:40] + "..."
        raise InputError(f"k (how many search results) must be a whole number from 1 to {MAX_SEARCH_K}, "
                         f"got {shown}")
    return whole


def default_data_dir() -> Path:
    """$MEL_DATA_DIR; else /data/mel on a Hugging Face Space with persistent storage; else ./data/app."""
    env = os.environ.get("MEL_DATA_DIR")
    if env:
        return Path(env)
    if os.environ.get("SPACE_ID") and os.path.isdir("/data") and os.access("/data", os.W_OK):
        return Path("/data/mel")
    return Path.cwd() / "data" / "app"


@dataclass
class ServiceConfig:
    kb: str | None = None               # a KB built with `mel kb build`; None = the bundled demo KB
    pool: str | None = None             # JSONL of Examples for GEMEL's demonstrations; None = the demo pool
    preset: str = "auto"
    device: str | None = None
    data_dir: str | None = None         # where annotations.sqlite and images/ live
    generator: str = "gemel+bm25"       # the generative panel's linker ("gemel": whole KB, the paper's; "" = off)
    ranker: str = "dim"                 # the ranking panel's linker
    fallback_ranker: str = "dense"      # used when `ranker` cannot be built here
    generator_options: dict = field(default_factory=dict)
    ranker_options: dict = field(default_factory=dict)
    k: int = 10                         # candidates shown
    live_pool: bool = True              # corrections join the demonstration pool at once
    warm_up: bool = True                # run each linker once at load, so the first user link is fast
    nil: bool = False                   # calibrated linkers answer NIL below their calibration's threshold


@dataclass
class PanelResult:
    """One linker's output as shown, or why there is none."""

    role: str                        # "generator" | "ranker"
    linker: str                      # the linker that produced it (may be the fallback)
    result: LinkResult | None = None
    error: str | None = None
    note: str = ""                   # e.g. "DIM is unavailable (...): showing the dense baseline"
    prediction_id: int | None = None
    calibration: dict | None = None  # what its probabilities are (mel.calibration.calibration_summary)


@dataclass
class LinkView:
    """Everything one link shows, ready to render."""

    mention: Mention
    mention_id: str
    image_sha256: str | None
    generator: PanelResult | None
    ranker: PanelResult
    cue: dict | None
    demonstrations: list[dict]
    timings: dict[str, Any]
    preset: dict[str, Any]

    @property
    def ranked(self) -> list[dict]:
        r = self.ranker.result
        if r is None:
            return []
        return [{"rank": i, "id": c.entity.id, "name": c.entity.name, "description": c.entity.description,
                 "score": c.score, "probability": c.probability, "source": c.source}
                for i, c in enumerate(r.candidates, start=1)]

    @property
    def generated(self) -> dict | None:
        g = self.generator
        if g is None or g.result is None:
            return None
        r = g.result
        text = r.details.generated if isinstance(r.details, GemelDetails) else None
        chosen = next((c for c in r.candidates if r.prediction and c.entity.id == r.prediction.id), None)
        return {"generated": text if text is not None else (r.prediction.name if r.prediction else ""),
                "id": r.prediction.id if r.prediction else NIL, "name": r.prediction.name if r.prediction else "NIL",
                "description": r.prediction.description if r.prediction else "", "score": r.score,
                "probability": chosen.probability if chosen is not None else None,
                "note": r.details.note}

    def to_dict(self) -> dict:
        def panel(p: PanelResult | None):
            if p is None:
                return None
            return {"linker": p.linker, "error": p.error, "note": p.note, "prediction_id": p.prediction_id,
                    "prediction": (p.result.prediction.to_dict() if p.result and p.result.prediction else None),
                    "score": p.result.score if p.result else None,
                    "result_note": p.result.details.note if p.result else "", "calibration": p.calibration,
                    "timings": p.result.timings if p.result else {}}
        return {"mention_id": self.mention_id, "mention": self.mention.to_dict(), "text": self.mention.text,
                "image_sha256": self.image_sha256, "generator": panel(self.generator), "generated": self.generated,
                "ranker": panel(self.ranker), "candidates": self.ranked, "cue": self.cue,
                "demonstrations": self.demonstrations, "timings": self.timings, "preset": self.preset}


class LinkService:
    def __init__(self, config: ServiceConfig | None = None):
        self.config = config or ServiceConfig()
        self.data_dir = Path(self.config.data_dir) if self.config.data_dir else default_data_dir()
        self.preset = None
        self.kb = None
        self.kb_label = ""
        self.store: AnnotationStore | None = None
        self.generator = None
        self.ranker = None
        self.ranker_name = self.config.ranker
        self.status: dict[str, str] = {}       # linker role -> "ok" or why it is unavailable
        self.pool_description = ""
        self.load_seconds: dict[str, float] = {}
        self._pooled: dict[int, str] = {}       # correction id -> sample_id added to the live pool
        self._pool_ops: list[tuple] = []        # ("add", id, mention_id, entity) / ("remove", id), not yet applied
        self._pool_ops_lock = threading.Lock()  # guards _pool_ops only: never held while a model runs
        self._load_lock = threading.Lock()
        self._project_linkers: dict[tuple[str, str], SerializedLinker] = {}
        self._project_kbs: dict[str, Any] = {}
        self._link_lock = threading.Lock()      # linkers hold models that are not re-entrant; guards the pool
        self._loaded = False

    # -- loading -----------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self, progress: Progress | None = None) -> "LinkService":
        """Load preset, KB, linkers and store, once; later calls return at once."""
        if self._loaded:
            return self
        with self._load_lock:
            if self._loaded:
                return self
            say = progress or (lambda f, d: None)
            t = time.perf_counter()
            from mel.presets import get_preset
            self.store = AnnotationStore(self.data_dir)
            self.preset = get_preset(self.config.preset, device=self.config.device)
            say(0.1, f"preset {self.preset.name}: loading the knowledge base")
            self._load_kb()
            self.load_seconds["kb"] = time.perf_counter() - t
            say(0.3, f"loading the generative linker ({self.config.generator})" if self.config.generator
                else "no generative linker (--generator '')")
            t = time.perf_counter()
            self._load_generator()
            self.load_seconds["generator"] = time.perf_counter() - t
            say(0.6, f"loading the ranking linker ({self.ranker_name})" if self.ranker_name else "no ranking linker")
            t = time.perf_counter()
            self._load_ranker()
            self.load_seconds["ranker"] = time.perf_counter() - t
            if self.config.warm_up:
                say(0.8, "warming up the models")
                t = time.perf_counter()
                self._warm_up()
                self.load_seconds["warm_up"] = time.perf_counter() - t
            self._loaded = True
            say(1.0, "ready")
        return self

    def _load_kb(self) -> None:
        from mel.kb import KnowledgeBase
        if self.config.kb:
            path = Path(self.config.kb)
        else:
            from .bundled import ensure_demo_kb
            path = ensure_demo_kb(self.preset)
        self.kb = KnowledgeBase(path)
        self.kb_label = f"{path.name} ({self.kb.meta.get('created', '')})"

    def _pool_options(self) -> dict:
        """GEMEL's pool: --pool, else the demo pool when the KB is the demo KB."""
        options = dict(self.config.generator_options)
        if "pool" in options or "pool_data" in options:
            return options
        if self.config.pool:
            options["pool"] = self.config.pool
        elif not self.config.kb:
            from .bundled import POOL_FILE
            options["pool"] = str(POOL_FILE)
        return options

    def _load_generator(self) -> None:
        from mel.linkers import build_linker
        name = self.config.generator
        if not name:
            self.status["generator"] = "off"
            return
        try:
            self.generator = self._use_nil(build_linker(name, self.kb, self.preset, **self._pool_options()))
            self.status["generator"] = "ok"
        except Exception as exc:  # any failure: show why, keep the app up (logged with traceback)
            log.warning("generative linker %r unavailable", name, exc_info=not isinstance(exc, MELError))
            self.status["generator"] = _why(exc)
            return
        pool = self.pool()
        if pool is not None:
            self.pool_description = f"{len(pool)} demonstrations"
            if self.config.live_pool:
                self._pool_existing_corrections(pool)

    def _load_ranker(self) -> None:
        from mel.linkers import build_linker
        try:
            self.ranker = self._use_nil(build_linker(self.config.ranker, self.kb, self.preset,
                                                     **self.config.ranker_options))
            self.ranker_name = self.config.ranker
            self.status["ranker"] = "ok"
        except Exception as exc:
            log.warning("ranking linker %r unavailable", self.config.ranker, exc_info=not isinstance(exc, MELError))
            self.status["ranker"] = _why(exc)
            # must work: it is the baseline
            self.ranker = self._use_nil(build_linker(self.config.fallback_ranker, self.kb, self.preset))
            self.ranker_name = self.config.fallback_ranker

    def _use_nil(self, linker):
        """With `nil`, `linker` answers NIL below its calibration's threshold (when it has both)."""
        cal = linker.calibration if self.config.nil else None
        if cal is not None and cal.nil_threshold is not None:
            from mel.calibration import use_calibration
            use_calibration(linker, cal, nil=True)
        return linker

    def calibrations(self) -> dict:
        """{linker name: its mel Calibration} of the app's linkers and the projects' ones built so
        far (render_task shows stored predictions' probabilities with them)."""
        linkers = [self.generator, self.ranker] + [s.linker for s in list(self._project_linkers.values())]
        out = {}
        for linker in linkers:
            cal = getattr(linker, "calibration", None) if linker is not None else None
            if cal is not None:
                out.setdefault(linker.name, cal)
        return out

    def _warm_up(self) -> None:
        """One link per linker on a bundled example: lazy models, tries and caches load now."""
        from .bundled import bundled_examples
        try:
            ex = bundled_examples()[0]
            mention = Mention(ex.caption, ex.start, ex.end, image=ex.image)
        except MELError:
            mention = Mention("warm up", 0, 4)
        for linker in (self.generator, self.ranker):
            if linker is None:
                continue
            try:
                with self._link_lock:
                    linker.link(mention, k=self.config.k)
            except Exception:  # a failing linker shows its error on the first real link
                log.warning("warm-up of %s failed", getattr(linker, "name", linker), exc_info=True)

    def pool(self):
        """GEMEL's demonstration pool (an object with add()), or None."""
        for obj in (self.generator, getattr(self.generator, "generator", None), getattr(self.generator, "gemel", None)):
            pool = getattr(obj, "pool", None)
            if pool is not None and hasattr(pool, "add"):
                return pool
        return None

    def describe(self) -> dict[str, Any]:
        p = self.preset
        return {
            "preset": p.name if p else None, "reason": p.reason if p else "", "device": p.device if p else None,
            "models": p.models() if p else {}, "kb": self.kb_label, "kb_size": self.kb.size if self.kb else 0,
            "generator": {"linker": self.config.generator, "status": self.status.get("generator", "")},
            "ranker": {"linker": self.ranker_name, "wanted": self.config.ranker,
                       "status": self.status.get("ranker", "")},
            "pool": self.pool_description or "none", "data_dir": str(self.data_dir),
            "load_seconds": {k: round(v, 2) for k, v in self.load_seconds.items()},
        }

    # -- linking -----------------------------------------------------------------------------
    def link(self, caption: str, start: int, end: int, image: str | Path | None = None, *, annotator: str = "",
             source: str = "app", progress: Progress | None = None) -> LinkView:
        say = progress or (lambda f, d: None)
        if not self._loaded:
            say(0.0, "loading models (first time only)")
            self.load(progress=lambda f, d: say(0.3 * f, d))
        t_start = time.perf_counter()
        timings: dict[str, Any] = {}
        if start is None or end is None:
            raise InputError(f"start and end must be whole numbers, got {start!r} and {end!r}")
        mention = resolve_mention(caption, None, start, end)  # checked once: span, length, control characters
        t = time.perf_counter()
        sha = self.store.save_image(image) if image else None
        stored = self.store.image_path(sha) if sha else None
        # the same Mention (NFC caption and offsets) with the stored image: never rebuilt from the raw caption
        mention = dataclasses.replace(mention, image=str(stored) if stored else None)
        mention.id = self.store.record_mention(mention, image_sha256=sha, source=source)
        timings["store_mention"] = _ms(t)

        generator = None
        if self.generator is not None:
            say(0.35, "GEMEL: retrieving demonstrations and generating")
            generator = self._run("generator", self.config.generator, self.generator, mention, annotator)
        elif self.config.generator:
            generator = PanelResult("generator", self.config.generator, error=self.status.get("generator"))
        say(0.7, "DIM: expert cue and ranking")
        ranker = self._run("ranker", self.ranker_name, self.ranker, mention)
        if self.ranker_name != self.config.ranker:
            ranker.note = (f"{self.config.ranker} is unavailable ({self.status.get('ranker')}); "
                           f"showing the {self.ranker_name} baseline instead")

        say(0.9, "saving the predictions")
        t = time.perf_counter()
        panels = [p for p in (generator, ranker) if p is not None]
        shown = [p.result if p.result is not None else {"linker": p.linker, "error": p.error, "preset": self.preset.name}
                 for p in panels]
        ids = self.store.record_predictions(mention.id, shown, kb=self.kb_label, shown_to=annotator)
        for p, pid in zip(panels, ids, strict=True):
            p.prediction_id = pid
        timings["store_predictions"] = _ms(t)
        for p in panels:
            if p.result is not None:
                timings[p.linker] = {k: round(v, 1) for k, v in p.result.timings.items()}
        timings["total"] = _ms(t_start)
        return LinkView(mention, mention.id, sha, generator, ranker, cue=self._cue(ranker, mention),
                        demonstrations=self._demonstrations(generator), timings=timings,
                        preset={"name": self.preset.name, "reason": self.preset.reason, "device": self.preset.device,
                                "models": {p.linker: p.result.models for p in panels if p.result is not None},
                                "kb": self.kb_label})

    def _run(self, role: str, name: str, linker, mention: Mention, annotator: str | None = None) -> PanelResult:
        try:
            with self._link_lock:
                scope = nullcontext()
                if role == "generator":
                    self._apply_pool_ops()  # corrections saved or undone since the last link
                    scope = self.pool_scope(annotator)
                with scope:
                    result = linker.link(mention, k=self.config.k)
            return PanelResult(role, name, result=result, calibration=_calibration_summary(linker))
        except MELError as exc:
            return PanelResult(role, name, error=str(exc))
        except Exception as exc:  # one linker failing must not hide the other's result
            log.exception("%s failed on %r", name, mention.text)
            return PanelResult(role, name, error=f"{type(exc).__name__}: {exc}")

    def _cue(self, ranker: PanelResult, mention: Mention) -> dict | None:
        """DIM's expert cue; when DIM is not running, asked of the preset's cue provider directly."""
        details = ranker.result.details if ranker.result is not None else None
        cue = details.cue if isinstance(details, DimDetails) else None
        if cue is None and mention.image and self.ranker_name != self.config.ranker:
            try:
                from mel.imageio import load_image
                with self._link_lock:
                    cue = self.preset.backend("cue").cue(load_image(mention.image))
            except Exception as exc:
                return {"text": "", "provider": self.preset.cue, "error": _why(exc)}
        if cue is None:
            return None if mention.image else {"text": "", "provider": self.preset.cue, "error": "no image: no cue"}
        if hasattr(cue, "to_dict"):  # DIM's ExpertCue; a cue provider's own record
            cue = cue.to_dict()
        if isinstance(cue, str):
            cue = {"text": cue, "provider": self.preset.cue}
        return dict(cue)

    @staticmethod
    def _demonstrations(generator: PanelResult | None) -> list[dict]:
        if generator is None or generator.result is None or not isinstance(generator.result.details, GemelDetails):
            return []
        return [d.to_dict() for d in generator.result.details.demonstrations]

    # -- annotation --------------------------------------------------------------------------
    def search(self, query: str, k: int = 10) -> list[Entity]:
        """KB entities for a query: exact name/alias matches first, then BM25 (FTS5).

        The query has at most MAX_QUERY_CHARS characters and k is 1..MAX_SEARCH_K (else InputError).
        """
        k = check_search_k(k)
        if query is None:
            query = ""
        if not isinstance(query, str):
            raise InputError(f"the search query must be text, got {type(query).__name__}")
        if len(query) > MAX_QUERY_CHARS:
            raise InputError(f"the search query has {len(query):,} characters, more than the limit of "
                             f"{MAX_QUERY_CHARS}; search for a name or a few words")
        check_typed_text(query, "search query")
        query = query.strip()
        if not query:
            return []
        idxs: list[int] = []
        for idx, _kind in self.kb.lookup_name(query):
            if idx not in idxs:
                idxs.append(idx)
        for idx, _score in self.kb.search_bm25(query, k=k):
            if idx not in idxs:
                idxs.append(idx)
        return self.kb.entities_at(idxs[:k])

    def correct(self, annotator: str | None, mention_id: str, action: str, entity_id: str | None = None, *,
                prediction_id: int | None = None, live_pool: bool | None = None):
        """Save a correction; returns the store's Ack (given only after the commit)."""
        if not annotator:
            raise NotAllowedError("log in to save corrections: this app records who made each correction (a server "
                                  "without logins saves none until its admin sets MEL_AUTH)")
        check_id(mention_id, "mention_id", "use the mention_id that linking the mention returned")
        if not isinstance(action, str) or action not in ACTIONS:
            shown = repr(action) if len(repr(action)) <= 40 else repr(action)[:40] + "..."
            raise InputError(f"unknown action {shown}; expected one of {', '.join(ACTIONS)}")
        if entity_id is not None:
            check_id(entity_id, "entity_id", "use the id of a candidate or of a search result")
        if prediction_id is not None and (isinstance(prediction_id, bool) or not isinstance(prediction_id, int)):
            raise InputError(f"prediction_id must be a whole number, got {type(prediction_id).__name__}")
        entity = None
        if action in LINK_ACTIONS:
            if not entity_id:
                raise InputError("choose an entity first (accept a prediction, pick a DIM candidate or a search result)")
            entity = self.kb.get(entity_id)  # InputError if the id is not in the KB
        if prediction_id is None and action in ("accept_gemel", "accept_dim"):
            # an API call without the prediction id (the UI sends the one it showed): the latest one
            linker = getattr(self.generator if action == "accept_gemel" else self.ranker, "name", "")
            shown = [p["id"] for p in self.store.predictions(mention_id) if p["linker"] == linker]
            prediction_id = shown[-1] if shown else None
        ack = self.store.record_correction(annotator, mention_id, entity.id if entity else entity_id, action,
                                           entity_name=entity.name if entity else "", prediction_id=prediction_id,
                                           kb=self.kb_label)
        use_pool = self.config.live_pool if live_pool is None else live_pool
        if entity is not None and use_pool and self.generator is not None:
            self._queue_pool_op(("add", ack.correction_id, mention_id, entity))  # never waits for a link
        return ack

    def undo(self, annotator: str | None) -> dict | None:
        if not annotator:
            raise NotAllowedError("log in to undo: only your own corrections can be undone")
        # the Link tab's (and /undo's) corrections only: a project decision is undone in its queue
        undone = self.store.undo_last(annotator, include_tasks=False)
        if undone is not None:
            self._queue_pool_op(("remove", undone["id"]))
            # what stands for that mention now (an earlier correction of it, or nothing)
            row = self.store.db.execute(
                f"SELECT id FROM corrections WHERE annotator = ? AND mention_id = ? AND {STANDING} "
                "ORDER BY id DESC LIMIT 1", (annotator, undone["mention_id"])).fetchone()
            undone["now_standing"] = self.store.correction(row[0]) if row else None
        return undone

    def counts(self, annotator: str | None = None) -> dict:
        """An annotator's counts: saves ("total" standing, "linked", "nil", "skip", "undone", as
        AnnotationStore.counts_by_annotator) and the distinct mentions they decided (`decided`).
        annotator=None: the save counts of everyone, by annotator."""
        counts = self.store.counts_by_annotator()
        if annotator is None:
            return counts
        empty = {"total": 0, "linked": 0, "nil": 0, "skip": 0, "undone": 0}
        return {**counts.get(annotator, empty), **self.decided(annotator)}

    def decided(self, annotator: str) -> dict:
        """Distinct mentions (a project task is one mention) whose latest standing decision by
        `annotator` is in the store, by what it is: {"decided": linked + NIL, "decided_linked",
        "decided_nil", "decided_skip"}. Saving a mention again changes its decision, not the
        count; an undone decision, or one a reviewer sent back, leaves it (or the decision before it
        counts again): the store's STANDING decisions."""
        rows = self.store.db.execute(
            "SELECT action, count(*) FROM corrections WHERE id IN (SELECT max(id) FROM corrections "
            f"WHERE annotator = ? AND {STANDING} GROUP BY mention_id) GROUP BY action", (annotator,)).fetchall()
        by = {"linked": 0, "nil": 0, "skip": 0}
        for action, n in rows:
            by["linked" if action in LINK_ACTIONS else action] += int(n)
        return {"decided": by["linked"] + by["nil"], "decided_linked": by["linked"], "decided_nil": by["nil"],
                "decided_skip": by["skip"]}

    # -- linkers for annotation projects --------------------------------------------------------
    def project_linkers(self, project) -> dict[str, "SerializedLinker"]:
        """The linkers that pre-annotate `project` (its settings.linkers), on the project's KB: the
        app's own when the project links against the loaded KB, else built once on the project's KB.
        Each runs under the app's link lock (models are not re-entrant), GEMEL with the shared view
        of the pool (pool_view(None)): predictions stored for tasks are seen by every annotator."""
        from annotations.projects import kb_stamp
        from mel.linkers import build_linker
        if not project.kb:
            raise InputError(f"project {project.name!r} has no KB; attach one with `python -m mel annotations "
                             f"import --kb KB.sqlite ...` before annotating")
        same_kb = project.kb_stamp == kb_stamp(self.kb)
        out: dict[str, SerializedLinker] = {}
        for name in project.settings.linkers:
            key = (project.kb_stamp, name)
            with self._load_lock:
                if key not in self._project_linkers:
                    shares_pool = False
                    if same_kb and name == self.config.generator and self.generator is not None:
                        linker = self.generator
                    elif same_kb and name == self.ranker_name and self.ranker is not None:
                        linker = self.ranker
                    elif same_kb and name.startswith("gemel") and self.pool() is not None:
                        # another GEMEL than the Link tab's (the project's "gemel" while the tab runs
                        # gemel+bm25): the same demonstration pool, with the live corrections
                        linker = self._use_nil(build_linker(name, self.kb, self.preset, pool=self.pool()))
                        shares_pool = True
                    else:
                        linker = self._use_nil(build_linker(name, self._kb_of(project), self.preset))
                    self._project_linkers[key] = SerializedLinker(linker, self,
                                                                  generator=linker is self.generator or shares_pool)
            out[name] = self._project_linkers[key]
        return out

    def project_kb(self, project):
        """The KB `project` links against (the loaded one when it is the same build)."""
        with self._load_lock:
            return self._kb_of(project)

    def _kb_of(self, project):
        """Caller holds _load_lock."""
        from annotations.projects import kb_stamp
        from mel.kb import KnowledgeBase
        if not project.kb:
            return None
        if project.kb_stamp == kb_stamp(self.kb):
            return self.kb
        if project.kb not in self._project_kbs:
            self._project_kbs[project.kb] = KnowledgeBase(project.kb)
        return self._project_kbs[project.kb]

    # -- live demonstration pool -------------------------------------------------------------
    def pool_view(self, annotator: str | None) -> Callable[[str], bool]:
        """Which demonstrations `annotator` may be shown (a predicate on sample_id): the pool's own
        examples, the annotator's standing corrections and decisions, and decisions a review
        confirmed (its final label is theirs). annotator=None: the pool's own and reviewed ones."""
        own = ({f"{CORRECTION_SAMPLE}{c['id']}" for c in self.store.corrections(annotator=annotator)}
               if annotator else set())
        allowed = own | self._reviewed_samples()
        return lambda sample_id: not sample_id.startswith(CORRECTION_SAMPLE) or sample_id in allowed

    def pool_scope(self, annotator: str | None):
        """A context in which GEMEL retrieves only from `annotator`'s view of the pool (pool_view)."""
        pool = self.pool()
        if pool is None or not hasattr(pool, "only"):
            return nullcontext()
        return pool.only(self.pool_view(annotator))

    def _reviewed_samples(self) -> set[str]:
        """Sample ids of decisions whose task's latest review set the same final label."""
        try:
            rows = self.store.db.execute(
                "SELECT c.id FROM corrections c JOIN reviews r ON r.task_id = c.task_id AND r.action = 'final' "
                "AND r.entity_id = c.entity_id WHERE c.undone_at IS NULL "
                "AND r.id = (SELECT max(id) FROM reviews WHERE task_id = c.task_id)").fetchall()
        except sqlite3.Error:  # a database from before reviews (read-only, not migrated)
            return set()
        return {f"{CORRECTION_SAMPLE}{r[0]}" for r in rows}

    def pool_add(self, correction_id: int, mention_id: str, entity: Entity) -> None:
        """A saved decision joins the pool at the next link (for its author's view; see pool_view)."""
        if self.config.live_pool and self.generator is not None and entity is not None:
            self._queue_pool_op(("add", correction_id, mention_id, entity))

    def pool_remove(self, correction_id: int) -> None:
        """An undone or changed decision leaves the pool at the next link."""
        self._queue_pool_op(("remove", correction_id))

    def _example(self, correction_id: int, mention_id: str, entity: Entity) -> Example:
        m = self.store.mention(mention_id)
        image = self.store.image_path(m["image_sha256"]) if m["image_sha256"] else None
        mention = Mention(m["caption"], m["start"], m["end"], image=str(image) if image else None, id=mention_id)
        return Example(mention, gold_id=entity.id, gold_name=entity.name, sample_id=f"{CORRECTION_SAMPLE}{correction_id}",
                       dataset="annotations", split="train")

    def _queue_pool_op(self, op: tuple) -> None:
        """Record a pool change; the next link applies it (a running link keeps the pool it started with)."""
        with self._pool_ops_lock:
            self._pool_ops.append(op)

    def _apply_pool_ops(self) -> None:
        """Bring the pool in line with the store for the queued corrections. Caller holds _link_lock.

        The store decides: a queued correction joins only if it still stands when this runs (an
        undo committed meanwhile wins, whatever order the two threads queued in); an undone one
        leaves. An undo committed after the check below queues its own removal for the next link.
        """
        with self._pool_ops_lock:
            ops, self._pool_ops = self._pool_ops, []
        if not ops or self.generator is None:
            return
        adds = {op[1]: op for op in ops if op[0] == "add"}
        removes = {op[1] for op in ops if op[0] == "remove"}
        try:
            standing = self._standing(list(adds))
            joining = {cid: self._example(cid, mention_id, entity) for cid, (_, _, mention_id, entity) in adds.items()
                       if cid in standing and cid not in removes and cid not in self._pooled}
            if joining:
                examples = list(joining.values())
                add = getattr(self.generator, "add_demonstrations", None)
                pool = self.pool()
                added = add(examples) if add is not None else (pool.add(examples) if pool is not None else 0)
                if added:  # the pool keeps every non-NIL example it is given
                    self._pooled.update({cid: ex.sample_id for cid, ex in joining.items() if ex.gold_id != NIL})
            for cid in removes:
                self._remove_from_pool(cid)
        except Exception:  # the pool is a convenience: a failure here must not fail the user's link
            log.exception("updating the live demonstration pool failed")

    def _standing(self, correction_ids: list[int]) -> set[int]:
        """Those of `correction_ids` that are in the store and not undone."""
        if not correction_ids:
            return set()
        marks = ",".join("?" * len(correction_ids))
        rows = self.store.db.execute(f"SELECT id FROM corrections WHERE id IN ({marks}) AND undone_at IS NULL",
                                     list(correction_ids)).fetchall()
        return {int(r[0]) for r in rows}

    def _remove_from_pool(self, correction_id: int) -> None:
        """Caller holds _link_lock."""
        sample_id = self._pooled.pop(correction_id, None)
        if sample_id is None:
            return
        remove = getattr(self.generator, "remove_demonstrations", None)
        if remove is not None:
            remove([sample_id])
        elif self.pool() is not None:
            self.pool().remove(sample_id)

    def _pool_existing_corrections(self, pool) -> None:
        """After a restart, the standing corrections join the pool again (same as when they were made)."""
        examples = []
        for c in self.store.latest_corrections():
            if c["action"] in LINK_ACTIONS and c["entity_id"] in self.kb:
                entity = self.kb.get(c["entity_id"])
                examples.append(self._example(c["id"], c["mention_id"], entity))
                self._pooled[c["id"]] = examples[-1].sample_id
        if examples:
            pool.add(examples)
            self.pool_description = f"{len(pool)} demonstrations ({len(examples)} from corrections)"

    # -- export (admin) ----------------------------------------------------------------------
    def export(self, annotator: str | None, fmt: str, *, is_admin: bool,
               out_dir: str | Path | None = None) -> tuple[Path, str]:
        """Export to DATA_DIR/exports/<time>-<fmt>/ and zip it into `out_dir` (default: a new private
        temporary folder); returns (zip path, summary). Admins only."""
        if not is_admin:
            raise NotAllowedError("exporting training data needs the admin role (MEL_ADMINS)")
        if not isinstance(fmt, str) or fmt not in FORMATS:
            raise InputError(f"unknown export format {str(fmt)[:40]!r}; choose one of {', '.join(FORMATS)}")
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        out = self.data_dir / "exports" / f"{stamp}-{fmt}"
        report = export_corrections(self.store, out, fmt, kb=self.kb)
        zip_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="mel-export-"))
        archive = shutil.make_archive(str(zip_dir / f"mel-annotations-{stamp}-{fmt}"), "zip", root_dir=out)
        log.info("%s exported %s", annotator, report.summary())
        return Path(archive), report.summary()

    def backup(self, annotator: str | None, *, is_admin: bool, out_dir: str | Path | None = None) -> Path:
        """A consistent copy of the annotation database (safe while others write), for download, in
        `out_dir` (default: a new private temporary folder). Admins only."""
        if not is_admin:
            raise NotAllowedError("downloading the annotation database needs the admin role (MEL_ADMINS)")
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        folder = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="mel-backup-"))
        target = folder / f"annotations-{stamp}.sqlite"
        self.store.backup(target)
        log.info("%s downloaded a backup of %s", annotator, self.store.path)
        return target


class SerializedLinker:
    """A linker run under the app's link lock (one model call at a time, shared with the Link tab);
    the app's GEMEL also applies the queued pool changes first and retrieves from the shared view
    of the pool. Holds the lock per call of `link` and per `pipe` batch: give pipe small batches."""

    def __init__(self, linker, service: LinkService, *, generator: bool = False):
        self.linker, self.service, self.generator = linker, service, generator
        self.name = getattr(linker, "name", "")
        self.kb = getattr(linker, "kb", None)

    def _scope(self):
        if not self.generator:
            return nullcontext()
        self.service._apply_pool_ops()
        return self.service.pool_scope(None)

    def link(self, mention: Mention, k: int = 10) -> LinkResult:
        with self.service._link_lock, self._scope():
            return self.linker.link(mention, k=k)

    def pipe(self, mentions, k: int = 10, batch_size: int = 8):
        with self.service._link_lock, self._scope():
            return list(self.linker.pipe(list(mentions), k=k, batch_size=batch_size))


# -- helpers ---------------------------------------------------------------------------------------
def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 1)


def _calibration_summary(linker) -> dict | None:
    """What `linker`'s probabilities are (mel.calibration.calibration_summary); None if unknown."""
    from mel.calibration import calibration_summary
    try:
        return calibration_summary(linker)
    except Exception:  # a display aid: never fails a link
        log.warning("no calibration summary for %s", getattr(linker, "name", linker), exc_info=True)
        return None


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if not isinstance(exc, MELError):
        text = f"{type(exc).__name__}: {text}"
    return text

