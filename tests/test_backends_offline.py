"""One offline rule (mel.backends.hub.hub_offline) for every backend that can reach the Hugging Face
hub: with the hub switched off, each such loader fails at once, without touching the network, with
a ModelUnavailableError that names the offline preset."""
from __future__ import annotations

import socket

import pytest

from mel.errors import ModelUnavailableError

NO_HUB_ID = "mel-test-nonexistent/model-xyz"


def _load_text(kind):
    def load():
        from mel.backends.text import load_text_encoder
        return load_text_encoder(f"{kind}:{NO_HUB_ID}")
    return load


def _load_image(kind):
    def load():
        from mel.backends.image import load_image_encoder
        return load_image_encoder(f"{kind}:{NO_HUB_ID}")
    return load


def _load_clip_text():
    from mel.backends.image import load_clip_text_encoder
    return load_clip_text_encoder("clip:" + NO_HUB_ID)


def _load_llm():
    from mel.backends.llm import load_causal_lm
    return load_causal_lm("hf:" + NO_HUB_ID)


def _load_cue():
    from mel.backends.cue import load_cue_provider
    return load_cue_provider("blip2:" + NO_HUB_ID, use_disk_cache=False)


def _get_backend():
    from mel.backends import get_backend
    return get_backend("mention_encoder", "hf-cls:" + NO_HUB_ID)


HUB_LOADERS = {
    "text st": _load_text("st"), "text hf-mean": _load_text("hf-mean"), "text hf-cls": _load_text("hf-cls"),
    "text hf-cls-raw": _load_text("hf-cls-raw"), "image clip": _load_image("clip"),
    "image clip-pooled": _load_image("clip-pooled"), "clip text": _load_clip_text, "llm": _load_llm,
    "cue blip2": _load_cue, "get_backend": _get_backend,
}


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt is recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("the test forbids network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.mark.parametrize("what", list(HUB_LOADERS))
def test_every_hub_loader_fails_fast_offline_naming_the_offline_preset(what, monkeypatch, no_network):
    from mel.backends.hub import OFFLINE_HINT

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as err:
        HUB_LOADERS[what]()
    message = str(err.value)
    assert "hub is switched off" in message and "--preset offline" in message and OFFLINE_HINT in message
    assert no_network == []


@pytest.mark.parametrize(("env", "hub_constant", "offline"), [
    ({}, False, False),
    ({"HF_HUB_OFFLINE": "1"}, False, True),
    ({"HF_HUB_OFFLINE": "true"}, False, True),
    ({"TRANSFORMERS_OFFLINE": "YES"}, False, True),
    ({"HF_HUB_OFFLINE": "0"}, False, False),
    ({}, True, True),  # huggingface_hub's own offline mode (read once at its import, or set by code)
])
def test_hub_offline_is_the_one_rule(env, hub_constant, offline, monkeypatch):
    from huggingface_hub import constants

    from mel.backends.hub import hub_offline

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", hub_constant)
    assert hub_offline() is offline


def test_one_offline_hint_for_every_backend():
    from mel.backends import hub, image, text

    assert text.OFFLINE_HINT is hub.OFFLINE_HINT is image.OFFLINE_HINT
    assert "--preset offline" in hub.OFFLINE_HINT
