"""Several source domains from a run file: a list of named datasets or a domain column; MLDG through the CLI."""

import json

import pytest
import yaml

from peftadapt.cli import main
from peftadapt.train.runner import build_trainer, load_data, source_domain_specs
from peftadapt.train.schema import load_run_config

from .conftest import run_config, sentiment, write_csv

NAMES = ["negative", "positive"]


@pytest.fixture(scope="module")
def domain_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("domains")
    rows = []
    for i, dom in enumerate(["books", "dvd", "kitchen"]):
        t, y = sentiment(16, 10 + i)
        write_csv(d / f"{dom}.csv", t, [NAMES[v] for v in y])
        rows += [(text, NAMES[v], dom) for text, v in zip(t, y, strict=True)]
    with open(d / "all.csv", "w", encoding="utf-8") as f:
        f.write("text,label,domain\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    return d


def _run(tmp_path, tiny_model_dir, run_files, source, **training):
    out = tmp_path / "out"
    cfg = run_config(tiny_model_dir, run_files, out, max_steps=4, per_device_train_batch_size=4, **training)
    cfg["data"]["source"] = source
    return cfg


def _listed(d):
    return [{"name": n, "path": str(d / f"{n}.csv"), "label": "label"} for n in ("books", "dvd", "kitchen")]


def test_mldg_with_mmd_end_to_end_through_the_cli(tmp_path, tiny_model_dir, run_files, domain_files):
    cfg = _run(
        tmp_path,
        tiny_model_dir,
        run_files,
        _listed(domain_files),
        procedure="mldg",
        meta_learning_rate=0.02,
        align_sources="per_source",
    )
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["split"] == "train"]
    assert len(train) == 4 and all("meta_test_loss" in r for r in train)
    assert any("reg/mmd/books" in r or "reg/mmd/dvd" in r for r in train)  # mmd on from step 1 (start 0.25)
    assert (tmp_path / "out" / "final").is_dir()


def test_a_domain_column_splits_one_dataset(tmp_path, tiny_model_dir, run_files, domain_files):
    cfg = _run(tmp_path, tiny_model_dir, run_files, {"path": str(domain_files / "all.csv"), "label": "label"})
    cfg["data"]["domain_column"] = "domain"
    run = load_run_config(cfg)
    specs = source_domain_specs(run)
    assert list(specs) == ["books", "dvd", "kitchen"]
    source, _, _ = load_data(run, 2)
    listed = _run(tmp_path, tiny_model_dir, run_files, _listed(domain_files))
    by_file, _, _ = load_data(load_run_config(listed), 2)
    assert {k: (v.texts, v.labels) for k, v in source.items()} == {k: (v.texts, v.labels) for k, v in by_file.items()}


def test_one_source_in_a_list_is_one_source(tmp_path, tiny_model_dir, run_files):
    one = [{"path": str(run_files / "source.csv"), "label": "label"}]
    run = load_run_config(_run(tmp_path, tiny_model_dir, run_files, one))
    assert source_domain_specs(run) == {}
    assert len(load_data(run, 2)[0]) == 48


def test_clear_errors(tmp_path, tiny_model_dir, run_files, domain_files):
    def fails(source, match, domain_column=None, load=False, **training):
        cfg = _run(tmp_path, tiny_model_dir, run_files, source, **training)
        if domain_column:
            cfg["data"]["domain_column"] = domain_column
        with pytest.raises(ValueError, match=match):
            run = load_run_config(cfg)
            if load:
                build_trainer(run)

    unnamed = [{"path": str(domain_files / "books.csv"), "label": "label"}] * 2
    fails(unnamed, r"data.source\[0\].name: several source domains need a name each")
    fails([*_listed(domain_files), _listed(domain_files)[0]], r"domain name\(s\) \['books'\] given twice")
    fails({"paht": "x.csv"}, "unknown key data.source.paht; did you mean path")
    fails({"path": str(run_files / "source.csv"), "label": "label"}, "procedure: mldg meta-learns", procedure="mldg")
    no_label = [_listed(domain_files)[0], {"name": "x", "path": str(domain_files / "all.csv")}]
    fails(no_label, r"data.source\[1\].label is required")
    fails({"path": str(domain_files / "all.csv"), "label": "label"}, "column 'site' not in", "site", load=True)
    # a domain missing a class: named with both domains and the label names
    write_csv(tmp_path / "neg.csv", ["bad awful", "poor nasty"], ["negative", "negative"])
    odd = [*_listed(domain_files)[:2], {"name": "grim", "path": str(tmp_path / "neg.csv"), "label": "label"}]
    fails(odd, r"'books' and 'grim' have different label sets: 'books' has \['negative', 'positive'\]", load=True)
    empty = [*_listed(domain_files)[:2], {**_listed(domain_files)[2], "where": {"label": "neutral"}}]
    fails(empty, r"data.source\[2\]: the dataset .* is empty", load=True)
