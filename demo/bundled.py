"""The demo's own data: a small KB, a demonstration pool and examples, all in demo/assets/.

The entities, pool captions and example captions were written for this project (not taken
from any dataset). The example photos come from packages the project already depends on:
scikit-image's `astronaut` (Eileen Collins), `rocket` (a Falcon 9 launch), `coffee`, `chelsea`
(a cat) and matplotlib's `grace_hopper.jpg`. They are written to the cache once, as PNG/JPEG
files, because Gradio and the linkers take image paths.

The demo KB is built into the cache at first start with mel.kb.build_kb and the preset's text
encoder; its file name hashes kb.jsonl and the encoder, so an edit or another preset rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mel.errors import InputError
from mel.paths import cache_dir

ASSETS = Path(__file__).resolve().parent / "assets"
KB_FILE = ASSETS / "kb.jsonl"
POOL_FILE = ASSETS / "pool.jsonl"
EXAMPLES_FILE = ASSETS / "examples.json"


@dataclass(frozen=True)
class BundledExample:
    image: str | None   # a local path (materialised in the cache)
    caption: str
    mention: str
    start: int
    end: int
    why: str
    gold: str = ""      # the right KB id ("NIL": not in the KB); "" when nobody said


def package_image(ref: str) -> Path:
    """A photo shipped by a dependency, written once to the cache: 'skimage:NAME' or 'matplotlib:FILE'."""
    kind, _, name = ref.partition(":")
    folder = cache_dir("demo", "images")
    if kind == "skimage":
        target = folder / f"{name}.png"
        if not target.exists():
            import skimage.data
            from PIL import Image
            loader = getattr(skimage.data, name, None)
            if loader is None:
                raise InputError(f"scikit-image has no sample image {name!r}")
            _atomic_save(Image.fromarray(loader()), target, "PNG")
        return target
    if kind == "matplotlib":
        import matplotlib
        source = Path(matplotlib.get_data_path()) / "sample_data" / name
        if not source.exists():
            raise InputError(f"matplotlib has no sample file {name!r}")
        return source
    raise InputError(f"unknown image reference {ref!r}; expected 'skimage:NAME' or 'matplotlib:FILE'")


def _atomic_save(image, target: Path, fmt: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        image.save(tmp, format=fmt)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def bundled_examples() -> list[BundledExample]:
    from mel.types import locate_mention
    out = []
    for item in json.loads(EXAMPLES_FILE.read_text(encoding="utf-8")):
        span = locate_mention(item["caption"], item["mention"])
        if span is None:  # a broken asset is a bug in this repository, say which one
            raise InputError(f"{EXAMPLES_FILE.name}: mention {item['mention']!r} is not in {item['caption']!r}")
        image = str(package_image(item["image"])) if item.get("image") else None
        out.append(BundledExample(image, item["caption"], item["mention"], span[0], span[1], item.get("why", ""),
                                  item.get("gold", "")))
    return out


def bundled_gold_examples():
    """The bundled examples as labelled `mel.types.Example`s against the demo KB (benchmarks, tests)."""
    from mel.types import Example, Mention
    return [Example(Mention(ex.caption, ex.start, ex.end, image=ex.image, id=f"demo-{i}"), ex.gold,
                    sample_id=f"demo-{i}", dataset="demo", split="demo", located="exact")
            for i, ex in enumerate(bundled_examples()) if ex.gold]


def demo_kb_path(text_encoder_name: str) -> Path:
    digest = hashlib.sha256(KB_FILE.read_bytes() + text_encoder_name.encode()).hexdigest()[:12]
    return cache_dir("demo") / f"demo-kb-{digest}.sqlite"


def ensure_demo_kb(preset, progress: bool = False) -> Path:
    """The demo KB for `preset`, built on first use (seconds: 30 entities)."""
    from mel.datasets import read_kb_entities
    from mel.kb import build_kb

    encoder = preset.backend("text_encoder")
    path = demo_kb_path(encoder.name)
    if not path.exists():
        build_kb(read_kb_entities("jsonl", KB_FILE), path, text_encoder=encoder, image_encoder=None,
                 source_format="jsonl", progress=progress)
    return path


MAX_EXAMPLES = 6


def examples_for(service, n: int = MAX_EXAMPLES) -> list[BundledExample]:
    """The Link tab's examples for the KB `service` has loaded: the bundled ones with the bundled
    KB; with another KB, labelled mentions of that KB (GEMEL's pool, then the tasks of projects
    on that KB), those with an image first; none when there are none."""
    if not service.config.kb:
        return bundled_examples()
    kb = service.kb
    found: list[BundledExample] = []
    seen: set[tuple[str, int, int]] = set()

    def take(mention, why: str) -> None:
        key = (mention.caption, mention.start, mention.end)
        if key in seen or len(found) >= 4 * n:
            return
        seen.add(key)
        image = mention.image if mention.image and os.path.isfile(mention.image) else None
        found.append(BundledExample(image, mention.caption, mention.text, mention.start, mention.end, why))

    pool = service.pool()
    for ex in (pool.examples if pool is not None else ()):
        if ex.gold_id in kb:
            take(ex.mention, f"→ {ex.gold_name or ex.gold_id}")
    if len(found) < n and service.store is not None:
        from annotations.projects import kb_stamp, list_projects, list_tasks
        for project in list_projects(service.store):
            if project.kb_stamp == kb_stamp(kb):
                for task in list_tasks(service.store, project, limit=4 * n):
                    take(task.mention, f"task of {project.name}")
    found.sort(key=lambda e: e.image is None)  # those with a photo first
    return found[:n]
