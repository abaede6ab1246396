"""Issue 18, bad input: every case ends in ONE line that names the value (and its file, key or
step) and the way out, and the cheap checks run before the data or the model is loaded.

Two tables, one per surface:

- ``CLI_CASES``: ``peftadapt train | eval | config`` through :func:`peftadapt.cli.main`; stderr
  must be exactly one line (``peftadapt <command>: error: ...``), no traceback, the named
  values in it. ``before`` says what must not have been loaded yet when the error comes
  (the loaders are replaced by ones that fail the test).
- ``API_CASES``: the same inputs through the Python API (``load_run_config``, ``build_trainer``,
  ``load_text_data``, ``TrainConfig``, ``Trainer``): a ValueError / TypeError / OSError whose
  message is one line naming the value.

Cases that used to fail and now work (a CSV field over 131,072 characters, ``lr: 1e-3``
written as YAML reads it, ``eval --output`` into a missing folder, ``model.quantize`` on a
saved classifier, an explicit full fine-tuning) are tests of their own below the tables.
"""

from __future__ import annotations

import copy
import errno
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from peftadapt.cli import main
from peftadapt.train import runner
from peftadapt.train.schema import load_run_config

from ..conftest import make_tiny
from ..train.conftest import VOCAB, run_config, run_files, sentiment, tiny_model_dir, write_csv  # noqa: F401

# -- the inputs: small broken things on disk ------------------------------------------------


@pytest.fixture(scope="module")
def broken(tmp_path_factory, tiny_model_dir, run_files):  # noqa: F811  (fixtures imported above)
    """Broken model folders and data files next to a good tiny model and good data."""
    d = tmp_path_factory.mktemp("broken")
    bad_cfg = d / "bad_config"
    shutil.copytree(tiny_model_dir, bad_cfg)
    (bad_cfg / "config.json").write_text('{"model_type": "bert", ')
    cut = d / "truncated"
    shutil.copytree(tiny_model_dir, cut)
    weights = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (d / "a_file").write_text("not a folder")
    (d / "latin1.csv").write_bytes(b"text,label\ngood,positive\ncaf\xe9 awful,negative\n")
    (d / "latin1.jsonl").write_bytes(
        b'{"text": "good", "label": "positive"}\n{"text": "caf\xe9", "label": "negative"}\n'
    )
    return {"dir": d, "bad_config": bad_cfg, "truncated": cut, "file": d / "a_file", "model": tiny_model_dir}


@dataclass
class Case:
    """One bad input: ``edit`` changes a valid run config (a dict) in place; ``command`` is
    the CLI command (``eval`` adds ``--checkpoint``); ``named`` must all be in the one line;
    ``before``: "data" (nothing loaded yet), "model" (data read, no tokenizer or model), None."""

    id: str
    edit: Callable[[dict, dict], Any]
    named: list[str]
    before: str | None = "data"
    command: str = "train"
    extra: list[str] = field(default_factory=list)
    setup: Callable[[Any, dict], Any] | None = None  # (monkeypatch, broken) -> None
    rc: int = 2


def _model(key: str) -> Callable[[dict, dict], None]:
    return lambda c, b: c["model"].update(path=str(b[key]))


def _source(name: str) -> Callable[[dict, dict], None]:
    def edit(c, b):
        c["data"]["source"]["path"] = str(b["dir"] / name)

    return edit


def _read_only(monkeypatch, b) -> None:
    """A read-only filesystem as the probe write sees it (root writes anywhere on a normal one)."""

    def mkstemp(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", k.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def _causal_cdan(c, b) -> None:
    c["model"]["task"] = "causal_lm"
    c["data"].pop("labels")
    for spec in (c["data"]["source"], c["data"]["eval"]["target"]):
        spec.pop("label")
    c["regularizers"] = [{"name": "cdan", "weight": 0.1}]


def _disk_error(code: int, strerror: str) -> Callable[[Any, dict], None]:
    """The run fails mid-way writing a checkpoint file (what the checkpoint writer raises)."""

    def setup(monkeypatch, b) -> None:
        class Failing:
            accelerator, summary = None, {}

            def train(self, resume=False):
                raise OSError(code, strerror, "/runs/x/.tmp-checkpoint-4/optimizer.pt")

        monkeypatch.setattr("peftadapt.cli.build_trainer", lambda run: Failing())

    return setup


def _eval_disk_full(monkeypatch, b) -> None:
    """The metrics file's write fails for space at the flush to disk (that error carries no file name)."""

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("peftadapt.cli.evaluate_checkpoint", lambda run, ck: {"target/accuracy": 0.5})
    monkeypatch.setattr("peftadapt.core.io.os.fsync", fsync)


CLI_CASES = [
    # the model folder: checked before the data and the model (was a 72-78 line traceback)
    Case("model_path_missing", lambda c, b: c["model"].update(path="/no/such/model"), ["model.path", "/no/such/model"]),
    Case("config_json_corrupt", _model("bad_config"), ["model.path", "config.json", "not valid JSON"]),
    Case("safetensors_truncated", _model("truncated"), ["model.path", "model.safetensors", "truncated"]),
    Case(
        "hub_name_offline",
        lambda c, b: c["model"].update(path="no-such-org/no-such-model"),
        ["model.path", "'no-such-org/no-such-model'", "offline"],
    ),
    Case(
        "tokenizer_folder_missing",
        lambda c, b: c["model"].update(tokenizer="/no/such/tokenizer"),
        ["model.tokenizer", "/no/such/tokenizer"],
    ),
    # the output folder: checked before the data and the model (was found after both loaded)
    Case(
        "output_dir_is_a_file",
        lambda c, b: c["training"].update(output_dir=str(b["file"])),
        ["training.output_dir", "a_file", "is a file"],
    ),
    Case(
        "output_dir_inside_a_file",
        lambda c, b: c["training"].update(output_dir=str(b["file"] / "run")),
        ["training.output_dir", "a_file", "is a file"],
    ),
    Case(
        "output_dir_read_only",
        lambda c, b: None,
        ["training.output_dir", "Read-only file system", "writable"],
        setup=_read_only,
    ),
    # data files: read before the tokenizer and the model
    Case("csv_not_utf8", _source("latin1.csv"), ["latin1.csv", "line 3", "UTF-8"], before="model"),
    Case("jsonl_not_utf8", _source("latin1.jsonl"), ["latin1.jsonl", "line 2", "UTF-8"], before="model"),
    # values (the schema: before anything)
    Case("seed_not_a_number", lambda c, b: c["training"].update(seed="abc"), ["training.seed", "'abc'"]),
    Case(
        "learning_rate_not_a_number",
        lambda c, b: c["training"].update(learning_rate="fast"),
        ["training.learning_rate", "'fast'", "float"],
    ),
    Case("lr_old_name", lambda c, b: c["training"].update(lr=1e-3), ["training.lr", "did you mean learning_rate"]),
    Case("cdan_on_causal_lm", _causal_cdan, ["cdan", "model.task: classification", "features.class_tokens"]),
    Case(
        "duplicate_labels",
        lambda c, b: c["data"].update(labels=["negative", "negative", "positive"]),
        ["data.labels", "'negative'", "twice"],
    ),
    Case(
        "labels_do_not_fit_the_saved_head",
        lambda c, b: c["data"].update(labels=["negative", "positive", "neutral"]),
        ["model.path", "classifier.weight", "2 classes", "this run has 3"],
        before="model",
    ),
    Case(
        "full_finetune_quantized",
        lambda c, b: (c.update(method={"name": "full"}), c["model"].update(quantize=4)),
        ["method: full", "model.quantize"],
    ),
    Case("method_typo", lambda c, b: c.update(method={"name": "ful"}), ["method.name", "'ful'", "did you mean full"]),
    Case(
        "eval_output_in_a_file",
        lambda c, b: None,
        ["--output", "a_file"],
        command="eval",
        extra=["--output", "{file}/m.json"],
    ),
    Case(
        "eval_output_is_a_folder",
        lambda c, b: None,
        ["--output", "is a folder"],
        command="eval",
        extra=["--output", "{dir}"],
    ),
    Case(
        "config_model_path_missing",
        lambda c, b: c["model"].update(path="/no/such/model"),
        ["model.path"],
        command="eval",
    ),
    # the disk mid-run: one line naming the file and the way out, exit status 1
    Case(
        "eval_output_disk_full",
        lambda c, b: None,
        ["metrics.json", "no space left"],
        before=None,
        command="eval",
        extra=["--output", "{dir}/metrics.json"],
        setup=_eval_disk_full,
        rc=1,
    ),
    Case(
        "disk_full_mid_run",
        lambda c, b: None,
        ["optimizer.pt", "no space left", "--resume"],
        before=None,
        setup=_disk_error(errno.ENOSPC, "No space left on device"),
        rc=1,
    ),
    Case(
        "read_only_remount_mid_run",
        lambda c, b: None,
        ["optimizer.pt", "read-only", "--resume"],
        before=None,
        setup=_disk_error(errno.EROFS, "Read-only file system"),
        rc=1,
    ),
    Case(
        "permission_lost_mid_run",
        lambda c, b: None,
        ["optimizer.pt", "permission denied"],
        before=None,
        setup=_disk_error(errno.EACCES, "Permission denied"),
        rc=1,
    ),
]


def _forbid(monkeypatch, before: str | None) -> None:
    """Replace the loaders that must not run yet by ones that fail the test."""

    def loaded(what):
        def fail(*a, **k):
            raise AssertionError(f"{what} was loaded before the bad input was reported")

        return fail

    if before == "data":
        monkeypatch.setattr(runner, "load_data", loaded("the data"))
    if before in ("data", "model"):
        monkeypatch.setattr(runner, "load_tokenizer", loaded("the tokenizer"))
        monkeypatch.setattr(runner, "load_base_model", loaded("the model"))


def _config(tmp_path, broken, run_files) -> dict:  # noqa: F811
    cfg = run_config(broken["model"], run_files, tmp_path / "out")
    cfg["training"]["max_steps"] = 2
    return cfg


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.id)
def test_cli_bad_input_is_one_line(case, tmp_path, broken, run_files, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PEFTADAPT_DEBUG", raising=False)
    cfg = _config(tmp_path, broken, run_files)
    case.edit(cfg, broken)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if case.setup is not None:
        case.setup(monkeypatch, broken)
    _forbid(monkeypatch, case.before)
    argv = [case.command, str(path)]
    if case.command == "eval":
        argv += ["--checkpoint", str(tmp_path)]
    argv += [a.format(file=broken["file"], dir=broken["dir"]) for a in case.extra]
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == case.rc, err
    assert len(lines) == 1 and lines[0].startswith(f"peftadapt {case.command}: error: "), err
    assert "Traceback" not in err and ".tmp" not in err.replace(".tmp-checkpoint", "")
    for value in case.named:
        assert value in lines[0], (value, lines[0])


def test_cli_other_os_errors_still_show_their_traceback(tmp_path, broken, run_files, monkeypatch):  # noqa: F811
    """Only the disk's faults become one line: any other OSError is a bug, shown whole."""
    cfg = _config(tmp_path, broken, run_files)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))

    class Failing:
        def train(self, resume=False):
            raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr("peftadapt.cli.build_trainer", lambda run: Failing())
    with pytest.raises(OSError, match="Bad file descriptor"):
        main(["train", str(path)])


def test_yaml_syntax_error_is_one_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: {path: x\ndata: [\n")
    assert main(["config", str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "run.yaml: not valid YAML at line 2" in line


# -- the Python API ---------------------------------------------------------------------------


def _api_config(tmp_path, broken, run_files, edit) -> Any:  # noqa: F811
    cfg = _config(tmp_path, broken, run_files)
    edit(cfg, broken)
    return load_run_config(cfg)


def _build(edit, before: str = "data"):
    """build_trainer on an edited run config (the loaders that must not run yet forbidden)."""

    def go(tmp_path, broken, run_files, monkeypatch):  # noqa: F811
        run = _api_config(tmp_path, broken, run_files, edit)
        _forbid(monkeypatch, before)
        runner.build_trainer(run)

    return go


def _load_config(edit):
    return lambda tmp_path, broken, run_files, monkeypatch: _api_config(  # noqa: F811
        tmp_path, broken, run_files, edit
    )


def _read(name):
    def go(tmp_path, broken, run_files, monkeypatch):  # noqa: F811
        from peftadapt.train import load_text_data

        load_text_data(broken["dir"] / name, label="label", labels=["negative", "positive"])

    return go


def _train_config(**kw):
    def go(*args):
        from peftadapt.train import TrainConfig

        TrainConfig(**kw)

    return go


def _trainer(model: str = "wrapped", **kw):
    def go(tmp_path, broken, run_files, monkeypatch):  # noqa: F811
        from transformers import AutoTokenizer

        import peftadapt
        from peftadapt.train import TextData, Trainer

        tok = AutoTokenizer.from_pretrained(broken["model"])
        m = make_tiny("bert", "seqcls", vocab_size=VOCAB)
        if model == "wrapped":
            m = peftadapt.wrap(m, "lora", r=4)
        Trainer(m, tok, TextData(*sentiment(8, 0)), **{"output_dir": str(tmp_path / "out"), **kw})

    return go


API_CASES = [
    ("model_path_missing", _build(lambda c, b: c["model"].update(path="/no/such/model")), ["/no/such/model"]),
    ("config_json_corrupt", _build(_model("bad_config")), ["config.json", "not valid JSON"]),
    ("safetensors_truncated", _build(_model("truncated")), ["model.safetensors", "truncated"]),
    (
        "hub_name_offline",
        _build(lambda c, b: c["model"].update(path="no-such-org/no-such-model")),
        ["no-such-org/no-such-model", "offline"],
    ),
    (
        "output_dir_is_a_file",
        _build(lambda c, b: c["training"].update(output_dir=str(b["file"]))),
        ["training.output_dir", "is a file"],
    ),
    (
        "labels_do_not_fit_the_saved_head",
        _build(lambda c, b: c["data"].update(labels=["negative", "positive", "neutral"]), before="model"),
        ["classifier.weight", "this run has 3"],
    ),
    ("csv_not_utf8", _read("latin1.csv"), ["latin1.csv", "line 3"]),
    ("jsonl_not_utf8", _read("latin1.jsonl"), ["latin1.jsonl", "line 2"]),
    ("seed_not_a_number", _load_config(lambda c, b: c["training"].update(seed="abc")), ["training.seed", "'abc'"]),
    ("cdan_on_causal_lm", _load_config(_causal_cdan), ["cdan", "classification", "class_tokens"]),
    (
        "duplicate_labels",
        _load_config(lambda c, b: c["data"].update(labels=["negative", "negative", "positive"])),
        ["'negative'", "twice"],
    ),
    ("train_config_seed_string", _train_config(seed="abc"), ["training.seed", "'abc'"]),
    (
        "train_config_typo",
        _train_config(lerning_rate=1e-3),
        ["lerning_rate", "did you mean learning_rate", "valid keys"],
    ),
    ("trainer_typo", _trainer(lerning_rate=1e-3), ["lerning_rate", "did you mean learning_rate", "valid keys"]),
    ("trainer_unwrapped_model", _trainer("plain"), ["not wrapped", "peftadapt.wrap(model, 'full')"]),
    (
        "trainer_output_dir_is_a_file",
        lambda tmp_path, broken, run_files, monkeypatch: _trainer(output_dir=str(broken["file"]))(  # noqa: F811
            tmp_path, broken, run_files, monkeypatch
        ),
        ["output_dir", "is a file"],
    ),
]


@pytest.mark.parametrize(("call", "named"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input_is_one_line(call, named, tmp_path, broken, run_files, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises((ValueError, TypeError, OSError)) as info:
        call(tmp_path, broken, run_files, monkeypatch)
    message = str(info.value)
    assert "\n" not in message.strip(), message
    for value in named:
        assert value in message, (value, message)


def test_trainer_typo_is_a_type_error_too():
    """An unknown keyword is what Python calls a TypeError; it stays catchable as one."""
    from peftadapt.train import TrainConfig

    with pytest.raises(TypeError, match="did you mean learning_rate"):
        TrainConfig(lerning_rate=1e-3)


# -- inputs that used to fail and now work --------------------------------------------------------


def test_csv_field_over_the_csv_module_limit_is_read(tmp_path):
    """A 140,000-character review: Python's csv refuses fields over 131,072 characters by default."""
    from peftadapt.train import load_text_data

    long = "great " * 23_334
    write_csv(tmp_path / "long.csv", [long, "bad"], ["positive", "negative"])
    d = load_text_data(tmp_path / "long.csv", label="label", labels=["negative", "positive"])
    assert len(d.texts[0]) == len(long) > 131_072 and d.labels == [1, 0]


def test_numeric_strings_are_numbers(tmp_path, broken, run_files):  # noqa: F811
    """YAML 1.1 reads 1e-3 as a string; a float key takes it as the number it spells."""
    path = tmp_path / "run.yaml"
    cfg = _config(tmp_path, broken, run_files)
    path.write_text(yaml.safe_dump(cfg).replace("learning_rate: 0.02", "learning_rate: 1e-3"))
    assert "learning_rate: 1e-3" in path.read_text()
    assert load_run_config(path).training.learning_rate == 1e-3


def test_eval_output_into_a_missing_folder(tmp_path, broken, run_files, monkeypatch, capsys):  # noqa: F811
    """The folder is created; the hidden temp file's name never shows."""
    cfg = _config(tmp_path, broken, run_files)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr("peftadapt.cli.evaluate_checkpoint", lambda run, ck: {"target/accuracy": 0.5})
    out = tmp_path / "new" / "folder" / "m.json"
    assert main(["eval", str(path), "--checkpoint", str(tmp_path), "--output", str(out)]) == 0
    assert json.loads(out.read_text()) == {"target/accuracy": 0.5}


def test_cli_train_quantized_saved_classifier(tmp_path, broken, run_files, capsys):  # noqa: F811
    """model.quantize: 4 on a saved BERT classifier trained (it failed inside peft: the head was quantized)."""
    pytest.importorskip("bitsandbytes")
    cfg = _config(tmp_path, broken, run_files)
    cfg["model"]["quantize"] = 4
    cfg["regularizers"], cfg["training"]["max_steps"] = [], 1
    cfg["data"].pop("target")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "final" / "adapter" / "adapter_config.json").is_file()


def test_full_finetuning_is_explicit_and_saves_a_transformers_model(tmp_path, broken, run_files, capsys):  # noqa: F811
    """method: full trains every weight and writes a normal save_pretrained folder that eval reads."""
    from transformers import AutoModelForSequenceClassification

    cfg = _config(tmp_path, broken, run_files)
    cfg["method"] = {"name": "full"}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0, capsys.readouterr().err
    final = json.loads(capsys.readouterr().out)["final_metrics"]
    saved = tmp_path / "out" / "final" / "adapter"
    assert (saved / "config.json").is_file() and (saved / "model.safetensors").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(saved)  # a plain transformers model
    before = make_tiny("bert", "seqcls", vocab_size=VOCAB)
    moved = [n for n, p in model.named_parameters() if not p.equal(dict(before.named_parameters())[n])]
    assert any("encoder" in n for n in moved) and any("classifier" in n for n in moved)  # every weight trained
    assert main(["eval", str(path), "--checkpoint", str(tmp_path / "out" / "final")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["target/accuracy"] == final["target/accuracy"]


def test_python_full_finetuning_and_refusals(tmp_path):
    import peftadapt

    model = peftadapt.wrap(make_tiny("bert", "seqcls", vocab_size=VOCAB), "full")
    assert all(p.requires_grad for p in model.parameters()) and peftadapt.is_wrapped(model)
    with pytest.raises(ValueError, match=r"already wrapped.*full fine-tuning"):
        peftadapt.wrap(model, "lora")
    peftadapt.save(model, tmp_path / "m")
    back = peftadapt.load(make_tiny("bert", "seqcls", vocab_size=VOCAB, seed=1), tmp_path / "m")
    state = model.state_dict()
    assert all(v.equal(state[k]) for k, v in back.state_dict().items())
    assert not any(p.requires_grad for p in back.parameters())
    with pytest.raises(ValueError, match="no adapter to switch off"), peftadapt.disabled(model):
        pass
    assert copy.deepcopy(model) is not model
