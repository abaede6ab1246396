"""The typed run-file schema: did-you-mean errors, renamed keys, types, overrides, the schema dump."""

import copy

import pytest

from peftadapt.align import SCHEDULES
from peftadapt.features import POOLINGS
from peftadapt.train import RunConfig, TrainConfig, load_run_config
from peftadapt.train.config import RENAMED
from peftadapt.train.data import FORMATS
from peftadapt.train.schema import schema

BASE = {"model": {"path": "m"}, "data": {"source": {"path": "s.csv", "label": "y"}, "target": "t.csv"}}


def cfg(**sections):
    c = copy.deepcopy(BASE)
    c.update(sections)
    return c


def error(raw, **kw) -> str:
    with pytest.raises(ValueError) as e:
        load_run_config(raw, **kw)
    return str(e.value)


@pytest.mark.parametrize(
    "raw, key, suggestion",
    [
        (cfg(training={"learnig_rate": 1.0}), "training.learnig_rate", "learning_rate"),
        (cfg(data={"source": {"path": "s", "lable": "y"}}), "data.source.lable", "label"),
        (cfg(data={"source": {"path": "s", "label": "y"}, "max_lenght": 9}), "data.max_lenght", "max_length"),
        (cfg(model={"path": "m", "taks": "causal_lm"}), "model.taks", "task"),
        (cfg(features={"poling": "cls"}), "features.poling", "pooling"),
        (cfg(method={"name": "lora", "alpah": 8}), "method.alpah", "alpha"),
        (cfg(regularizers=[{"name": "mmd", "bandwith": 1.0}]), "regularizers[0].bandwith", "bandwidth"),
        (cfg(regularizers=[{"name": "mmd", "wieght": 1.0}]), "regularizers[0].wieght", "weight"),
    ],
)
def test_unknown_key_names_section_and_closest_valid_name(raw, key, suggestion):
    msg = error(raw)
    assert f"unknown key {key}; did you mean {suggestion}?" in msg, msg
    assert "valid keys in" in msg


@pytest.mark.parametrize("old, new", sorted(RENAMED.items()))
def test_every_renamed_training_key_names_its_new_name(old, new):
    msg = error(cfg(training={old: 1}))
    assert f"unknown key training.{old}; did you mean {new}? (renamed;" in msg, msg
    assert new in list(TrainConfig.help())


def test_renamed_keys_are_refused_by_the_python_trainer_too(minilm_tokenizer):
    from peftadapt.train import Trainer

    from .conftest import text_data, tiny_classifier

    with pytest.raises(ValueError, match=r"unknown key training.lr; did you mean learning_rate"):
        Trainer(tiny_classifier(), minilm_tokenizer, text_data(4, 0), lr=0.1)
    assert TrainConfig.from_dict({"learning_rate": 0.1}).replace(save_steps=3).save_steps == 3


def test_registry_names_get_a_suggestion():
    assert "unknown regularizer 'mdd'; did you mean mmd?" in error(cfg(regularizers=["mdd"]))
    assert "unknown method 'lroa'; did you mean lora?" in error(cfg(method="lroa"))
    assert "r must be a positive integer" in error(cfg(method={"name": "lora", "r": 0}))


def test_values_are_checked_against_their_annotation():
    msg = error(cfg(training={"learning_rate": "fast"}))
    assert msg == "training.learning_rate: expected float, got 'fast'"
    msg = error(cfg(features={"pooling": "max"}))
    assert msg == f"features.pooling: 'max' is not allowed; allowed values: {list(POOLINGS)}"
    assert "data.labels[0]: expected str | int, got True" in error(cfg(data={**BASE["data"], "labels": [True, False]}))
    assert "training.disable_tqdm: expected bool, got 'no'" in error(cfg(training={"disable_tqdm": "no"}))
    assert "training.optim" in error(cfg(training={"optim": "adamw"}))
    # YAML 1.1 reads 1e-3 as a string; a float field takes it as the number it spells
    run = load_run_config(cfg(training={"learning_rate": "1e-3", "num_train_epochs": 3}))
    assert run.training.learning_rate == 1e-3 and run.training.num_train_epochs == 3.0
    assert isinstance(run.training.num_train_epochs, float)


def test_overrides_output_dir_and_round_trip(tmp_path):
    raw = cfg(
        regularizers=[{"name": "dann", "weight": 0.1, "scope": "global", "hidden_size": 16}],
        method={"name": "lora", "r": 4},
    )
    run = load_run_config(
        raw,
        overrides=["training.learning_rate=1e-2", "regularizers.0.weight=0.5", "method.r=8", "features.pooling=cls"],
        output_dir=str(tmp_path),
    )
    assert run.training.learning_rate == 1e-2 and run.training.output_dir == str(tmp_path)
    term = run.regularizers[0]
    assert (term.name, term.weight, term.scope, term.options) == ("dann", 0.5, "global", {"hidden_size": 16})
    assert run.method.options == {"r": 8} and run.features.pooling == "cls"
    assert raw["regularizers"][0]["weight"] == 0.1  # the caller's mapping is not changed
    assert load_run_config(raw, overrides={"training.save_steps": 5}).training.save_steps == 5
    again = load_run_config(run.to_dict())
    assert isinstance(again, RunConfig) and again == run
    with pytest.raises(ValueError, match=r"expected SECTION.KEY=VALUE"):
        load_run_config(raw, overrides=["learning_rate"])


def test_term_scope_reaches_the_alignment():
    from peftadapt.train.runner import build_alignment

    run = load_run_config(cfg(regularizers=[{"name": "mmd", "scope": "local"}, "coral", "coral"]))
    align = build_alignment(run.regularizers, width=8, num_labels=2)
    assert [(t.name, t.scope) for t in align.terms] == [("mmd", "local"), ("coral_1", "auto"), ("coral_2", "auto")]


def test_schema_lists_every_key_with_type_default_help_and_shared_choices():
    s = schema()
    assert list(s) == ["model", "data", "method", "regularizers", "features", "training"]
    training = {r["key"]: r for r in s["training"]}
    assert list(training) == list(TrainConfig.help())
    assert training["learning_rate"]["default"] == 5e-4 and training["learning_rate"]["type"] == "float"
    assert training["optim"]["choices"] == ["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]
    assert {r["key"]: r for r in s["model"]}["path"]["default"] == "required"
    assert {r["key"]: r for r in s["features"]}["pooling"]["choices"] == list(POOLINGS)
    assert {r["key"]: r for r in s["regularizers"]}["schedule"]["choices"] == list(SCHEDULES)
    assert {r["key"]: r for r in s["data"]}["<spec>.format"]["choices"] == list(FORMATS)
    assert all(r["help"] for rows in s.values() for r in rows)
