"""Calibrated confidence for every linker: a probability per candidate, and NIL by a threshold on it.

Scores are on unrelated scales (BM25 sums, cosines, GEMEL log-probabilities, DIM logits), so a
linker's score says nothing by itself about how sure it is. A Calibration turns the scores of one
result's candidates (best first) into probabilities by temperature scaling with a "none of these"
option:

    p_i = exp(s_i / T) / (sum_j exp(s_j / T) + exp(b))

T (the temperature) and b (the logit of "the right entity is none of the candidates": not
returned, or not in the KB) are fitted on a TRAIN slice by minimising the negative
log-likelihood of the gold (the "none" option when the gold is not among the candidates), with
scipy's L-BFGS-B. Plain temperature scaling over the candidates alone would give the top of a
one-candidate list probability 1, right or wrong; b is what lets a whole-KB linker say "maybe none".

Methods (`Calibration.method`, `fit(method=...)`, `mel calibrate --method`; the default is the first,
and a config.json without the newer fields loads as it and gives the same probabilities):
- `temperature+none`: T and b as above (NLL of the gold among candidates + "none").
- `temperature+none:top1`: the same formula, T and b fitted instead by the NLL of "the top candidate
  is the gold" (a binary outcome per mention): what ECE and the NIL threshold look at.
- `...+isotonic` (either of the two): then an isotonic map of the top candidate's probability
  (scikit-learn's IsotonicRegression on the train slice, stored as the points of a piecewise-linear
  non-decreasing map in `top_map`, kept within [1/(2n), 1 - 1/(2n)]); the other candidates keep their
  share of the rest (scaled by (1 - q0) / (1 - p0)), and the top one never drops below the second.
- `auto`: each of the four is fitted on 4/5 of the train slice and measured on the other fifth (5
  folds, by a seeded hash of the sample id, pooled), and the one with the lowest pooled ECE is fitted
  on the whole slice; the figures are kept in `fitted_on["selection"]`. Nothing is chosen on dev.

NIL: with a threshold t, a linker whose best candidate has p < t answers NIL (prediction None,
the candidates and their probabilities kept). t is chosen on the same train slice, with a share of
the golds removed from the KB (query-time view, seeded), to maximise NIL-aware accuracy.

Where a calibration lives: a directory holding config.json (Calibration.save / Calibration.load).
- `python -m mel calibrate ... --out DIR` writes one (mel.calibration_cli).
- Shipped defaults: models/calibration/<linker>@<kb>/config.json (e.g. dim@wikimel, gemel+bm25@wikimel),
  where <kb> is the KB file's stem. A linker finds its default by itself (Linker.calibration); the
  default records a fingerprint of the linker's models (the DIM head's and GEMEL mapper's weights...),
  and is not applied to other models (a retrained head): probabilities are then None, with a warning.
- A head or mapper directory may hold its own: <checkpoint>/calibration/config.json is looked up
  first for DIM (`checkpoint`) and GEMEL (`feature_mapper`).
- Any linker: `use_calibration(linker, DIR_or_Calibration, nil=True)`; CLI `mel link|eval --calibration DIR`
  (`mel link --nil` answers NIL below the threshold). `calibration_summary(linker)` says which applies.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError
from .paths import REPO_ROOT

ECE_BINS = 15
DEFAULT_DIR = REPO_ROOT / "models" / "calibration"
CONFIG = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npy")
_FINGERPRINTS: dict[str, str] = {}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- the probabilities ----------------------------------------------------------------------------
def candidate_probabilities(scores: Sequence[float], temperature: float = 1.0,
                            none_logit: float | None = None) -> np.ndarray:
    """p_i = exp(s_i/T) / (sum_j exp(s_j/T) [+ exp(none_logit)]); -inf or NaN scores get 0."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return s
    z = np.where(np.isfinite(s), s / temperature, -np.inf)
    extra = [] if none_logit is None else [none_logit]
    m = max(np.max(z), *extra) if extra else np.max(z)
    if not np.isfinite(m):
        return np.zeros_like(s)
    e = np.exp(z - m)
    total = e.sum() + (math.exp(none_logit - m) if none_logit is not None else 0.0)
    return e / total


def apply_top_map(p: np.ndarray, top_map: dict) -> np.ndarray:
    """Probabilities `p` (best candidate first) with the first one mapped by `top_map` (piecewise
    linear through its points, flat outside) and the others scaled to share the rest as before; the
    first is kept at least as high as the second."""
    if p.size == 0:
        return p
    p0 = float(p[0])
    q0 = float(np.interp(p0, top_map["x"], top_map["y"]))
    q = p.astype(np.float64).copy()
    rest = 1.0 - p0
    if p.size > 1:
        scale = (1.0 - q0) / rest if rest > 1e-12 else 0.0
        q[1:] = p[1:] * scale
        if q[1] > q0:  # keep the order: q0 = q1 = p1 / (1 - p0 + p1), the rest scaled alike
            q0 = float(p[1] / (rest + p[1])) if rest + p[1] > 0 else q0
            q[1:] = p[1:] * ((1.0 - q0) / rest if rest > 1e-12 else 0.0)
    q[0] = q0
    return q


@dataclass
class Calibration:
    """Temperature scaling with a "none of these" logit, and an optional NIL threshold."""

    linker: str
    temperature: float = 1.0
    none_logit: float = -math.inf  # b; -inf: plain softmax over the candidates
    nil_threshold: float | None = None  # p of the best candidate below which the linker answers NIL
    method: str = "temperature+none"  # see METHODS; "auto" is resolved when fitting
    top_map: dict | None = None  # {"x": [...], "y": [...]}: isotonic map of the top probability (+isotonic)
    fingerprint: str = ""  # of the linker's models when fitted (model_fingerprint); "" matches any
    fitted_on: dict = field(default_factory=dict)  # dataset, split, n, seed, kb, kb_size, nil_share, command
    metrics: dict = field(default_factory=dict)  # train: nll / ece before and after, nil accuracy

    def __post_init__(self):
        """Every field of the kind it must be (a damaged or hand-edited config.json is said, not a
        TypeError or AttributeError later)."""
        if not isinstance(self.linker, str):
            raise InputError(f"a calibration's linker is a linker's name, got {self.linker!r}")
        if not (_is_number(self.temperature) and math.isfinite(self.temperature) and self.temperature > 0):
            raise InputError(f"a calibration's temperature must be a positive number, got {self.temperature!r}")
        if self.none_logit is None:
            self.none_logit = -math.inf
        if not _is_number(self.none_logit) or math.isnan(self.none_logit) or self.none_logit == math.inf:
            raise InputError(f"a calibration's none_logit must be a number (or null: no \"none\" option), "
                             f"got {self.none_logit!r}")
        if self.nil_threshold is not None and not (_is_number(self.nil_threshold) and 0 <= self.nil_threshold <= 1):
            raise InputError(f"a calibration's nil_threshold (NIL threshold) is a probability in [0, 1], "
                             f"got {self.nil_threshold!r}")
        if self.method not in METHODS:
            raise InputError(f"a calibration's method is one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.fingerprint, str):
            raise InputError(f"a calibration's fingerprint is a string, got {self.fingerprint!r}")
        for name in ("fitted_on", "metrics"):
            if not isinstance(getattr(self, name), dict):
                raise InputError(f"a calibration's {name} is an object, got {getattr(self, name)!r:.100}")
        if not isinstance(self.metrics.get("train", {}), dict):
            raise InputError(f"a calibration's metrics.train is an object, got {self.metrics['train']!r:.100}")
        if self.top_map is not None:
            x, y = (self.top_map.get("x"), self.top_map.get("y")) if isinstance(self.top_map, dict) else (None, None)
            if (not isinstance(x, list) or not isinstance(y, list) or len(x) != len(y) or not x
                    or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in x + y)
                    or any(b < a for a, b in zip(x, x[1:], strict=False))
                    or any(b < a for a, b in zip(y, y[1:], strict=False))):
                raise InputError("a calibration's top_map is {\"x\": [...], \"y\": [...]}: as many non-decreasing "
                                 "probabilities in each")

    def probabilities(self, scores: Sequence[float]) -> np.ndarray:
        b = None if self.none_logit is None or not math.isfinite(self.none_logit) else self.none_logit
        p = candidate_probabilities(scores, self.temperature, b)
        return apply_top_map(p, self.top_map) if self.top_map else p

    # -- files ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        data["none_logit"] = None if not math.isfinite(self.none_logit) else self.none_logit
        return {"kind": "mel-calibration", **data}

    def save(self, directory: str | Path) -> Path:
        """Write DIRECTORY/config.json whole (or leave the old one); an unwritable place is an InputError."""
        from .paths import atomic_write
        out = Path(directory)
        path = out / CONFIG
        try:
            out.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as tmp:
                Path(tmp).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n",
                                     encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot write the calibration {path} ({exc.strerror or exc}); give --out a writable "
                             f"directory") from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        """From a calibration directory (its config.json) or the JSON file itself."""
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / CONFIG
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"no calibration at {path}: expected a directory with {CONFIG} "
                             f"(written by `python -m mel calibrate ... --out DIR`)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read the calibration {p} ({type(exc).__name__}: {exc}); fit it again with "
                             f"`python -m mel calibrate ... --out DIR`") from None
        if not isinstance(data, dict) or data.get("kind") != "mel-calibration":
            raise InputError(f"{p} is not a calibration (no \"kind\": \"mel-calibration\")")
        data = {k: v for k, v in data.items() if k != "kind"}
        if data.get("none_logit") is None:
            data["none_logit"] = -math.inf
        try:
            return cls(**data)
        except (TypeError, InputError) as exc:
            raise InputError(f"{p} is not a valid calibration: {exc}; fit it again with "
                             f"`python -m mel calibrate ... --out DIR`") from None


# -- which calibration a linker uses --------------------------------------------------------------
def model_fingerprint(linker) -> str:
    """sha256 over the linker's name, its models() and the contents of every weights file of a
    model directory it names (a DIM head, a GEMEL mapper): another head gives another fingerprint."""
    h = hashlib.sha256(linker.name.encode("utf-8"))
    for role, spec in sorted(linker.models().items()):
        h.update(f"{role}={spec}\n".encode("utf-8"))
        p = Path(spec)
        if not p.is_absolute():
            p = REPO_ROOT / p
        if p.is_dir():
            for f in sorted(p.iterdir()):
                if f.suffix in WEIGHT_SUFFIXES and f.is_file():
                    h.update(_file_hash(f).encode("ascii"))
    return h.hexdigest()[:16]


def _file_hash(path: Path) -> str:
    key = f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FINGERPRINTS[key] = digest.hexdigest()
    return _FINGERPRINTS[key]


def default_location(linker) -> list[Path]:
    """Where `linker`'s calibration is looked for, first found wins: beside its checkpoint
    (<head or mapper dir>/calibration), then models/calibration/<linker>@<kb stem>."""
    places = []
    for attr in ("checkpoint", "mapper_source"):
        ckpt = getattr(linker, attr, None)
        if isinstance(ckpt, (str, Path)) and Path(ckpt).is_dir():
            places.append(Path(ckpt) / "calibration")
    kb_path = getattr(getattr(linker, "kb", None), "path", None)
    if kb_path is not None:
        places.append(DEFAULT_DIR / f"{linker.name}@{Path(kb_path).stem}")
    return places


def default_calibration(linker) -> Calibration | None:
    """The calibration `linker` finds by itself (default_location) when it was fitted for the same
    models; None otherwise (with a warning when one was found for other models)."""
    for place in default_location(linker):
        if not (place / CONFIG).is_file():
            continue
        try:
            cal = Calibration.load(place)
        except InputError as exc:
            warnings.warn(f"calibration ignored: {exc}", stacklevel=3)
            continue
        if cal.linker != linker.name:
            continue
        if cal.fingerprint and cal.fingerprint != model_fingerprint(linker):
            warnings.warn(f"the calibration {place} was fitted for other models of {linker.name} (a retrained "
                          f"head?); probabilities are off until `python -m mel calibrate` is run again", stacklevel=3)
            continue
        return cal
    return None


def use_calibration(linker, calibration: "Calibration | str | Path | None", *, nil: bool | float = False):
    """Give `linker` a calibration (a Calibration, a calibration directory, "default" for the one it
    finds itself, or None for none). `nil`: True uses the calibration's NIL threshold, a number is
    the threshold, False (default) never answers NIL. Returns the linker."""
    if isinstance(calibration, (str, Path)) and str(calibration) == "default":
        calibration = default_calibration(linker)
    elif isinstance(calibration, (str, Path)):
        calibration = Calibration.load(calibration)
    elif calibration is not None and not isinstance(calibration, Calibration):
        raise InputError(f"a calibration is a Calibration, a directory or None, got {type(calibration).__name__}")
    if calibration is not None and calibration.linker != linker.name:
        raise InputError(f"the calibration was fitted for the linker {calibration.linker!r}, not {linker.name!r}: "
                         f"its probabilities would be wrong; pass the calibration of {linker.name!r} or fit one "
                         f"with `python -m mel calibrate --linker {linker.name} ...`")
    linker.calibration = calibration
    if nil is True:
        if calibration is None or calibration.nil_threshold is None:
            raise InputError("NIL needs a calibration with a NIL threshold (`python -m mel calibrate ... "
                             "--nil-share 0.1`), or a threshold given as a number")
        linker.nil_threshold = calibration.nil_threshold
    elif nil is False or nil is None:
        linker.nil_threshold = None
    else:
        if not 0 <= float(nil) <= 1:
            raise InputError(f"a NIL threshold is a probability in [0, 1], got {nil!r}")
        linker.nil_threshold = float(nil)
    return linker


# -- saying what a linker's probabilities are (mel link, the app) ---------------------------------
def calibration_key(linker) -> str:
    """<linker>@<kb stem>: the name of the linker's shipped default under models/calibration/."""
    kb_path = getattr(getattr(linker, "kb", None), "path", None)
    return f"{linker.name}@{Path(kb_path).stem}" if kb_path is not None else str(linker.name)


def describe_calibration(cal: Calibration) -> str:
    """How `cal` was fitted, in one sentence: the method, the slice, the ECE when it is recorded."""
    b = cal.none_logit
    method = (f"temperature scaling (T {cal.temperature:.4g}) with a \"none of these\" option (logit {b:.4g})"
              if b is not None and math.isfinite(b) else f"temperature scaling (T {cal.temperature:.4g})")
    if ":top1" in (cal.method or ""):
        method += " fitted on whether the top candidate is right"
    if cal.top_map:
        method += ", then an isotonic map of the top candidate's probability"
    on = cal.fitted_on or {}
    where = " ".join(str(on[key]) for key in ("dataset", "split") if on.get(key)) or "a train slice"
    n = f", {on['n']:,} mentions" if isinstance(on.get("n"), int) else ""
    kb = f", KB {on['kb']}" if on.get("kb") else ""
    text = f"{method}, fitted on {where}{n}{kb}"
    train = (cal.metrics or {}).get("train") or {}
    if isinstance(train.get("ece_after"), (int, float)):
        before = train.get("ece_before")
        text += f"; ECE {train['ece_after']:.4f} on that slice" + (
            f" ({before:.4f} before)" if isinstance(before, (int, float)) else "")
    return text


def missing_calibration(linker) -> str:
    """Why `linker` gives no probabilities, and the command that fits a calibration for it."""
    key = calibration_key(linker)
    kb_path = getattr(getattr(linker, "kb", None), "path", None)
    from .paths import display_path
    kb = display_path(kb_path) if kb_path is not None else "KB.sqlite"
    return (f"no calibration for {key}; fit one with python -m mel calibrate --format FORMAT --data DIR --split train "
            f"--kb {kb} --linker {linker.name} --out models/calibration/{key}")


def calibration_summary(linker) -> dict:
    """What `linker`'s probabilities are, for a UI or a report: {"calibrated", "key", "about" (a
    sentence: how they were fitted, or why there are none), "ece", "nil_threshold" (the threshold in
    use: None never answers NIL), "calibration_nil_threshold" (the one chosen on train)}."""
    cal = getattr(linker, "calibration", None)
    key = calibration_key(linker)
    if cal is None:
        return {"calibrated": False, "key": key, "about": missing_calibration(linker), "ece": None,
                "nil_threshold": None, "calibration_nil_threshold": None}
    train = (cal.metrics or {}).get("train") or {}
    return {"calibrated": True, "key": key, "about": describe_calibration(cal), "ece": train.get("ece_after"),
            "nil_threshold": getattr(linker, "nil_threshold", None), "calibration_nil_threshold": cal.nil_threshold}


# -- fitting --------------------------------------------------------------------------------------
@dataclass
class Scored:
    """One mention's ranked candidates as a linker returned them, and its gold."""

    gold_id: str
    ids: list[str]
    scores: list[float]
    sample_id: str = ""

    def gold_index(self, removed: frozenset[str] | set[str] = frozenset()) -> int | None:
        ids = [i for i in self.ids if i not in removed]
        return ids.index(self.gold_id) if self.gold_id in ids else None

    def view(self, removed) -> "Scored":
        """The candidates left when the entities in `removed` are not in the KB."""
        keep = [(i, s) for i, s in zip(self.ids, self.scores, strict=True) if i not in removed]
        return Scored(self.gold_id, [i for i, _ in keep], [s for _, s in keep], self.sample_id)


def collect(linker, examples, *, k: int = 20, batch_size: int = 32, progress: bool = False) -> list[Scored]:
    """Run `linker` (without its calibration) over `examples`: every mention's candidates and scores.
    A linker that `excludes_samples` (GEMEL) keeps each query out of its own demonstrations, since a
    train slice is usually its demonstration pool too."""
    from tqdm.auto import tqdm
    saved, saved_nil = linker.calibration, linker.nil_threshold
    linker.calibration, linker.nil_threshold = None, None
    try:
        if getattr(linker, "excludes_samples", False):
            results = (linker.link(ex.mention, k=k, exclude_sample_id=ex.sample_id) for ex in examples)
        else:
            results = linker.pipe((ex.mention for ex in examples), k=k, batch_size=batch_size)
        out = []
        for ex, r in tqdm(zip(examples, results, strict=True), total=len(examples), disable=not progress,
                          desc=f"calibrate {linker.name}", unit=" mention"):
            out.append(Scored(ex.gold_id, [c.entity.id for c in r.candidates], [c.score for c in r.candidates],
                              ex.sample_id))
        return out
    finally:
        linker.calibration, linker.nil_threshold = saved, saved_nil


def _nll(params: np.ndarray, rows: list[tuple[np.ndarray, int | None]]) -> float:
    log_t, b = params
    t = math.exp(log_t)
    total = 0.0
    for s, gold in rows:
        z = s / t
        m = max(z.max() if z.size else -np.inf, b)
        lse = m + math.log(np.exp(z - m).sum() + math.exp(b - m))
        total -= (z[gold] if gold is not None else b) - lse
    return total / max(len(rows), 1)


def fit_temperature(scored: Sequence[Scored], *, none_option: bool = True) -> tuple[float, float]:
    """(T, b) minimising the mean NLL of the gold among the candidates (b: the "none of these"
    option, taken when the gold is absent). Without `none_option` only mentions whose gold is
    among the candidates count and b is -inf (plain temperature scaling)."""
    from scipy.optimize import minimize

    rows = []
    for r in scored:
        s = np.asarray(r.scores, dtype=np.float64)
        finite = np.isfinite(s)
        s = np.where(finite, s, -1e9)
        gold = r.gold_index()
        if not none_option and gold is None:
            continue
        rows.append((s, gold))
    if not rows:
        raise InputError("nothing to fit a calibration on: no mention (with its gold among the candidates)")
    if none_option:
        res = minimize(_nll, np.array([0.0, 0.0]), args=(rows,), method="L-BFGS-B",
                       bounds=[(-9.0, 9.0), (-50.0, 50.0)])
        return float(math.exp(res.x[0])), float(res.x[1])
    res = minimize(lambda x: _nll(np.array([x[0], -1e9]), rows), np.array([0.0]), method="L-BFGS-B",
                   bounds=[(-9.0, 9.0)])
    return float(math.exp(res.x[0])), -math.inf


def _top_rows(scored: Sequence[Scored]) -> list[tuple[np.ndarray, bool]]:
    rows = []
    for r in scored:
        if not r.ids:
            continue
        s = np.asarray(r.scores, dtype=np.float64)
        rows.append((np.where(np.isfinite(s), s, -1e9), r.ids[0] == r.gold_id))
    return rows


def _top1_nll(params: np.ndarray, rows: list[tuple[np.ndarray, bool]]) -> float:
    log_t, b = params
    t = math.exp(log_t)
    total = 0.0
    for s, right in rows:
        z = s / t
        m = max(z.max(), b)
        p0 = math.exp(z[0] - m) / (np.exp(z - m).sum() + math.exp(b - m))
        p0 = min(max(p0, 1e-12), 1 - 1e-12)
        total -= math.log(p0) if right else math.log(1.0 - p0)
    return total / max(len(rows), 1)


def fit_temperature_top1(scored: Sequence[Scored]) -> tuple[float, float]:
    """(T, b) of the same formula, minimising the mean NLL of "the top candidate is the gold"."""
    from scipy.optimize import minimize

    rows = _top_rows(scored)
    if not rows:
        raise InputError("nothing to fit a calibration on: no mention with a candidate")
    res = minimize(_top1_nll, np.array([0.0, 0.0]), args=(rows,), method="L-BFGS-B",
                   bounds=[(-9.0, 9.0), (-50.0, 50.0)])
    return float(math.exp(res.x[0])), float(res.x[1])


def fit_top_map(confidence: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray) -> dict:
    """Isotonic regression (scikit-learn) of "the top candidate is right" on its probability, as the
    points of a non-decreasing piecewise-linear map kept within [1/(2n), 1 - 1/(2n)]."""
    from sklearn.isotonic import IsotonicRegression

    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if conf.size == 0:
        raise InputError("nothing to fit an isotonic map on: no mention")
    eps = 1.0 / (2 * conf.size)
    iso = IsotonicRegression(y_min=eps, y_max=1.0 - eps, out_of_bounds="clip").fit(conf, ok)
    x = [round(float(v), 6) for v in iso.X_thresholds_]
    y = [round(float(v), 6) for v in iso.y_thresholds_]
    return {"x": x, "y": y}


METHODS = ("temperature+none", "temperature+none:top1", "temperature+none+isotonic", "temperature+none:top1+isotonic")
AUTO_FOLDS = 5


def fit_method(scored: Sequence[Scored], method: str, linker_name: str = "") -> Calibration:
    """A Calibration of `method` (one of METHODS) fitted on `scored`; no NIL threshold, no record."""
    if method not in METHODS:
        raise InputError(f"unknown calibration method {method!r}: one of {', '.join(METHODS)} or auto")
    t, b = fit_temperature_top1(scored) if ":top1" in method else fit_temperature(scored)
    cal = Calibration(linker=linker_name, temperature=round(t, 6), none_logit=round(b, 6), method=method)
    if method.endswith("+isotonic"):
        conf, ok = top_confidences(scored, cal)
        cal.top_map = fit_top_map(conf, ok)
    return cal


def choose_method(scored: Sequence[Scored], seed: int = 0, methods: Sequence[str] = METHODS,
                  folds: int = AUTO_FOLDS) -> tuple[str, dict]:
    """(method, figures): the method whose out-of-fold top-candidate probabilities (each fold fitted
    on the other folds of `scored`, folds by sha256(seed, sample id)) have the lowest pooled ECE; ties
    go to the earlier (simpler) one."""
    from .datasets.common import stable_hash
    fold = [int(stable_hash(seed, f"calibration-fold:{r.sample_id or i}")[:8], 16) % folds
            for i, r in enumerate(scored)]
    figures = {}
    for method in methods:
        conf = np.zeros(len(scored))
        ok = np.zeros(len(scored), dtype=bool)
        for k in range(folds):
            held = [i for i, f in enumerate(fold) if f == k]
            if not held:
                continue
            cal = fit_method([r for r, f in zip(scored, fold, strict=True) if f != k], method)
            c, o = top_confidences([scored[i] for i in held], cal)
            conf[held], ok[held] = c, o
        figures[method] = round(expected_calibration_error(conf, ok), 4)
    best = min(methods, key=lambda m: (figures[m], methods.index(m)))
    return best, {"criterion": f"pooled out-of-fold ECE ({folds} folds of the train slice, seed {seed})",
                  "ece": figures, "chosen": best}


# -- measuring ------------------------------------------------------------------------------------
def top_confidences(scored: Sequence[Scored], calibration: Calibration | None,
                    removed=frozenset()) -> tuple[np.ndarray, np.ndarray]:
    """(probability of the top candidate, whether it is the gold) per mention; no calibration: a
    plain softmax of the scores (what the scores "say" uncalibrated). No candidate: p 0, wrong."""
    conf, correct = [], []
    for r in scored:
        r = r.view(removed) if removed else r
        if not r.ids:
            conf.append(0.0)
            correct.append(False)
            continue
        p = calibration.probabilities(r.scores) if calibration else candidate_probabilities(r.scores)
        conf.append(float(p[0]))
        correct.append(r.ids[0] == r.gold_id)
    return np.asarray(conf), np.asarray(correct, dtype=bool)


def expected_calibration_error(confidence: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray,
                               n_bins: int = ECE_BINS) -> float:
    """ECE: sum over `n_bins` equal-width confidence bins of (share of mentions in the bin) x
    |accuracy - mean confidence| in it. Bin i holds (i/n, (i+1)/n]; the first also holds 0."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if conf.size == 0:
        raise InputError("ECE of nothing: no mention")
    bins = reliability_bins(conf, ok, n_bins)
    return float(sum(b["n"] / conf.size * abs(b["accuracy"] - b["confidence"]) for b in bins if b["n"]))


def reliability_bins(confidence, correct, n_bins: int = ECE_BINS) -> list[dict]:
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    index = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    out = []
    for i in range(n_bins):
        sel = index == i
        n = int(sel.sum())
        out.append({"low": i / n_bins, "high": (i + 1) / n_bins, "n": n,
                    "accuracy": float(ok[sel].mean()) if n else 0.0,
                    "confidence": float(conf[sel].mean()) if n else 0.0})
    return out


def mean_nll(scored: Sequence[Scored], calibration: Calibration) -> float:
    total = 0.0
    for r in scored:
        p = calibration.probabilities(r.scores)
        g = r.gold_index()
        q = (p[g] if g is not None else 1.0 - float(p.sum()))
        total -= math.log(max(q, 1e-12))
    return total / max(len(scored), 1)


def calibration_report(scored: Sequence[Scored], calibration: Calibration) -> dict:
    """ECE (15 bins) before (plain softmax of the scores) and after, NLL, accuracy, n."""
    c0, ok = top_confidences(scored, None)
    c1, _ = top_confidences(scored, calibration)
    return {"n": len(scored), "hits@1": round(float(ok.mean()), 4),
            "ece_before": round(expected_calibration_error(c0, ok), 4),
            "ece_after": round(expected_calibration_error(c1, ok), 4),
            "mean_confidence_before": round(float(c0.mean()), 4), "mean_confidence_after": round(float(c1.mean()), 4),
            "nll_after": round(mean_nll(scored, calibration), 4), "bins": ECE_BINS}


# -- NIL ------------------------------------------------------------------------------------------
def removed_golds(gold_ids: Sequence[str], share: float, seed: int = 0) -> set[str]:
    """A seeded, deterministic `share` of the distinct gold ids (NIL excluded): the entities a
    NIL-aware evaluation takes out of the KB (the round(n * share) ids with the smallest
    sha256("<seed>:<id>"), the same on every machine)."""
    from .datasets.common import stable_hash
    from .types import NIL
    if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 <= share < 1:
        raise InputError(f"the NIL share must be a number in [0, 1), got {share!r}")
    ids = sorted({g for g in gold_ids if g != NIL})
    k = round(len(ids) * share)
    return set(sorted(ids, key=lambda i: (stable_hash(seed, i), i))[:k])


def nil_decisions(scored: Sequence[Scored], calibration: Calibration, threshold: float | None,
                  removed=frozenset()) -> list[tuple[str, str | None]]:
    """(gold, prediction) per mention on the KB view without `removed`: the gold is NIL when it was
    removed; the prediction is None (NIL) when the best candidate's probability is below `threshold`."""
    from .types import NIL
    out: list[tuple[str, str | None]] = []
    for r in scored:
        v = r.view(removed) if removed else r
        gold = NIL if r.gold_id in removed else r.gold_id
        if not v.ids:
            out.append((gold, None))
            continue
        p0 = float(calibration.probabilities(v.scores)[0])
        out.append((gold, None if threshold is not None and p0 < threshold else v.ids[0]))
    return out


def choose_nil_threshold(scored: Sequence[Scored], calibration: Calibration, removed) -> tuple[float, float]:
    """(threshold, NIL-aware accuracy) maximising that accuracy on `scored` with `removed` out of
    the KB; ties go to the lowest threshold (the fewest NIL answers). Candidates: 0 and the midpoints
    between consecutive top-candidate probabilities."""
    from .evaluate import nil_metrics
    conf, _ = top_confidences(scored, calibration, removed)
    values = np.unique(conf)
    grid = [0.0] + [float((a + b) / 2) for a, b in zip(values, values[1:], strict=False)] + [float(values[-1]) + 1e-9]
    best = (-1.0, 0.0)
    for t in grid:
        acc = nil_metrics(nil_decisions(scored, calibration, t, removed))["accuracy"]
        if acc > best[0] + 1e-12:
            best = (acc, t)
    return round(best[1], 6), best[0]


# -- the diagram ----------------------------------------------------------------------------------
def reliability_diagram(curves: dict[str, tuple], path: str | Path,
                        title: str = "") -> Path:
    """A reliability diagram (accuracy against confidence, 15 bins; bar width: share of mentions) of
    one or more {label: (confidence, correct)}, written as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 5.0), dpi=120)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
    for label, (conf, ok) in curves.items():
        bins = [b for b in reliability_bins(conf, ok) if b["n"]]
        ece = expected_calibration_error(conf, ok)
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", ms=4,
                label=f"{label} (ECE {ece:.3f}, n={len(conf)})")
    ax.set_xlabel("confidence (probability of the top candidate)")
    ax.set_ylabel("accuracy (top candidate is the gold)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def fit(scored: Sequence[Scored], linker, *, nil_share: float = 0.1, seed: int = 0,
        fitted_on: dict | None = None, method: str = "temperature+none") -> Calibration:
    """Fit `method` (METHODS, or "auto": chosen on folds of `scored`; default: T and b by the NLL of
    the gold) on `scored` (a train slice), then the NIL threshold on the same slice with a seeded
    `nil_share` of its golds out of the KB (0: no threshold)."""
    fitted_on = dict(fitted_on or {})
    if method == "auto":
        method, selection = choose_method(scored, seed)
        fitted_on["selection"] = selection
    cal = fit_method(scored, method, linker.name)
    cal.fingerprint = model_fingerprint(linker)
    cal.fitted_on = fitted_on
    cal.metrics = {"train": calibration_report(scored, cal)}
    if nil_share:
        removed = removed_golds([r.gold_id for r in scored], nil_share, seed)
        threshold, acc = choose_nil_threshold(scored, cal, removed)
        cal.nil_threshold = threshold
        cal.fitted_on.update({"nil_share": nil_share, "nil_seed": seed, "n_removed_golds": len(removed)})
        cal.metrics["train"]["nil_accuracy"] = round(acc, 4)
    return cal


def dumps_scored(scored: Sequence[Scored]) -> str:
    return "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in scored)


def loads_scored(text: str) -> list[Scored]:
    return [Scored(**json.loads(line)) for line in text.splitlines() if line.strip()]


__all__ = ["Calibration", "Scored", "candidate_probabilities", "apply_top_map", "fit_temperature",
           "fit_temperature_top1", "fit_top_map", "fit_method", "choose_method", "METHODS", "expected_calibration_error",
           "reliability_bins", "calibration_report", "removed_golds", "choose_nil_threshold", "nil_decisions",
           "use_calibration", "default_calibration", "model_fingerprint", "reliability_diagram", "collect", "fit",
           "calibration_key", "describe_calibration", "missing_calibration", "calibration_summary"]
