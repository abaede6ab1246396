import pytest
import torch

from peftadapt.train import TextData, Trainer, load_text_data
from peftadapt.train.data import BatchStream, collate, encode_labels, epoch_order

from .conftest import text_data, tiny_classifier, write_csv, write_jsonl


def test_csv_tsv_jsonl_read_the_same_rows(tmp_path):
    texts, labels = ["a b", "c, d", "e\tf"], [0, 1, 1]
    write_csv(tmp_path / "d.csv", texts, labels)
    write_csv(tmp_path / "d.tsv", ["a b", "c, d", "e f"], labels, sep="\t")
    write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)])
    for name in ("d.csv", "d.jsonl"):
        d = load_text_data(tmp_path / name, text="text", label="label")
        assert d.texts == texts and d.labels == labels
    d = load_text_data(tmp_path / "d.tsv", text="text", label="label")
    assert d.texts == ["a b", "c, d", "e f"] and d.labels == labels


def test_missing_file_and_column_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.csv"):
        load_text_data(tmp_path / "nope.csv")
    write_csv(tmp_path / "d.csv", ["x"], [0])
    with pytest.raises(ValueError, match=r"text column 'review' not found.*\['text', 'label'\]"):
        load_text_data(tmp_path / "d.csv", text="review", label="label")
    with pytest.raises(ValueError, match=r"label column 'rating'"):
        load_text_data(tmp_path / "d.csv", text="text", label="rating")
    with pytest.raises(ValueError, match="give `format:`"):
        (tmp_path / "d.txt").write_text("x")
        load_text_data(tmp_path / "d.txt")


def test_empty_dataset_error(tmp_path):
    write_csv(tmp_path / "e.csv", [], [])
    with pytest.raises(ValueError, match="empty"):
        load_text_data(tmp_path / "e.csv", label="label")
    write_csv(tmp_path / "f.csv", ["x", "y"], ["pos", "neg"])
    with pytest.raises(ValueError, match="empty"):  # everything filtered out
        load_text_data(tmp_path / "f.csv", label="label", labels=["neg", "pos"], where={"label": "neutral"})


def test_string_labels_map_through_the_label_list_and_filters(tmp_path):
    write_csv(tmp_path / "d.csv", ["a", "b", "c", "d"], ["positive", "negative", "neutral", "positive"])
    with pytest.raises(ValueError, match=r"not an integer.*data.labels"):
        load_text_data(tmp_path / "d.csv", label="label")
    with pytest.raises(ValueError, match=r"'neutral'.*not in the label list"):
        load_text_data(tmp_path / "d.csv", label="label", labels=["negative", "positive"])
    d = load_text_data(
        tmp_path / "d.csv", label="label", labels=["negative", "positive"], where_not={"label": "neutral"}
    )
    assert d.texts == ["a", "b", "d"] and d.labels == [1, 0, 1]


def test_labels_out_of_range():
    with pytest.raises(ValueError, match=r"label 3 at row 1 is outside 0..1"):
        encode_labels([0, 3, 1], num_labels=2)
    with pytest.raises(ValueError, match="outside"):
        encode_labels(["0", "-1"], num_labels=2)
    assert encode_labels(["1", 0, 1.0], num_labels=2) == [1, 0, 1]


def test_trainer_rejects_bad_labels_and_empty_data(tok):
    model = tiny_classifier()
    with pytest.raises(ValueError, match=r"label 2 .* outside 0..1"):
        Trainer(model, tok, TextData(["a", "b"], [0, 2]), disable_tqdm=True)
    with pytest.raises(ValueError, match="empty"):
        Trainer(model, tok, TextData([], []), disable_tqdm=True)
    with pytest.raises(ValueError, match="labels are needed"):
        Trainer(model, tok, ["a", "b"], disable_tqdm=True)


def test_hf_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"sentence": ["x y", "z"], "y": [1, 0]}).save_to_disk(str(tmp_path / "ds"))
    d = load_text_data(tmp_path / "ds", text="sentence", label="y")
    assert d.texts == ["x y", "z"] and d.labels == [1, 0]


def test_tokenizer_without_pad_token_says_how_to_fix(tok):
    import copy

    t = copy.deepcopy(tok)
    t.pad_token = None
    with pytest.raises(ValueError, match=r"pad_token = tokenizer.eos_token.*model.pad_token: eos"):
        Trainer(tiny_classifier(), t, text_data(4, 0), disable_tqdm=True)


def test_target_labels_warn_and_target_without_regularizers_warns(tok):
    model = tiny_classifier()
    with pytest.warns(UserWarning, match="ignores them"):
        Trainer(model, tok, text_data(4, 0), target=text_data(4, 1), regularizers=["mmd"], disable_tqdm=True)
    with pytest.warns(UserWarning, match="not used"):
        Trainer(model, tok, text_data(4, 0), target=text_data(4, 1, labeled=False), disable_tqdm=True)
    with pytest.raises(ValueError, match="need target data"):
        Trainer(model, tok, text_data(4, 0), regularizers=["coral"], disable_tqdm=True)


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a = epoch_order(50, seed=3, epoch=0)
    assert sorted(a) == list(range(50))
    assert a == epoch_order(50, seed=3, epoch=0)
    assert a != epoch_order(50, seed=3, epoch=1)
    assert a != epoch_order(50, seed=4, epoch=0)


def test_batch_stream_random_access_covers_each_epoch_once():
    ids = [[i + 1] for i in range(10)]  # example i holds token i+1
    s = BatchStream(ids, list(range(10)), batch_size=4, seed=0, pad_id=0, task="classification")
    assert s.batches_per_epoch == 3  # 4 + 4 + 2: the short last batch is kept
    seen = torch.cat([s.batch(m)["labels"] for m in range(3)]).tolist()
    assert sorted(seen) == list(range(10))
    # random access: batch 4 read cold equals batch 4 read after the others
    fresh = BatchStream(ids, list(range(10)), batch_size=4, seed=0, pad_id=0, task="classification")
    assert torch.equal(fresh.batch(4)["input_ids"], s.batch(4)["input_ids"])
    # two processes split every global batch between them, without overlap
    r0 = BatchStream(ids, list(range(10)), batch_size=2, seed=0, pad_id=0, task="classification", rank=0, world=2)
    r1 = BatchStream(ids, list(range(10)), batch_size=2, seed=0, pad_id=0, task="classification", rank=1, world=2)
    both = sorted(r0.batch(0)["labels"].tolist() + r1.batch(0)["labels"].tolist())
    assert both == sorted(s.batch(0)["labels"].tolist())


def test_collate_pads_right_and_masks_lm_labels():
    b = collate([[5, 6, 7], [8]], pad_id=0, task="causal_lm")
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    b = collate([[5], [6, 7]], pad_id=0, labels=[1, 0])
    assert b["labels"].tolist() == [1, 0]
