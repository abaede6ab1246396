"""AdaptedModel: forwarding, named adapters, disable, unwrap, counts, save/load and its errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftadapt
from peftadapt import AdaptedModel, Adapter, Head
from peftadapt.methods.native_format import CONFIG_NAME, WEIGHTS_NAME
from tests.conftest import make_tiny, token_batch


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _perturb(model, adapter="default", seed=1, std=0.5):
    """Random nonzero values for one adapter's up-projection and head copy."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if (f".adapters.{adapter}.up." in n) or (f".heads.{adapter}." in n):
                p.add_(torch.randn(p.shape, generator=g) * std)


def _trained_tiny(kind="bert", head="seqcls", **options):
    wrapped = Adapter(**options).apply(make_tiny(kind, head))
    _perturb(wrapped)
    return wrapped


# -- forwarding ---------------------------------------------------------------------------


def test_forwarding_config_attributes_and_base_model():
    model = make_tiny("llama", "causal")
    wrapped = Adapter().apply(model)
    assert wrapped.model is model and wrapped.get_base_model() is model
    assert wrapped.config is model.config
    assert wrapped.device == model.device and wrapped.dtype == torch.float32  # forwarded properties
    assert wrapped.get_input_embeddings() is model.get_input_embeddings()
    assert wrapped.method == "adapter" and wrapped.active_adapter == "default"
    with pytest.raises(AttributeError):
        _ = wrapped.no_such_attribute
    # the injected slot still exposes the wrapped Linear's attributes
    o_proj = model.model.layers[0].self_attn.o_proj
    assert o_proj.weight is o_proj.base_layer.weight and o_proj.in_features == 32
    if hasattr(peftadapt, "base_model"):
        assert peftadapt.base_model(wrapped) is model


def test_deepcopy_and_pickle_keep_adapters():
    import copy
    import pickle

    batch = token_batch()
    wrapped = _trained_tiny("bert", "seqcls")
    expected = _logits(wrapped, batch)
    for clone in (copy.deepcopy(wrapped), pickle.loads(pickle.dumps(wrapped))):
        assert clone.active_adapter == "default" and torch.equal(_logits(clone, batch), expected)
        assert clone.get_nb_trainable_parameters() == wrapped.get_nb_trainable_parameters()


def test_print_trainable_parameters_wording(capsys):
    wrapped = Adapter().apply(make_tiny("bert", "seqcls"))
    t, n = wrapped.get_nb_trainable_parameters()
    assert t == 4 * (2 * 32 * 2 + 2 + 32) + 66
    assert n == sum(p.numel() for p in wrapped.parameters())
    wrapped.print_trainable_parameters()
    assert (
        capsys.readouterr().out.strip()
        == f"trainable params: {t:,d} || all params: {n:,d} || trainable%: {100 * t / n:.4f}"
    )


# -- named adapters, disable, unwrap ------------------------------------------------------


def test_named_adapters_switch_outputs_and_trainable_set():
    model = make_tiny("bert", "seqcls")
    batch = token_batch()
    ref = _logits(model, batch)
    wrapped = Adapter().apply(model, "a")
    wrapped.add_adapter("b", "pfeiffer", reduction_factor=8)
    assert wrapped.active_adapter == "a"  # adding does not switch
    _perturb(wrapped, "a", seed=1)
    _perturb(wrapped, "b", seed=2)
    out_a = _logits(wrapped, batch)
    train_a = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert train_a and all(".a." in n for n in train_a)
    wrapped.set_adapter("b")
    out_b = _logits(wrapped, batch)
    train_b = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert train_b and all(".b." in n for n in train_b)
    assert wrapped.get_nb_trainable_parameters()[0] == 2 * (2 * 32 * 4 + 4 + 32) + 66
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, ref) and not torch.allclose(out_b, ref)
    wrapped.set_adapter("a")
    assert torch.equal(_logits(wrapped, batch), out_a)
    with pytest.raises(ValueError, match=r"unknown adapter 'c'; existing adapters: \['a', 'b'\]"):
        wrapped.set_adapter("c")
    with pytest.raises(ValueError, match="already exists"):
        wrapped.add_adapter("b", Adapter())
    with pytest.raises(ValueError, match="may not contain"):
        wrapped.add_adapter("x.y", Adapter())

    wrapped.delete_adapter("a")
    assert wrapped.adapter_names == ["b"] and wrapped.active_adapter == "b"
    assert torch.equal(_logits(wrapped, batch), out_b)
    # the attention points held only "a": their original Linear is back
    assert type(model.bert.encoder.layer[0].attention.output.dense) is torch.nn.Linear


def test_disable_adapter_gives_base_outputs_and_restores():
    model = make_tiny("gpt2", "seqcls")
    batch = token_batch()
    ref = _logits(model, batch)
    wrapped = Adapter().apply(model)
    _perturb(wrapped)
    adapted = _logits(wrapped, batch)
    assert not torch.allclose(adapted, ref)
    with wrapped.disable_adapter():
        assert torch.equal(_logits(wrapped, batch), ref)
    assert torch.equal(_logits(wrapped, batch), adapted)
    with pytest.raises(RuntimeError), wrapped.disable_adapter():
        raise RuntimeError("boom")
    assert torch.equal(_logits(wrapped, batch), adapted)  # restored after an exception too
    if hasattr(peftadapt, "disabled"):
        with peftadapt.disabled(wrapped):
            assert torch.equal(_logits(wrapped, batch), ref)


def test_unwrap_restores_original_modules_and_flags():
    model = make_tiny("llama", "seqcls")
    model.model.embed_tokens.weight.requires_grad_(False)
    batch = token_batch()
    ref = _logits(model, batch)
    before = {n: type(m) for n, m in model.named_modules()}
    wrapped = Adapter().apply(model)
    _perturb(wrapped)
    plain = wrapped.unwrap()
    assert plain is model and {n: type(m) for n, m in plain.named_modules()} == before
    assert torch.equal(_logits(plain, batch), ref)
    assert not plain.model.embed_tokens.weight.requires_grad and plain.score.weight.requires_grad
    Adapter().apply(plain)  # can be wrapped again


# -- save / load ------------------------------------------------------------------------


def test_save_load_round_trip_minilm(tmp_path, minilm_classifier, minilm_tokenizer):
    batch = minilm_tokenizer(["first example sentence", "and a second one"], padding=True, return_tensors="pt")
    wrapped = Adapter(style="pfeiffer", reduction_factor=32).apply(minilm_classifier())
    _perturb(wrapped, std=0.05)
    expected = _logits(wrapped, batch)
    wrapped.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left

    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["format"] == "peftadapt" and meta["format_version"] == 1 and meta["active_adapter"] == "default"
    assert meta["adapters"]["default"]["method"] == "adapter"
    assert meta["adapters"]["default"]["options"]["style"] == "pfeiffer"
    assert meta["adapters"]["default"]["head_modules"] == ["classifier"]
    assert meta["base_model"]["model_type"] == "bert" and meta["base_model"]["hidden_size"] == 384
    assert meta["base_model"]["num_labels"] == 2 and meta["base_model"]["head_modules"] == ["classifier"]
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert all(k.startswith("default.") for k in tensors)
    # only adapter + head weights: 6 points x 4 tensors + head weight/bias
    assert len(tensors) == 6 * 4 + 2
    assert sum(t.numel() for t in tensors.values()) == 6 * (2 * 384 * 12 + 12 + 384) + 770

    fresh = minilm_classifier(seed=123)  # a different random classifier init: the saved head must win
    loaded = AdaptedModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(_logits(loaded, batch), expected)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # is_trainable=False
    assert not loaded.training


def test_save_load_several_adapters_causal_and_trainable(tmp_path):
    batch = token_batch()
    wrapped = _trained_tiny("qwen2", "causal")
    wrapped.add_adapter("probe", Adapter(placement="attention", bottleneck_size=3))
    _perturb(wrapped, "probe", seed=5)
    wrapped.set_adapter("probe")
    out_probe = _logits(wrapped, batch)
    wrapped.set_adapter("default")
    out_default = _logits(wrapped, batch)
    wrapped.save_pretrained(tmp_path)

    loaded = AdaptedModel.from_pretrained(make_tiny("qwen2", "causal"), tmp_path, is_trainable=True)
    assert loaded.adapter_names == ["default", "probe"] and loaded.active_adapter == "default"
    assert torch.equal(_logits(loaded, batch), out_default)
    assert loaded.get_nb_trainable_parameters()[0] == 4 * (2 * 32 * 2 + 2 + 32)
    loaded.set_adapter("probe")
    assert torch.equal(_logits(loaded, batch), out_probe)

    # one named adapter of several, under its own name; one adapter renamed
    only = AdaptedModel.from_pretrained(make_tiny("qwen2", "causal"), tmp_path, adapter_name="probe")
    assert only.adapter_names == ["probe"] and torch.equal(_logits(only, batch), out_probe)
    single = tmp_path / "single"
    wrapped.save_pretrained(single, adapter_names=["probe"])
    renamed = AdaptedModel.from_pretrained(make_tiny("qwen2", "causal"), single, adapter_name="x")
    assert renamed.adapter_names == ["x"] and torch.equal(_logits(renamed, batch), out_probe)
    # into an already wrapped model: added, active adapter unchanged
    other = Adapter().apply(make_tiny("qwen2", "causal"), "mine")
    other.load_adapter(single, adapter_name="probe")
    assert other.active_adapter == "mine" and other.adapter_names == ["mine", "probe"]
    other.set_adapter("probe")
    assert torch.equal(_logits(other, batch), out_probe)


def test_head_only_round_trip(tmp_path):
    batch = token_batch()
    wrapped = Head().apply(make_tiny("llama", "seqcls"))
    _perturb(wrapped)
    expected = _logits(wrapped, batch)
    wrapped.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / WEIGHTS_NAME)) == {"default.head.score.weight"}
    fresh = make_tiny("llama", "seqcls")
    with torch.no_grad():
        fresh.score.weight.normal_()  # a different head: the saved one must replace it
    assert not torch.equal(_logits(fresh, batch), expected)
    loaded = AdaptedModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(_logits(loaded, batch), expected)


def test_through_peftadapt_wrap_and_load(tmp_path):
    if not hasattr(peftadapt, "wrap"):
        pytest.skip("peftadapt.wrap not available yet")
    batch = token_batch()
    model = make_tiny("mistral", "seqcls")
    ref = _logits(model, batch)
    wrapped = peftadapt.wrap(model, "houlsby", reduction_factor=8)
    assert isinstance(wrapped, AdaptedModel) and torch.equal(_logits(wrapped, batch), ref)
    with pytest.raises(ValueError, match="add_adapter"):
        peftadapt.wrap(wrapped, "pfeiffer")
    peftadapt.add_adapter(wrapped, "second", "pfeiffer")
    assert wrapped.adapter_names == ["default", "second"]
    _perturb(wrapped)
    expected = _logits(wrapped, batch)
    peftadapt.save(wrapped, tmp_path)
    loaded = peftadapt.load(make_tiny("mistral", "seqcls"), tmp_path, adapter_name="default")
    assert loaded.adapter_names == ["default"] and torch.equal(_logits(loaded, batch), expected)
    assert peftadapt.trainable_parameters(wrapped) == wrapped.get_nb_trainable_parameters()


def test_mismatched_base_model_raises_naming_both(tmp_path):
    _trained_tiny("bert", "seqcls").save_pretrained(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"saved for model_type='bert', hidden_size=32.*given model has model_type='bert', hidden_size=48",
    ):
        AdaptedModel.from_pretrained(make_tiny("bert", "seqcls", hidden_size=48), tmp_path)
    with pytest.raises(ValueError, match=r"model_type='bert'.*model_type='llama'.*differing: \['model_type'"):
        AdaptedModel.from_pretrained(make_tiny("llama", "seqcls"), tmp_path)
    with pytest.raises(ValueError, match=r"num_labels=2.*num_labels=3"):
        AdaptedModel.from_pretrained(make_tiny("bert", "seqcls", num_labels=3), tmp_path)
    with pytest.raises(ValueError, match=r"num_hidden_layers=2.*num_hidden_layers=3"):
        AdaptedModel.from_pretrained(make_tiny("bert", "seqcls", num_hidden_layers=3), tmp_path)
    with pytest.raises(
        ValueError, match=r"head module\(s\) \['classifier'\] of a BertForSequenceClassification.*BertModel"
    ):
        AdaptedModel.from_pretrained(make_tiny("bert", "base"), tmp_path)


def test_missing_and_corrupt_files_raise_clearly(tmp_path):
    model = make_tiny("bert", "seqcls")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AdaptedModel.from_pretrained(model, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        AdaptedModel.from_pretrained(model, tmp_path)
    _trained_tiny().save_pretrained(tmp_path)
    cfg, weights = tmp_path / CONFIG_NAME, tmp_path / WEIGHTS_NAME
    good_cfg, good_weights = cfg.read_text(), weights.read_bytes()

    weights.write_bytes(good_weights[: len(good_weights) // 2])
    with pytest.raises(ValueError, match=rf"could not read .*{WEIGHTS_NAME}.*not a valid safetensors"):
        AdaptedModel.from_pretrained(model, tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=rf"no {WEIGHTS_NAME}"):
        AdaptedModel.from_pretrained(model, tmp_path)
    weights.write_bytes(good_weights)

    cfg.write_text(good_cfg[:40])
    with pytest.raises(ValueError, match=rf"could not read .*{CONFIG_NAME}: not valid JSON"):
        AdaptedModel.from_pretrained(model, tmp_path)
    cfg.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a peftadapt adapter config"):
        AdaptedModel.from_pretrained(model, tmp_path)
    cfg.write_text(good_cfg)

    # a failed load gives the model back untouched
    assert not any(getattr(m, "_peftadapt_injected", False) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    loaded = AdaptedModel.from_pretrained(model, tmp_path)  # and the good files still load
    assert loaded.adapter_names == ["default"]


def test_missing_unexpected_and_misshapen_keys(tmp_path):
    _trained_tiny().save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    tensors = load_file(weights)
    key = "default.bert.encoder.layer.0.output.dense.down.weight"
    assert key in tensors

    save_file({k: v for k, v in tensors.items() if k != key}, weights)
    with pytest.raises(ValueError, match=r"missing keys \['bert\.encoder\.layer\.0\.output\.dense\.down\.weight'\]"):
        AdaptedModel.from_pretrained(make_tiny("bert", "seqcls"), tmp_path)
    save_file({**tensors, "default.bert.extra.weight": torch.zeros(2)}, weights)
    with pytest.raises(ValueError, match=r"unexpected keys \['bert\.extra\.weight'\]"):
        AdaptedModel.from_pretrained(make_tiny("bert", "seqcls"), tmp_path)
    save_file({**tensors, "ghost.x": torch.zeros(2)}, weights)
    with pytest.raises(ValueError, match=r"unexpected keys of no saved adapter: \['ghost\.x'\]"):
        AdaptedModel.from_pretrained(make_tiny("bert", "seqcls"), tmp_path)
    save_file({**tensors, key: torch.zeros(3, 32)}, weights)
    with pytest.raises(ValueError, match=r"down\.weight has shape \(3, 32\), the model expects \(2, 32\)"):
        AdaptedModel.from_pretrained(make_tiny("bert", "seqcls"), tmp_path)


def test_save_is_atomic_and_keeps_old_files_on_failure(tmp_path, monkeypatch):
    wrapped = _trained_tiny()
    wrapped.save_pretrained(tmp_path)
    old = (tmp_path / WEIGHTS_NAME).read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("peftadapt.methods.native_format.save_file", fail)
    _perturb(wrapped, seed=9)
    with pytest.raises(OSError, match="disk full"):
        wrapped.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]  # temp file cleaned up
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == old


@pytest.mark.parametrize("bad", ["", "a b", "x/y", "x.y", 3, None])
def test_one_adapter_name_rule_for_wrap_and_add_adapter(bad):
    import peftadapt

    from ..conftest import make_tiny

    with pytest.raises(ValueError, match="adapter name"):
        peftadapt.wrap(make_tiny("bert", "seqcls"), "houlsby", adapter_name=bad)
    wrapped = peftadapt.wrap(make_tiny("bert", "seqcls"), "houlsby")
    with pytest.raises(ValueError, match="adapter name"):
        wrapped.add_adapter(bad, Adapter())
    with pytest.raises(ValueError, match="adapter name"):
        peftadapt.add_adapter(wrapped, bad, "houlsby")
