"""Reading data through `datasets`: every file type, save_to_disk folders, splits, the Hub
(offline: a clear error), bad files, and the tokenization cache a rerun reuses."""

from __future__ import annotations

import json
import time

import pytest

from peftadapt.train import load_text_data
from peftadapt.train.data import load_dataset_spec
from peftadapt.train.sft import SFTEncoder, encode_sft

from .conftest import write_csv, write_jsonl
from .sft_helpers import chat_tokenizer, chats

datasets = pytest.importorskip("datasets")
TEXTS, LABELS = ["a b", "c, d", "e f"], [0, 1, 1]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test converts its files into its own datasets cache (no state shared between tests)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def test_every_file_type_reads_the_same_rows(tmp_path):
    rows = [{"text": t, "label": y} for t, y in zip(TEXTS, LABELS, strict=True)]
    write_csv(tmp_path / "d.csv", TEXTS, LABELS)
    write_csv(tmp_path / "d.tsv", TEXTS, LABELS, sep="\t")
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")  # a JSON array
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.csv", "d.tsv", "d.jsonl", "d.json", "d.parquet"):
        d = load_text_data(tmp_path / name, text="text", label="label")
        assert (d.texts, d.labels) == (TEXTS, LABELS), name
    (tmp_path / "d.txt").write_text("text,label\nx,1\n", encoding="utf-8")
    assert load_text_data(tmp_path / "d.txt", label="label", format="csv").texts == ["x"]  # an odd suffix


def test_save_to_disk_folders_and_splits(tmp_path):
    ds = datasets.Dataset.from_dict({"text": TEXTS, "label": LABELS})
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_text_data(tmp_path / "dd", split="test").texts == ["a b"]
    with pytest.raises(ValueError, match=r"holds splits \['train', 'test'\]; choose one with `split:`"):
        load_text_data(tmp_path / "dd")
    with pytest.raises(ValueError, match="has no split 'dev'"):
        load_text_data(tmp_path / "dd", split="dev")
    write_csv(tmp_path / "d.csv", TEXTS, LABELS)
    assert load_text_data(tmp_path / "d.csv", split="train[1:]").texts == TEXTS[1:]  # datasets' split slices
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not one written by datasets' save_to_disk"):
        load_text_data(tmp_path / "plain")


def test_hub_names_offline_give_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"could not reach the Hub for dataset 'someone/chats'.*local file or folder"):
        load_dataset_spec("someone/chats", name="data.source")
    with pytest.raises(FileNotFoundError, match="data file not found"):  # a path, not a Hub name
        load_dataset_spec(tmp_path / "missing.jsonl")


def test_bad_files_name_file_and_line(tmp_path):
    (tmp_path / "latin1.csv").write_bytes("text,label\nok,1\ncaf\xe9,0\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.csv: line 3 is not UTF-8 text"):
        load_text_data(tmp_path / "latin1.csv", label="label")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2 is not valid JSON"):
        load_text_data(tmp_path / "bad.jsonl")
    long = "word " * 40_000  # 200k characters: over the csv module's default field limit
    write_csv(tmp_path / "long.csv", [long, "short"], [0, 1])
    assert load_text_data(tmp_path / "long.csv", label="label").texts == [long, "short"]


def test_filters_and_tokenization_are_cached_for_a_rerun(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "chat.jsonl", [dict(r, keep=i % 3 != 0) for i, r in enumerate(chats(300))])
    tok = chat_tokenizer()

    def load():
        t0 = time.perf_counter()
        ds = load_dataset_spec(tmp_path / "chat.jsonl", where={"keep": True})
        enc = encode_sft(ds, tok, max_length=64)
        return enc, time.perf_counter() - t0

    first, t_first = load()
    assert len(first) == 200
    calls = []
    monkeypatch.setattr(SFTEncoder, "__call__", lambda self, row: calls.append(row) or {})
    second, t_second = load()
    assert calls == []  # the tokenized rows came from the cache, the encoder never ran
    assert (second.input_ids, second.labels) == (first.input_ids, first.labels)
    assert list((tmp_path / "hf_cache").rglob("cache-*.arrow"))  # filter + map results on disk
    print(f"first load + tokenize {t_first:.2f} s, cached rerun {t_second:.2f} s")
    monkeypatch.undo()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    ds = load_dataset_spec(tmp_path / "chat.jsonl", where={"keep": True})
    other = encode_sft(ds, tok, max_length=16, train_on_inputs=True)
    assert max(len(x) for x in other.input_ids) == 16  # another option: tokenized anew, not the cached rows
