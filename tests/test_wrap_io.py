"""Save/load round trips (peftadapt <-> plain peft <-> transformers) and boundary errors."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peftadapt
from tests.conftest import make_tiny, token_batch
from tests.methods.test_lora import _logits, _perturb_lora


def _trained_lora(kind="llama", head="causal", **opts):
    model = peftadapt.wrap(make_tiny(kind, head), "lora", r=4, **opts)
    _perturb_lora(model)
    return model


def test_save_writes_peft_format_and_peftadapt_load_is_exact(tmp_path):
    model = _trained_lora()
    batch = token_batch()
    want = _logits(model, batch)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    loaded = peftadapt.load(make_tiny("llama", "causal"), tmp_path)
    assert torch.equal(_logits(loaded, batch), want)
    assert peftadapt.trainable_parameters(loaded)[0] == 0  # inference mode by default
    trainable = peftadapt.load(make_tiny("llama", "causal"), tmp_path, is_trainable=True)
    assert peftadapt.trainable_parameters(trainable)[0] > 0


def test_plain_peft_and_transformers_load_our_adapter(tmp_path):
    model = _trained_lora()
    batch = token_batch()
    want = _logits(model, batch)
    model.save_pretrained(tmp_path)
    via_peft = PeftModel.from_pretrained(make_tiny("llama", "causal"), str(tmp_path))
    assert torch.equal(_logits(via_peft, batch), want)
    hf = make_tiny("llama", "causal")
    hf.load_adapter(str(tmp_path))
    assert torch.equal(_logits(hf, batch), want)


# What transformers' own load_adapter makes of each method's saved adapter (README, "Saved adapters").
HF_EXACT = ["lora", "rslora", "ia3", "adalora", "loha", "lokr", "oft"]
HF_REFUSES = {
    "prefix": "does not support prompt learning",
    "prompt_tuning": "does not support prompt learning",
    "vera": "does not support PeftType.VERA",
}


@pytest.mark.parametrize("name", [*HF_EXACT, "dora", *HF_REFUSES])
def test_transformers_load_adapter_per_method(name, tmp_path):
    from tests.methods.test_peft_methods import _move_trainable

    opts = {"total_step": 10} if name == "adalora" else {}
    model = peftadapt.wrap(make_tiny("llama", "causal"), name, **opts)
    _move_trainable(model)
    batch = token_batch()
    want = _logits(model, batch)
    peftadapt.save(model, tmp_path)
    hf = make_tiny("llama", "causal")
    if name in HF_REFUSES:
        with pytest.raises(ValueError, match=HF_REFUSES[name]):
            hf.load_adapter(str(tmp_path))
        return
    hf.load_adapter(str(tmp_path))
    got = _logits(hf, batch)
    if name in HF_EXACT:
        assert torch.equal(got, want)
    else:  # DoRA: transformers 5.x loads A and B but not the magnitude vector (an upstream limit)
        diff = float((got - want).abs().max())
        assert diff > 1e-3, f"transformers now loads DoRA exactly (max |diff| {diff}): update the README"
        assert torch.equal(_logits(peftadapt.load(make_tiny("llama", "causal"), tmp_path), batch), want)


def test_peftadapt_loads_plain_peft_adapter_with_classifier_head(tmp_path):
    torch.manual_seed(0)
    pm = get_peft_model(
        make_tiny("bert", "seqcls"), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    _perturb_lora(pm)
    with torch.no_grad():
        pm.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    batch = token_batch()
    want = _logits(pm, batch)
    pm.save_pretrained(tmp_path)
    loaded = peftadapt.load(make_tiny("bert", "seqcls"), tmp_path)
    assert torch.equal(_logits(loaded, batch), want)


def test_load_onto_wrapped_model_adds_named_adapter(tmp_path):
    model = _trained_lora()
    batch = token_batch()
    want = _logits(model, batch)
    model.save_pretrained(tmp_path)
    other = peftadapt.wrap(make_tiny("llama", "causal"), "lora", r=2)
    peftadapt.load(other, tmp_path, adapter_name="loaded")
    assert peftadapt.adapter_names(other) == ["default", "loaded"]
    peftadapt.set_adapter(other, "loaded")
    assert torch.equal(_logits(other, batch), want)


def test_merged_model_saves_as_plain_transformers(tmp_path):
    model = _trained_lora("bert", "seqcls")
    batch = token_batch()
    want = _logits(model, batch)
    merged = peftadapt.merge(model)
    merged.save_pretrained(tmp_path)
    from transformers import AutoModelForSequenceClassification

    again = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert torch.allclose(_logits(again, batch), want, atol=1e-5)


# -- errors at the boundary ---------------------------------------------------------------


def test_unknown_method_and_option():
    with pytest.raises(ValueError, match=r"unknown method 'lorra'.*valid methods: \[.*'lora'.*'prefix'"):
        peftadapt.wrap(make_tiny(), "lorra")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rank'\].*valid options: \['r'"):
        peftadapt.wrap(make_tiny(), "lora", rank=8)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        peftadapt.wrap(make_tiny(), "lora", r=0)
    with pytest.raises(ValueError, match=r"bias='some'.*\['none', 'all', 'lora_only'\]"):
        peftadapt.wrap(make_tiny(), "lora", bias="some")
    with pytest.raises(TypeError, match=r"method must be a name, a MethodConfig or a peft\.PeftConfig"):
        peftadapt.wrap(make_tiny(), 3)
    with pytest.raises(TypeError, match="transformers model"):
        peftadapt.wrap(torch.nn.Linear(2, 2), "lora")
    with pytest.raises(ValueError, match="'dora' fixes"):
        peftadapt.wrap(make_tiny(), "dora", use_dora=False)


def test_config_objects_work_like_names():
    a = peftadapt.wrap(make_tiny(), peftadapt.LoRA(r=2))
    assert peftadapt.trainable_parameters(a)[0] == 2 * (2 * (32 + 32) + 2 * (32 + 16))
    with pytest.raises(ValueError, match="either in the config object or as keywords"):
        peftadapt.wrap(make_tiny(), peftadapt.LoRA(r=2), r=4)


def test_targets_that_match_nothing():
    with pytest.raises(
        ValueError, match=r"\['qkv'\] match no module of this llama model; linear layers here: \[.*'q_proj'"
    ):
        peftadapt.wrap(make_tiny(), "lora", target_modules=["q_proj", "qkv"])
    with pytest.raises(ValueError, match="regular expression"):
        peftadapt.wrap(make_tiny(), "lora", target_modules=r".*\.nothing")


def test_wrapping_twice_is_refused():
    model = peftadapt.wrap(make_tiny(), "lora")
    with pytest.raises(ValueError, match=r"already wrapped.*add_adapter"):
        peftadapt.wrap(model, "lora")
    inner = model.get_base_model()  # the transformers model now carries LoRA layers
    with pytest.raises(ValueError, match="already wrapped"):
        peftadapt.wrap(inner, "prefix")


def test_load_for_other_hidden_size_or_architecture(tmp_path):
    _trained_lora().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"different hidden size.*takes 48 inputs.*expects 32"):
        peftadapt.load(make_tiny("llama", "causal", hidden_size=48), tmp_path)
    with pytest.raises(ValueError, match=r"different architecture.*gpt2"):
        peftadapt.load(make_tiny("gpt2", "causal"), tmp_path)


def test_load_classifier_with_other_num_labels(tmp_path):
    _trained_lora("bert", "seqcls").save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"classifier\.(weight|bias) was saved with shape \(2(, 32)?,?\).*this model has \(3"
    ):
        peftadapt.load(make_tiny("bert", "seqcls", num_labels=3), tmp_path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter folder"):
        peftadapt.load(make_tiny(), tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"expected adapter_config.json"):
        peftadapt.load(make_tiny(), tmp_path)
    _trained_lora().save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json header")
    with pytest.raises(ValueError, match="corrupt adapter weights"):
        peftadapt.load(make_tiny(), tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="missing adapter weights"):
        peftadapt.load(make_tiny(), tmp_path)
    weights.write_bytes(good)
    (tmp_path / "adapter_config.json").write_text("{ broken")
    with pytest.raises(ValueError, match="corrupt adapter config"):
        peftadapt.load(make_tiny(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(ValueError, match="no 'peft_type'"):
        peftadapt.load(make_tiny(), tmp_path)


def test_merge_refuses_prompt_learning():
    with pytest.raises(ValueError, match="a PREFIX_TUNING adapter does not merge into the weights"):
        peftadapt.merge(peftadapt.wrap(make_tiny(), "prefix", num_virtual_tokens=2))
    with pytest.raises(TypeError, match="merge\\(\\) needs"):
        peftadapt.merge(make_tiny())
