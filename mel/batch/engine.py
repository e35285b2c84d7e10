"""The batch engine: Ray Data reads the input in parts, an actor pool of `LinkWorker`s links it with
the library's own linkers, and the driver writes each finished part whole.

Output folder:
    parts/part-NNNNNN.parquet   the linked mentions of input rows [N*part_size, (N+1)*part_size)
    errors/part-NNNNNN.jsonl    the rows of that part that could not be read or linked (with why)
    manifest.json               what the job is (input, KB build, linker, preset, part size), the
                                parts done with their row ranges and counts, and the counters
    errors.jsonl                every error row, gathered when the job finishes

A part's errors file is published before its Parquet file, and a part counts as done when its
Parquet file exists; both are written under a temporary name and renamed (mel.paths.publish). A
rerun of the same job skips the done parts, so a killed job resumes without duplicating rows. A
rerun into a folder that holds another job (another input, KB build, linker...) is refused.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

from ..errors import InputError, MELError, ModelUnavailableError
from .sources import Source, open_source, resolve_image

MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
DEFAULT_K = 20
READ_CPUS = 0.25            # a read task's CPU share: reads must not wait for a CPU the actors hold
DEFAULT_WORKER_CPUS = 0.75  # an actor's share: 2 actors on a 2-CPU machine leave room for the reads
_FORWARDED_ENV = ("MEL_THREADS", "MEL_CACHE", "MEL_DIM_CHECKPOINT", "HF_HUB_OFFLINE", "HF_HOME",
                  "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS")


def require_ray():
    """Import Ray Data, or say how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ModelUnavailableError(
            'batch linking runs on Ray Data, which is not installed: `pip install "ray[data]"` (one machine '
            'or every node of a cluster), then run the command again') from exc
    return ray


def _output_schema():
    import pyarrow as pa
    return pa.schema([
        ("row", pa.int64()), ("mention_id", pa.string()), ("mention", pa.string()),
        ("start", pa.int64()), ("end", pa.int64()),
        ("prediction", pa.string()), ("prediction_name", pa.string()), ("score", pa.float64()),
        ("candidate_ids", pa.list_(pa.string())), ("candidate_scores", pa.list_(pa.float64())),
        ("gold_id", pa.string()), ("gold_rank", pa.int64()), ("gold_in_kb", pa.bool_()),
        ("latency_ms", pa.float64()), ("timings", pa.string()),
        ("linker", pa.string()), ("preset", pa.string()), ("models", pa.string()), ("kb_build_id", pa.string()),
        ("error", pa.string()), ("record", pa.string()),
    ])


# what a part file holds (the error and record columns go to the errors file)
OUTPUT_COLUMNS = ["row", "mention_id", "mention", "start", "end", "prediction", "prediction_name", "score",
                  "candidate_ids", "candidate_scores", "gold_id", "gold_rank", "gold_in_kb", "latency_ms", "timings",
                  "linker", "preset", "models", "kb_build_id"]


# -- parsing a record ------------------------------------------------------------------------------
_MENTION_KEYS = {"caption", "start", "end", "mention", "image", "id", "gold_id", "gold_name", "sample_id",
                 "dataset", "split"}


def parse_record(text: str, base_dir: str = ""):
    """(Mention, gold_id or None, mention id) from one input record; InputError says what is wrong."""
    from ..types import Example, Mention
    if text.startswith("\x00"):
        raise InputError(text[1:].split(":", 1)[0])
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(obj, dict):
        raise InputError(f"a mention record must be a JSON object, got {type(obj).__name__}")
    if isinstance(obj.get("mention"), dict):  # the library's Example format (jsonl datasets, --format inputs)
        example = Example.from_dict(obj)
        m = example.mention
        if m.image and base_dir:
            m.image = resolve_image(m.image, base_dir)
        return m, example.gold_id, m.id or example.sample_id or None
    unknown = set(obj) - _MENTION_KEYS
    if unknown:
        raise InputError(f"unknown field(s) {sorted(unknown)}; a mention has caption, start+end or mention, "
                         f"image, id (and gold_id to evaluate)")
    if "caption" not in obj:
        raise InputError("missing 'caption'")
    caption, image = obj["caption"], obj.get("image")
    if image is not None and not isinstance(image, str):
        raise InputError(f"'image' must be a path or URL, got {type(image).__name__}")
    image = resolve_image(image, base_dir)
    mid = obj.get("id", obj.get("sample_id"))
    mid = None if mid is None else str(mid)
    if "start" in obj or "end" in obj:
        if not isinstance(caption, str):
            raise InputError(f"'caption' must be text, got {type(caption).__name__}")
        mention = Mention(caption, obj.get("start"), obj.get("end"), image=image, id=mid)
        if isinstance(obj.get("mention"), str) and mention.text.strip() != obj["mention"].strip():
            raise InputError(f"'mention' {obj['mention']!r} and start/end ({mention.text!r}) disagree")
    elif isinstance(obj.get("mention"), str):
        mention = Mention.from_text(caption, obj["mention"], image=image, id=mid)
    else:
        raise InputError("give the mention as 'mention' (its text in the caption) or 'start' and 'end' offsets")
    gold = obj.get("gold_id")
    return mention, (None if gold is None else str(gold)), mid


# -- the Ray side ----------------------------------------------------------------------------------
class ReadParts:
    """Ray Data map_batches function: part descriptors -> the records of their rows."""

    def __init__(self, reader):
        self.reader = reader

    def __call__(self, batch):
        import pyarrow as pa
        rows, records = [], []
        for start, stop in zip(batch["start"].to_pylist(), batch["stop"].to_pylist(), strict=True):
            r, t = self.reader.read(int(start), int(stop))
            rows += r
            records += t
        return pa.table({"row": pa.array(rows, pa.int64()), "record": pa.array(records, pa.string())})


class LinkWorker:
    """A Ray Data actor: opens the KB and builds the linker once (`__init__`), then links batches
    with `Linker.pipe`, the same code path as `mel link` / `mel eval`. A batch that fails is linked
    again one mention at a time so that only the bad rows become error rows."""

    def __init__(self, kb: str, linker: str, preset: str, options: dict, engine: str, k: int,
                 pipe_batch: int, base_dir: str, kb_build_id: str | None, device: str | None = None):
        from ..kb import KnowledgeBase
        from ..linkers import build_linker
        from ..presets import get_preset
        self.kb = KnowledgeBase(kb, engine=engine)
        if self.kb.build_id != kb_build_id:
            raise MELError(f"{kb} on this worker is build {self.kb.build_id}, the driver opened build {kb_build_id}: "
                           f"the KB was rebuilt during the job, or the nodes do not see the same file")
        self.preset = get_preset(preset, device=device)
        self.linker = build_linker(linker, self.kb, self.preset, **options)
        self.k, self.pipe_batch, self.base_dir = k, pipe_batch, base_dir
        self.models = json.dumps(self.linker.models(), sort_keys=True)
        self.preset_name = getattr(self.preset, "name", preset)

    def __call__(self, batch):
        import pyarrow as pa
        rows, records = batch["row"].to_pylist(), batch["record"].to_pylist()
        parsed, out = [], []
        for row, record in zip(rows, records, strict=True):
            try:
                parsed.append((row, record, *parse_record(record, self.base_dir)))
            except MELError as exc:
                out.append(self._error(row, record, f"unreadable row: {exc}"))
            except Exception as exc:  # noqa: BLE001 - any failure on one row is that row's error, counted
                out.append(self._error(row, record, f"unreadable row: {type(exc).__name__}: {exc}"))
        if parsed:
            try:
                results = list(self.linker.pipe([p[2] for p in parsed], k=self.k, batch_size=self.pipe_batch))
                out += [self._row(p, r) for p, r in zip(parsed, results, strict=True)]
            except Exception:  # noqa: BLE001 - find the bad rows one by one
                for p in parsed:
                    try:
                        out.append(self._row(p, self.linker.link(p[2], k=self.k)))
                    except Exception as exc:  # noqa: BLE001
                        kind = "" if isinstance(exc, MELError) else f"{type(exc).__name__}: "
                        out.append(self._error(p[0], p[1], f"linking failed: {kind}{exc}"))
        return pa.Table.from_pylist(out, schema=_output_schema())

    def _row(self, p, result) -> dict:
        from ..evaluate import rank_of
        from ..types import NIL
        row, _record, mention, gold, mid = p
        if gold is None:
            rank, in_kb = None, None
        elif gold == NIL:
            rank, in_kb = (1 if result.prediction is None else None), None
        else:
            rank, in_kb = rank_of(result, gold), gold in self.kb
        pred = result.prediction
        return {"row": row, "mention_id": mid if mid is not None else f"row-{row}", "mention": mention.text,
                "start": mention.start, "end": mention.end,
                "prediction": pred.id if pred else None, "prediction_name": pred.name if pred else None,
                "score": result.score, "candidate_ids": [c.entity.id for c in result.candidates],
                "candidate_scores": [float(c.score) for c in result.candidates],
                "gold_id": gold, "gold_rank": rank, "gold_in_kb": in_kb,
                "latency_ms": result.timings.get("total"), "timings": json.dumps(result.timings),
                "linker": result.linker, "preset": result.preset or self.preset_name, "models": self.models,
                "kb_build_id": self.kb.build_id, "error": None, "record": None}

    def _error(self, row, record, message) -> dict:
        return {"row": row, "error": message, "record": record[:2000]}


# -- the driver side -------------------------------------------------------------------------------
def _runtime_env() -> dict:
    """Environment for the workers: the library's settings, and this checkout on PYTHONPATH when mel
    is not installed (workers on the same machine or a shared filesystem import the same code)."""
    import mel
    env = {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k)}
    root = str(Path(mel.__file__).resolve().parents[1])
    if "site-packages" not in root:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": env}


def connect(address: str | None, num_cpus: int | None = None):
    """Join the cluster at `address` ('auto', 'host:port', 'ray://host:port'), else start a local Ray."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    kwargs = {"runtime_env": _runtime_env(), "log_to_driver": False, "include_dashboard": False}
    try:
        if address:
            if address.startswith("ray://"):
                kwargs.pop("include_dashboard")
            ray.init(address=address, **kwargs)
        else:
            ray.init(address="local", num_cpus=num_cpus, object_store_memory=_local_store_bytes(), **kwargs)
    except ConnectionError as exc:
        raise MELError(f"cannot join the Ray cluster at {address!r} ({exc}); start one with `ray start --head`, "
                       f"or leave out --address to run on this machine only") from exc
    except Exception as exc:
        if "auth" in type(exc).__name__.lower() or "token" in str(exc).lower():
            raise MELError(f"Ray refused to start or connect ({exc}). With token authentication on "
                           f"(RAY_AUTH_MODE=token), give the cluster's token as RAY_AUTH_TOKEN to the driver "
                           f"and to every `ray start`") from exc
        raise
    return ray


def _local_store_bytes() -> int:
    return int(os.environ.get("MEL_RAY_OBJECT_STORE_MB", "1024")) * 2**20


class _Job:
    """The output folder of one job: which parts are done, and publishing new ones whole."""

    def __init__(self, out: Path, fingerprint: dict, source: Source):
        from ..paths import remove_dead_temps
        self.out, self.fingerprint, self.source = out, fingerprint, source
        if out.exists() and not out.is_dir():
            raise InputError(f"--output {out} is a file; the output is a folder of Parquet parts")
        (out / "parts").mkdir(parents=True, exist_ok=True)
        (out / "errors").mkdir(exist_ok=True)
        manifest = out / MANIFEST
        if manifest.exists():
            old = json.loads(manifest.read_text(encoding="utf-8"))
            if old.get("job") != fingerprint:
                changed = sorted(k for k in set(old.get("job", {})) | set(fingerprint)
                                 if old.get("job", {}).get(k) != fingerprint.get(k))
                raise InputError(f"{out} holds the output of another job (differs in: {', '.join(changed)}); "
                                 f"resume with the same command, or write to a new --output folder")
        elif any((out / "parts").iterdir()):
            raise InputError(f"{out} holds parts but no {MANIFEST}; write to a new --output folder")
        for sub in ("parts", "errors", "."):
            d = out / sub
            remove_dead_temps(d, [p.name for p in d.iterdir()] + [self.part_path(p).name for p, *_ in source.parts()]
                              + [self.error_path(p).name for p, *_ in source.parts()] + [MANIFEST, ERRORS])

    def part_path(self, part: int) -> Path:
        return self.out / "parts" / f"part-{part:06d}.parquet"

    def error_path(self, part: int) -> Path:
        return self.out / "errors" / f"part-{part:06d}.jsonl"

    def done(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in (self.out / "parts").glob("part-*.parquet")}

    def publish_part(self, part: int, table) -> tuple[int, int]:
        """Write the part's errors, then its linked rows; returns (n linked, n errors)."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from ..paths import atomic_write
        table = table.sort_by("row")
        is_err = pc.invert(pc.is_null(table["error"]))
        errors, ok = table.filter(is_err), table.filter(pc.invert(is_err))
        with atomic_write(self.error_path(part)) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                for row, message, record in zip(errors["row"].to_pylist(), errors["error"].to_pylist(),
                                                errors["record"].to_pylist(), strict=True):
                    f.write(json.dumps({"row": row, "error": message, "record": record}, ensure_ascii=False) + "\n")
        with atomic_write(self.part_path(part)) as tmp:
            pq.write_table(ok.select(OUTPUT_COLUMNS), tmp)
        return ok.num_rows, errors.num_rows

    def write_manifest(self, status: str, counters: dict, parts: dict) -> None:
        from ..paths import atomic_write
        data = {"job": self.fingerprint, "status": status, "counters": counters,
                "parts": {str(p): v for p, v in sorted(parts.items())}, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                                    time.gmtime())}
        with atomic_write(self.out / MANIFEST) as tmp:
            tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")

    def gather_errors(self) -> int:
        from ..paths import atomic_write
        n = 0
        with atomic_write(self.out / ERRORS) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                for part, *_ in self.source.parts():
                    path = self.error_path(part)
                    if path.exists():
                        for line in path.read_text(encoding="utf-8").splitlines():
                            f.write(line + "\n")
                            n += 1
        return n


def batch_link(*, kb: str, linker: str, output: str, input: str | None = None, format: str | None = None,
               split: str = "dev", limit: int | None = None, preset: str = "auto", device: str | None = None,
               options: dict | None = None, engine: str = "auto", k: int = DEFAULT_K, address: str | None = None,
               num_workers: int | None = None, worker_cpus: float = DEFAULT_WORKER_CPUS, batch_size: int = 32,
               part_size: int = 10_000, progress: bool = True, log=None) -> dict:
    """Link every mention of the input; returns the summary also written to the manifest."""
    from ..errors import require_whole
    from ..kb import KnowledgeBase
    from ..linkers.base import check_k
    from ..presets import get_preset

    log = log or (lambda msg: print(f"[mel batch] {msg}", file=sys.stderr, flush=True))
    check_k(k)
    require_whole("--batch-size", batch_size, 1)
    if num_workers is not None:
        require_whole("--num-workers", num_workers, 1)
    if not 0 < worker_cpus <= 64:
        raise InputError(f"--worker-cpus must be > 0, got {worker_cpus}")
    options = dict(options or {})
    require_ray()  # before the input is indexed: say at once when Ray is missing
    kb_obj = KnowledgeBase(kb, engine=engine)   # a missing or broken KB fails here, not in every actor
    preset_obj = get_preset(preset, device=device)
    if preset_obj.reason:
        log(preset_obj.reason)
    source = open_source(input, format=format, data=input if format else None, split=split, limit=limit,
                         part_size=part_size)
    fingerprint = {"input": source.fingerprint, "kb": str(Path(kb).resolve()), "kb_build_id": kb_obj.build_id,
                   "linker": linker, "options": options, "preset": preset_obj.name, "engine": engine, "k": k}
    out = Path(output)
    job = _Job(out, fingerprint, source)
    parts = source.parts()
    done = job.done()
    todo = [(p, s, e) for p, s, e in parts if p not in done]
    n_todo = sum(e - s for _, s, e in todo)
    log(f"{source.n_rows:,} mentions in {len(parts)} parts of {part_size:,}; {len(done)} parts already done, "
        f"{n_todo:,} mentions to link with {linker} (preset {preset_obj.name}) against {kb_obj.path.name} "
        f"({kb_obj.size:,} entities)")
    counters = {"rows": source.n_rows, "rows_done_before": source.n_rows - n_todo, "read": 0, "linked": 0,
                "errors": 0, "parts_written": 0, "stage_ms_total": {}}
    manifest_parts = _load_manifest_parts(out, job, parts)
    started = time.perf_counter()
    if todo:
        _run(job, source, todo, counters, manifest_parts, kb=kb, linker=linker, preset=preset_obj.name, device=device,
             options=options, engine=engine, k=k, address=address, num_workers=num_workers, worker_cpus=worker_cpus,
             batch_size=batch_size, progress=progress, kb_build_id=kb_obj.build_id, log=log)
    elapsed = time.perf_counter() - started
    n_errors_total = job.gather_errors()
    total_linked = sum(v["linked"] for v in manifest_parts.values())
    counters.update({"seconds": round(elapsed, 2), "mentions_per_s": round(counters["linked"] / elapsed, 2)
                     if elapsed > 0 and counters["linked"] else None,
                     "total_linked": total_linked, "total_errors": n_errors_total})
    ms = counters.pop("stage_ms_total")
    counters["stage_ms_mean"] = {s: round(v / max(counters["linked"], 1), 3) for s, v in ms.items()}
    job.write_manifest("complete", counters, manifest_parts)
    log(f"done: {counters['linked']:,} linked and {counters['errors']:,} error rows this run "
        f"({counters['mentions_per_s']} mentions/s); {total_linked:,} linked and {n_errors_total:,} errors in "
        f"{out} (errors: {out / ERRORS})")
    return {"output": str(out), "manifest": str(out / MANIFEST), **counters}


def _load_manifest_parts(out: Path, job: _Job, parts) -> dict:
    """{part: {rows, linked, errors}} of the parts done: from the manifest, and from the files for a
    part published just before a kill, before the manifest said so."""
    import pyarrow.parquet as pq
    path = out / MANIFEST
    listed = json.loads(path.read_text(encoding="utf-8")).get("parts", {}) if path.exists() else {}
    done, ranges = job.done(), {p: (s, e) for p, s, e in parts}
    found = {}
    for p in sorted(done & set(ranges)):
        if str(p) in listed:
            found[p] = listed[str(p)]
        else:
            errors = job.error_path(p)
            found[p] = {"rows": list(ranges[p]), "linked": pq.ParquetFile(job.part_path(p)).metadata.num_rows,
                        "errors": len(errors.read_text(encoding="utf-8").splitlines()) if errors.exists() else 0}
    return found


def _run(job: _Job, source: Source, todo, counters, manifest_parts, *, kb, linker, preset, device, options, engine,
         k, address, num_workers, worker_cpus, batch_size, progress, kb_build_id, log):
    import pyarrow as pa
    from tqdm.auto import tqdm

    started = time.perf_counter()
    connect(address)
    import ray
    import ray.data
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    ctx.enable_progress_bars = False  # one bar, ours, below
    ctx.print_on_execution_start = False
    total_cpus = float(ray.cluster_resources().get("CPU", 1))
    n_workers = num_workers or max(1, int((total_cpus - READ_CPUS) // worker_cpus))
    n_nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    log(f"Ray: {n_nodes} node(s), {total_cpus:g} CPUs; {n_workers} link worker(s) of {worker_cpus:g} CPU")

    if source.kind == "dataset":
        items = [{"row": r, "record": source.records[r]} for _, s, e in todo for r in range(s, e)]
        ds = ray.data.from_items(items, override_num_blocks=len(todo))
    else:
        descr = [{"part": p, "start": s, "stop": e} for p, s, e in todo]
        ds = ray.data.from_items(descr, override_num_blocks=min(len(descr), 200))
        # a plain function (not a class): read tasks, a quarter CPU each, so that actors never starve them
        ds = ds.map_batches(ReadParts(source.reader()), batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS)
    ds = ds.map_batches(
        LinkWorker, batch_size=max(batch_size, 64), batch_format="pyarrow",
        fn_constructor_kwargs=dict(kb=str(Path(kb).resolve()), linker=linker, preset=preset, options=options,
                                   engine=engine, k=k, pipe_batch=batch_size, base_dir=source.base_dir,
                                   kb_build_id=kb_build_id, device=device),
        compute=ray.data.ActorPoolStrategy(size=n_workers), num_cpus=worker_cpus)

    expected = {p: e - s for p, s, e in todo}
    publish_times: list[tuple[float, int]] = []
    pending: dict[int, list] = defaultdict(list)
    seen = defaultdict(int)
    bar = tqdm(total=sum(expected.values()), desc=f"batch {linker}", unit=" mention", disable=not progress,
               file=sys.stderr)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if batch.num_rows == 0:
                continue
            counters.setdefault("first_result_s", round(time.perf_counter() - started, 2))
            rows = batch["row"].to_numpy()
            part_ids = rows // source.part_size
            for p in set(part_ids.tolist()):
                sub = batch.filter(pa.array(part_ids == p))
                pending[p].append(sub)
                seen[p] += sub.num_rows
                if seen[p] > expected[p]:
                    raise MELError(f"part {p} got {seen[p]} rows for {expected[p]} input rows: a row was linked twice")
                if seen[p] == expected[p]:
                    table = pa.concat_tables(pending.pop(p))
                    n_ok, n_err = job.publish_part(p, table)
                    _count_stages(table, counters)
                    counters["linked"] += n_ok
                    counters["errors"] += n_err
                    counters["parts_written"] += 1
                    publish_times.append((time.perf_counter(), table.num_rows))
                    lo = p * source.part_size
                    manifest_parts[p] = {"rows": [lo, lo + expected[p]], "linked": n_ok, "errors": n_err}
                    job.write_manifest("running", {k: v for k, v in counters.items() if k != "stage_ms_total"},
                                       manifest_parts)
            counters["read"] += batch.num_rows
            bar.update(batch.num_rows)
            bar.set_postfix(linked=counters["linked"], errors=counters["errors"], parts=counters["parts_written"],
                            refresh=False)
    finally:
        bar.close()
    if len(publish_times) >= 3:  # rows/s between the first and the last part: without start-up and model loading
        span = publish_times[-1][0] - publish_times[0][0]
        counters["steady_mentions_per_s"] = round(sum(n for _, n in publish_times[1:]) / span, 2) if span > 0 else None
    missing = {p: expected[p] - seen[p] for p in expected if seen[p] != expected[p]}
    if missing:
        raise MELError(f"{len(missing)} part(s) did not receive all their rows ({dict(list(missing.items())[:5])}); "
                       f"rerun the same command to finish them")


def _count_stages(table, counters):
    ms = counters["stage_ms_total"]
    for t in table["timings"].to_pylist():
        if t:
            for stage, v in json.loads(t).items():
                ms[stage] = ms.get(stage, 0.0) + float(v)


# -- evaluation on the same engine ----------------------------------------------------------------
def batch_eval(*, kb: str, linker: str, format: str, data: str, split: str = "dev", output: str,
               limit: int | None = None, **kwargs) -> dict:
    """Hits@k / MRR of a linker on a dataset split, computed from the batch job's output: the same
    numbers as `mel eval` (mel.evaluate.rank_metrics over the gold ranks, in input order)."""
    import pyarrow.parquet as pq

    from ..evaluate import HITS_AT, rank_metrics
    if kwargs.get("k", DEFAULT_K) < max(HITS_AT):
        raise InputError(f"evaluation needs k >= {max(HITS_AT)} candidates (Hits@{max(HITS_AT)})")
    summary = batch_link(kb=kb, linker=linker, output=output, input=data, format=format, split=split, limit=limit,
                         **kwargs)
    out = Path(output)
    files = sorted((out / "parts").glob("part-*.parquet"))
    table = pq.read_table(files, columns=["row", "gold_id", "gold_rank", "gold_in_kb", "linker", "preset",
                                          "models"]).sort_by("row") if files else None
    n_rows = summary["rows"]
    ranks: list = [None] * n_rows
    n_missing = 0
    if table is not None:
        for row, rank, in_kb in zip(table["row"].to_pylist(), table["gold_rank"].to_pylist(),
                                    table["gold_in_kb"].to_pylist(), strict=True):
            ranks[row] = rank
            n_missing += in_kb is False
    n_errors = summary["total_errors"]
    report = {"linker": linker, "n": n_rows, "protocol": "whole-KB ranking", **rank_metrics(ranks),
              "n_gold_not_in_kb": n_missing, "n_error_rows": n_errors, "dataset": format, "split": split,
              "limit": limit, "engine": "ray-data", "output": str(out),
              "mentions_per_s": summary.get("mentions_per_s"), "wall_seconds": summary.get("seconds")}
    if table is not None and table.num_rows:
        report["preset"] = table["preset"][0].as_py()
        report["models"] = json.loads(table["models"][0].as_py())
    return report
