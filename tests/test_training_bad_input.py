"""Bad input to the training, batch, enrichment and DIM commands: one clear line and exit 2, checked
before the work (a checkpoint, a Ray job, an LLM, a KB's candidates), and nothing lost."""
from __future__ import annotations

import json

import pytest
from test_calibration_methods import read_only_dir
from test_dim import ENTITIES, hashing_preset, name_match_head

from mel.dim.candidates import candidate_lists, load_candidate_lists
from mel.dim.linker import DimLinker
from mel.errors import CheckpointError, InputError
from mel.kb import build_kb
from mel.training import check_checkpoint_target
from mel.training.checkpoint import load_state


def _never(*args, **kwargs):
    raise AssertionError("the work started before the input was checked")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


# -- 1. checkpoints: OUT and --state-dir in a file or a read-only folder ------------------------------------
def test_a_checkpoint_under_a_file_or_in_a_read_only_folder_is_refused(tmp_path, monkeypatch):
    """`mel train dim --out FILE/ck` (or --out RO/ck) trained a whole epoch, then FileExistsError /
    PermissionError from save_training_state."""
    (tmp_path / "afile").write_text("mine")
    ro = read_only_dir(tmp_path / "ro", monkeypatch)
    with pytest.raises(CheckpointError, match="afile is a file"):
        check_checkpoint_target(tmp_path / "afile" / "ck")
    with pytest.raises(CheckpointError, match="cannot write into .*ro"):
        check_checkpoint_target(ro / "ck")
    assert check_checkpoint_target(tmp_path / "new" / "ck") == tmp_path / "new" / "ck"
    assert (tmp_path / "afile").read_text() == "mine" and not list(ro.iterdir())


@pytest.mark.parametrize("flag", ["--out", "--state-dir"])
def test_train_dim_checks_out_and_state_dir_before_reading_anything(tmp_path, monkeypatch, capsys, flag):
    from mel.cli import main
    (tmp_path / "afile").write_text("mine")
    ro = read_only_dir(tmp_path / "ro", monkeypatch)
    for bad, said in ((tmp_path / "afile" / "ck", "afile is a file"), (ro / "ck", "cannot write into")):
        paths = {"--out": str(tmp_path / "ck"), flag: str(bad)}
        args = ["train", "dim", "--format", "jsonl", "--data", str(tmp_path / "no-data"), "--kb",
                str(tmp_path / "no.sqlite"), "--epochs", "1", "--quiet"]
        assert main(args + [a for kv in paths.items() for a in kv]) == 2
        assert said in _one_line_error(capsys)
    assert (tmp_path / "afile").read_text() == "mine"


# -- 3. batch link / eval: --output and --json before Ray starts ----------------------------------------
@pytest.mark.parametrize("command", ["link", "eval"])
def test_batch_checks_its_outputs_before_the_job(tmp_path, monkeypatch, capsys, command):
    """--output RO/bo (PermissionError), --output FILE/x (NotADirectoryError), --json DIR
    (IsADirectoryError) failed after the whole Ray job."""
    import mel.batch.engine as engine
    from mel.cli import main
    monkeypatch.setattr(engine, "batch_link", _never)
    monkeypatch.setattr(engine, "batch_eval", _never)
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "folder").mkdir()
    ro = read_only_dir(tmp_path / "ro", monkeypatch)
    source = ["--input", str(tmp_path / "m.jsonl")] if command == "link" else [
        "--format", "jsonl", "--data", str(tmp_path / "ds")]
    base = ["batch", command, "--kb", str(tmp_path / "kb.sqlite"), "--linker", "bm25", *source, "--quiet"]
    for outputs, said in ((["--output", str(ro / "bo")], "ro"), (["--output", str(tmp_path / "afile" / "x")], "afile"),
                          (["--output", str(tmp_path / "out"), "--json", str(tmp_path / "folder")], "is a directory")):
        assert main(base + outputs) == 2
        assert said in _one_line_error(capsys)
    assert (tmp_path / "afile").read_text() == "mine"


# -- 5. kb enrich: the numbers, the prompt and --out before the LLM loads --------------------------------------
@pytest.mark.parametrize("extra,said", [
    (["--max-new-tokens", "-1"], "--max-new-tokens must be a whole number >= 1"),
    (["--batch-size", "0"], "--batch-size must be a whole number >= 1"),
    (["--prompt", "{name} {description} {x}"], "KeyError"),
    (["--prompt", "{name} {description} {"], "ValueError"),
    (["--prompt", "{name} {"], "must contain {name} and {description}"),
    (["--out", "AFILE/e.sqlite"], "is a file"),
])
def test_kb_enrich_checks_its_arguments_before_the_llm_loads(tmp_path, monkeypatch, capsys, extra, said):
    import mel.dim.enrich as enrich
    from mel.cli import main
    monkeypatch.setattr(enrich, "llm_generator", _never)
    (tmp_path / "afile").write_text("mine")
    extra = [e.replace("AFILE", str(tmp_path / "afile")) for e in extra]
    out = [] if "--out" in extra else ["--out", str(tmp_path / "e.sqlite")]
    assert main(["kb", "enrich", str(tmp_path / "kb.sqlite"), *out, *extra, "--quiet"]) == 2
    err = _one_line_error(capsys)
    assert said in err, err
    if said in ("KeyError", "ValueError"):
        assert "{{" in err  # says how to write a literal brace
    assert (tmp_path / "afile").read_text() == "mine"


# -- 6. DIM options, candidate files and a checkpoint's candidate sizes ----------------------------------------
@pytest.mark.parametrize("option,value,said", [
    ("n_bm25", 1e30, "n_bm25 must be a whole number >= 0"),
    ("n_bm25", -5, "n_bm25 must be a whole number >= 0"),
    ("n_dense", 10**30, "n_dense .*at most"),
    ("n_dense", 20_000, "n_dense must be at most 10,000"),
    ("n_dense_mention", "5", "n_dense_mention must be a whole number"),
    ("use_image", "maybe", "use_image is true or false"),
    ("use_cue", 2, "use_cue is true or false"),
    ("keep_pool", "", "keep_pool is true or false"),
])
def test_dim_options_are_checked(tmp_path, option, value, said):
    """--opt n_bm25=1e30 was an OverflowError, n_bm25=-5 and use_image=maybe (bool("maybe") is True)
    were accepted silently. Checked before the head loads."""
    with pytest.raises(InputError, match=said):
        DimLinker(None, hashing_preset(), checkpoint=tmp_path / "no-head", **{option: value})


def test_dim_yes_no_options_take_the_usual_spellings():
    from mel.dim.linker import option_bool
    assert [option_bool("x", v) for v in (True, 1, "true", "Yes", "1")] == [True] * 5
    assert [option_bool("x", v) for v in (False, 0, "false", "NO", "0")] == [False] * 5


def test_a_candidate_file_that_is_a_folder_is_a_clear_error(tmp_path):
    """protocol=candidate-list candidate_file=DIR: an IsADirectoryError traceback."""
    with pytest.raises(InputError, match="is a directory, not a file"):
        load_candidate_lists(tmp_path)
    with pytest.raises(InputError, match="is a directory, not a file"):
        DimLinker(None, hashing_preset(), checkpoint=tmp_path / "no-head", protocol="candidate-list",
                  candidate_file=tmp_path)
    (tmp_path / "l.jsonl").write_bytes(b'{"id": "m1", "candidates": ["\xff"]}\n')
    with pytest.raises(InputError, match="cannot read the candidate-list file"):
        load_candidate_lists(tmp_path / "l.jsonl")
    (tmp_path / "l.jsonl").write_text('{"id": "m1", "candidates": "Q1"}\n')
    with pytest.raises(InputError, match="line 1"):
        load_candidate_lists(tmp_path / "l.jsonl")


@pytest.mark.parametrize("candidates,said", [({"n_bm25": "x"}, "candidates.n_bm25"), (5, "candidates must be"),
                                             ({"n_dense": -1}, "candidates.n_dense")])
def test_a_checkpoints_candidate_sizes_are_checked(tmp_path, hashing_encoder, candidates, said):
    """config.json "candidates": {"n_bm25": "x"} was a TypeError deep in the candidate search."""
    kb = build_kb(ENTITIES, tmp_path / "kb.sqlite", text_encoder=hashing_encoder, progress=False)
    head = name_match_head(tmp_path / "head", hashing_encoder.dim)
    config = json.loads((head / "config.json").read_text())
    (head / "config.json").write_text(json.dumps({**config, "candidates": candidates}))
    with pytest.raises(CheckpointError, match=f"config.json: .*{said}.*mel train dim"):
        DimLinker(kb, hashing_preset(), checkpoint=head, text_encoder=hashing_encoder)


def test_whole_kb_dim_needs_one_candidate_source(tmp_path, hashing_encoder):
    kb = build_kb(ENTITIES, tmp_path / "kb.sqlite", text_encoder=hashing_encoder, progress=False)
    head = name_match_head(tmp_path / "head", hashing_encoder.dim)
    linker = DimLinker(kb, hashing_preset(), checkpoint=head, text_encoder=hashing_encoder, n_dense=0)
    assert linker.generator.config.n_dense == 0  # one source off: an ablation
    with pytest.raises(InputError, match="all 0"):
        DimLinker(kb, hashing_preset(), checkpoint=head, text_encoder=hashing_encoder, n_bm25=0, n_dense=0,
                  n_dense_mention=0)


# -- 7. `mel dim candidates`: the list size and the mention ids ------------------------------------------------
def _candidates_setup(tmp_path, hashing_encoder, monkeypatch, ids):
    from mel.datasets import write_jsonl_examples
    from mel.presets import Preset
    from mel.types import Example, Mention
    build_kb(ENTITIES, tmp_path / "kb.sqlite", text_encoder=hashing_encoder, progress=False)
    data = tmp_path / "data"
    data.mkdir()
    examples = [Example(Mention.from_text("Collins on the Shuttle", "Collins", id=mid), "Q1", sample_id=f"s{i}")
                for i, mid in enumerate(ids)]
    write_jsonl_examples(examples, data / "dev.jsonl")
    monkeypatch.setattr(Preset, "backend", lambda self, role: hashing_encoder)
    return ["dim", "candidates", "--format", "jsonl", "--data", str(data), "--kb", str(tmp_path / "kb.sqlite"),
            "--out", str(tmp_path / "c.jsonl")]


@pytest.mark.parametrize("size", ["0", "-3"])
def test_dim_candidates_needs_a_list_size_of_at_least_one(tmp_path, hashing_encoder, monkeypatch, capsys, size):
    """--size 0 printed "lists of 0" and wrote lists of 3; --size -3 was accepted."""
    from mel.cli import main
    args = _candidates_setup(tmp_path, hashing_encoder, monkeypatch, ["m0", "m1"])
    assert main(args + ["--size", size]) == 2
    assert "--size must be a whole number >= 1" in _one_line_error(capsys)
    assert not (tmp_path / "c.jsonl").exists()
    with pytest.raises(InputError, match="size must be a whole number >= 1"):
        candidate_lists(["m0"], ["Q1"], [[]], None, size=int(size))


@pytest.mark.parametrize("ids,said", [([None, None, None], "3 of 3 mentions have no mention id"),
                                      (["m0", "m0", "m1"], "mention ids occur more than once ('m0')")])
def test_dim_candidates_refuses_missing_or_repeated_mention_ids(tmp_path, hashing_encoder, monkeypatch, capsys, ids,
                                                                said):
    """Mentions without an id all went to one list keyed "None" ("wrote 1 candidate lists"): the
    candidate-list protocol (DimLinker) looks each list up by Mention.id, so each needs its own."""
    from mel.cli import main
    args = _candidates_setup(tmp_path, hashing_encoder, monkeypatch, ids)
    assert main(args + ["--size", "3"]) == 2
    assert said in _one_line_error(capsys)
    assert not (tmp_path / "c.jsonl").exists()
    assert main(args[:-1] + [str(tmp_path / "ok.jsonl"), "--size", "3"]) == 2  # not written under another name
    capsys.readouterr()


def test_dim_candidates_writes_one_list_per_mention_id(tmp_path, hashing_encoder, monkeypatch, capsys):
    from mel.cli import main
    args = _candidates_setup(tmp_path, hashing_encoder, monkeypatch, ["m0", "m1", "m2"])
    assert main(args + ["--size", "2"]) == 0
    lists = load_candidate_lists(tmp_path / "c.jsonl")
    assert sorted(lists) == ["m0", "m1", "m2"] and all(len(v) == 2 and "Q1" in v for v in lists.values())
    assert "wrote 3 candidate lists of 2" in capsys.readouterr().out


# -- 8. a checkpoint directory without weights says what to do ------------------------------------------------
def test_a_checkpoint_without_weights_says_how_to_make_one(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"has no model.safetensors; point at a checkpoint directory .*"
                                              r"python -m mel train dim \.\.\. --out DIR"):
        load_state(tmp_path)
    from mel.dim.linker import load_head
    with pytest.raises(CheckpointError, match="config.json is missing; .*python -m mel train dim"):
        load_head(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing; .*python -m mel train dim"):
        load_head(tmp_path / "empty")


def test_training_seeds_take_numpys_whole_range():
    """The default upper bound of require_whole (2**31 - 1) refused seeds numpy and torch take."""
    from mel.training.common import TrainConfig
    assert TrainConfig(seed=2**32 - 1).seed == 2**32 - 1
    with pytest.raises(InputError, match="seed is too large"):
        TrainConfig(seed=2**32)
