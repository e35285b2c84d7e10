"""Presets and the memory check: a hub preset that does not fit is refused with both figures, `auto`
takes the next one that fits and says why; `python -m mel models` shows the estimate. The machine's
memory and the hub are faked (no network, no downloads)."""
from __future__ import annotations

import pytest

from mel import memory, presets
from mel.errors import MELError
from mel.memory import GB, Available
from mel.presets import PRESETS, get_preset


@pytest.fixture
def machine(monkeypatch):
    """A fake machine: the hub answers (configs are not fetched: recorded figures), RAM and GPU as set."""
    state = {"ram": 16 * GB, "gpu": None}
    monkeypatch.delenv("MEL_MEMORY_CHECK", raising=False)
    monkeypatch.setattr(presets, "hub_status", lambda: (True, "the Hugging Face hub answered"))
    monkeypatch.setattr(presets, "_cuda_available", lambda: state["gpu"] is not None)
    monkeypatch.setattr(memory, "_hub_config", lambda model_id: (None, "not fetched in tests"))

    def available(device="cpu"):
        cuda = device.startswith("cuda")
        return Available(state["ram"], "test", state["gpu"] if cuda else None, "test gpu" if cuda else "")

    monkeypatch.setattr(memory, "available_memory", available)
    return state


def test_presets_use_cue_models_that_fit_their_target():
    assert PRESETS["small"].cue == "blip:Salesforce/blip-image-captioning-base"  # not BLIP-2 on a CPU
    assert PRESETS["paper"].cue == "blip2:Salesforce/blip2-opt-2.7b" and PRESETS["paper"].device == "cuda"


def test_auto_on_a_cpu_space_picks_small_and_says_how_much(machine):
    preset = get_preset("auto")
    assert preset.name == "small" and preset.device == "cpu"
    assert preset.reason.startswith("auto -> small: the Hugging Face hub answered, no GPU")
    assert "needs about 4.5 GB of RAM; 16.0 GB of RAM available" in preset.reason


def test_auto_falls_back_to_offline_when_small_does_not_fit(machine):
    machine["ram"] = 3 * GB
    preset = get_preset("auto")
    assert preset.name == "offline"
    assert preset.reason.startswith("auto -> offline: the Hugging Face hub answered, but preset small needs "
                                    "about 4.5 GB of RAM, this machine has 3.0 GB available")


def test_auto_on_a_small_gpu_falls_back_from_paper_to_small(machine):
    machine["gpu"] = 22 * GB  # a 24 GB card: OPT-6.7B and BLIP-2 in float16 need about 30 GB
    preset = get_preset("auto")
    assert preset.name == "small" and preset.device == "cpu"
    assert "preset paper needs about 30.1 GB on cuda, which has 22.0 GB free" in preset.reason
    machine["gpu"] = 45 * GB
    preset = get_preset("auto")
    assert preset.name == "paper" and preset.device == "cuda" and "a GPU is present" in preset.reason


def test_a_named_preset_that_does_not_fit_is_refused(machine):
    machine["ram"] = 3 * GB
    with pytest.raises(MELError) as err:
        get_preset("small")
    message = str(err.value)
    assert message.startswith("preset small needs about 4.5 GB of RAM, this machine has 3.0 GB available")
    assert "use --preset offline or a machine with more memory" in message and "MEL_MEMORY_CHECK=0" in message
    with pytest.raises(MELError, match="preset paper needs about 46.4 GB of RAM"):  # no GPU: OPT-6.7B in float32
        get_preset("paper")
    assert get_preset("offline").name == "offline"  # packaged: never checked
    assert get_preset("small", check_memory=False).name == "small"


def test_the_check_can_be_switched_off(machine, monkeypatch):
    machine["ram"] = 1 * GB
    monkeypatch.setenv("MEL_MEMORY_CHECK", "0")
    assert get_preset("small").name == "small"
    assert get_preset("auto").name == "small"


def test_hub_unreachable_is_offline_without_estimating(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(presets, "hub_status", lambda: (False, "the Hugging Face hub cannot be reached (test)"))
    monkeypatch.setattr(memory, "estimate_preset", lambda preset: pytest.fail("offline needs no estimate"))
    preset = get_preset("auto")
    assert preset.name == "offline" and "cannot be reached" in preset.reason


def test_models_command_prints_the_estimate(machine, capsys):
    from mel.cli import main

    machine["ram"] = 3 * GB
    assert main(["models", "--preset", "small"]) == 0  # shown even though it does not fit
    out = capsys.readouterr().out
    assert "blip:Salesforce/blip-image-captioning-base" in out and "224.0M" in out and "float32" in out
    assert "RAM: about 4.5 GB" in out and "does NOT fit" in out and "recorded figures" in out
    assert main(["models", "--preset", "auto"]) == 0
    captured = capsys.readouterr()
    assert "auto -> offline" in captured.err and "preset: offline" in captured.out and "-> fits" in captured.out
