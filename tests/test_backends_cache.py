"""The one model cache (mel.backends.cache): loaded once and shared, and clear_model_cache() really
forgets and frees every kind of model."""
from __future__ import annotations

import threading
import time
import weakref

import pytest
from test_text_llm_backends import _save_tiny_bert, _save_tiny_lm

from mel.backends.cache import MODELS, cached_model


def test_clear_model_cache_frees_every_kind_of_model(tmp_path, monkeypatch):
    import mel.backends as backends
    from mel.backends import cached_models, clear_model_cache, get_backend, loaded_backends
    from mel.backends.efficientnet_lite import load_lite0

    clear_model_cache()
    specs = {  # text, image (packaged Lite0), LLM, cue (faces + face-api, ImageNet labels), ConSE (Lite0 + MiniLM)
        "text_encoder": "hf-mean:" + str(_save_tiny_bert(tmp_path / "bert")),
        "llm": "hf:" + str(_save_tiny_lm(tmp_path / "llama", "llama")),
        "cue": "faces",
        "image_encoder": "conse",
    }
    builds = []
    real_load = backends._load
    monkeypatch.setattr(backends, "_load", lambda *a: builds.append(a) or real_load(*a))

    refs = {}
    for role, spec in specs.items():
        model = get_backend(role, spec)
        assert get_backend(role, spec) is model  # shared, not loaded again
        refs[role] = weakref.ref(model)
    lite0 = load_lite0("cpu")
    assert lite0 is get_backend("image_encoder", "conse").classifier.model  # one network behind both
    refs["efficientnet-lite0"] = weakref.ref(lite0)
    del model, lite0
    # ConSE loaded its text encoder through get_backend while its own load was running (no deadlock)
    assert [role for role, _, _ in builds] == ["text_encoder", "llm", "cue", "image_encoder", "text_encoder"]
    assert set(loaded_backends()) >= {"text:minilm@cpu", f"llm:{specs['llm']}@cpu", "cue:faces@cpu",
                                      "image_encoder:conse@cpu"}
    loaded = cached_models()
    for loader in ("load_conse_encoder", "load_lite0", "_cached_encoder"):
        assert any(f".{loader}(" in name for name in loaded), (loader, loaded)
    if get_backend("cue", "faces").analyzer is not None:  # dlib is installed: the face models are cached too
        assert any(".load_face_analyzer(" in name for name in loaded), loaded

    assert clear_model_cache() == len(loaded)
    assert cached_models() == {} and len(MODELS) == 0 and loaded_backends() == {}
    alive = [name for name, ref in refs.items() if ref() is not None]
    assert alive == []  # nothing else held them: the memory is back

    builds.clear()
    again = get_backend("text_encoder", specs["text_encoder"])
    assert builds == [("text_encoder", specs["text_encoder"], "cpu")]  # built anew after the clear
    assert get_backend("text_encoder", specs["text_encoder"]) is again and len(builds) == 1
    clear_model_cache()


def test_cached_model_builds_once_per_arguments():
    calls = []

    @cached_model
    def load_thing(name, device="cpu"):
        calls.append((name, device))
        return object()

    try:
        a = load_thing("a")
        assert load_thing("a") is a and load_thing("b") is not a
        assert load_thing("a", device="cuda") is not a  # keyed by the arguments as given
        assert len(calls) == 3 and load_thing.__wrapped__("a") is not a and len(calls) == 4
        load_thing.cache_clear()  # this loader's entries only
        assert not [k for k, _ in MODELS.entries() if k[0].endswith("load_thing")]
        assert load_thing("a") is not a
    finally:
        load_thing.cache_clear()


def test_a_failed_load_is_not_cached():
    attempts = []

    @cached_model
    def flaky():
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("disk hiccup")
        return object()

    try:
        with pytest.raises(OSError):
            flaky()
        assert flaky() is flaky() and len(attempts) == 2
    finally:
        flaky.cache_clear()


def test_two_threads_get_one_model_and_a_loaded_one_never_waits_for_a_build():
    builds = []
    release = threading.Event()

    @cached_model
    def slow(name):
        builds.append(name)
        if name == "big":
            release.wait(10)
        return object()

    try:
        ready = slow("small")
        results = []
        threads = [threading.Thread(target=lambda: results.append(slow("big"))) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.1)
        start = time.perf_counter()
        assert slow("small") is ready  # answered while "big" is still building
        assert time.perf_counter() - start < 1
        release.set()
        for t in threads:
            t.join(10)
        assert len(results) == 2 and results[0] is results[1]
        assert builds == ["small", "big"]  # built once although asked twice at the same time
    finally:
        slow.cache_clear()


@pytest.mark.forks
def test_a_forked_child_can_load_while_a_parent_thread_holds_the_build_lock():
    """A fork (the kill-sweep tests, multiprocessing) while an app thread is loading a model must not
    leave the child's cache locked forever."""
    import os
    import signal
    import threading
    import time

    from mel.backends.cache import ModelCache

    cache = ModelCache()
    loading = threading.Event()

    def slow():
        loading.set()
        time.sleep(3)
        return 1

    thread = threading.Thread(target=lambda: cache.get(("slow",), slow))
    thread.start()
    loading.wait(5)
    pid = os.fork()
    if pid == 0:  # the child: build another model, then leave at once
        cache.get(("other",), lambda: 2)
        os._exit(0)
    try:
        for _ in range(100):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.waitstatus_to_exitcode(status) == 0
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child waited forever on the cache's lock")
    finally:
        thread.join()
