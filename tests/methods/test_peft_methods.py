"""Every other peft method through peftadapt.wrap (PeftMethod): wrap, train a step, save, reload, merge;
any peft.PeftConfig; option checks."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from peft import IA3Config, LoraConfig, PeftModel

import peftadapt
from tests.conftest import make_tiny, token_batch
from tests.methods.test_lora import _logits

# name -> options a first wrap needs (AdaLoRA's schedule length)
METHODS = {
    "ia3": {},
    "vera": {},
    "adalora": {"total_step": 10},
    "loha": {},
    "lokr": {},
    "oft": {},
    "prompt_tuning": {"num_virtual_tokens": 4},
}
MERGES = {"ia3", "vera", "adalora", "loha", "lokr", "oft"}
MODELS = [("bert", "seqcls"), ("llama", "causal")]


def _labels(head: str, batch: dict) -> torch.Tensor:
    return torch.tensor([0, 1, 0]) if head == "seqcls" else batch["input_ids"]


def _move_trainable(model, seed: int = 1, scale: float = 0.2) -> None:
    """Most methods start as the identity; move every trainable tensor so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.filterwarnings("ignore:Unmerge result can be inaccurate")
@pytest.mark.parametrize("kind,head", MODELS)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_wrap_step_save_load_merge(name, kind, head, tmp_path):
    base = make_tiny(kind, head)
    batch = token_batch()
    ref = _logits(base, batch)
    model = peftadapt.wrap(base, name, **METHODS[name])
    assert isinstance(model, PeftModel)
    assert model.peft_config["default"].peft_type.value == peftadapt.methods.PEFT_TYPES[name]
    # frozen base: only the method's parameters and the task head train
    own = {n for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n}
    assert own and all(("base_layer" not in n) for n in own)
    if head == "seqcls":
        assert any("modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)

    # one training step: the method's own parameters get gradients and the loss goes down
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(**batch, labels=_labels(head, batch)).loss
    loss.backward()
    grad = sum(float(p.grad.abs().sum()) for n, p in model.named_parameters() if n in own and p.grad is not None)
    assert grad > 0
    opt.step()
    with torch.no_grad():
        assert model(**batch, labels=_labels(head, batch)).loss < loss

    model.eval()
    _move_trainable(model)
    want = _logits(model, batch)
    # the adapter changes the outputs (a causal LM with virtual tokens also returns logits for them)
    assert not torch.allclose(want[..., -ref.shape[-2] :, :2], ref[..., :2], atol=1e-3)
    peftadapt.save(model, tmp_path)
    loaded = peftadapt.load(make_tiny(kind, head), tmp_path)
    assert torch.equal(_logits(loaded, batch), want)
    assert peftadapt.trainable_parameters(loaded)[0] == 0
    assert peftadapt.trainable_parameters(peftadapt.load(make_tiny(kind, head), tmp_path, is_trainable=True))[0] > 0

    if name in MERGES:
        peftadapt.merge(model, unload=False)
        torch.testing.assert_close(_logits(model, batch), want, atol=1e-5, rtol=0)
        peftadapt.unmerge(model)  # subtracts the update again: equal within round-off
        torch.testing.assert_close(_logits(model, batch), want, atol=1e-5, rtol=0)
        merged = peftadapt.merge(model)
        assert not peftadapt.is_wrapped(merged) and isinstance(merged, tf.PreTrainedModel)
        torch.testing.assert_close(_logits(merged, batch), want, atol=1e-5, rtol=0)
    else:
        with pytest.raises(ValueError, match="does not merge into the weights"):
            peftadapt.merge(model)


def test_any_peft_config_is_taken_as_it_is(tmp_path):
    batch = token_batch()
    cfg = IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM")
    model = peftadapt.wrap(make_tiny("llama", "causal"), cfg)
    assert model.peft_config["default"].target_modules == {"v_proj", "down_proj"}
    assert cfg.base_model_name_or_path is None  # the user's object is not filled in
    _move_trainable(model)
    want = _logits(model, batch)
    peftadapt.save(model, tmp_path)
    assert torch.equal(_logits(peftadapt.load(make_tiny("llama", "causal"), tmp_path), batch), want)
    lora = peftadapt.wrap(make_tiny("llama", "causal"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert lora.peft_config["default"].r == 2
    with pytest.raises(ValueError, match="not both"):
        peftadapt.wrap(make_tiny("llama", "causal"), cfg, r=2)
    # added as a second named adapter too (peft keeps one method per model)
    peftadapt.add_adapter(model, "second", IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    assert peftadapt.adapter_names(model) == ["default", "second"]
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        peftadapt.add_adapter(model, "third", LoraConfig(r=2, target_modules=["q_proj"]))


def test_defaults_help_and_option_checks():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as ia3_table

    model = peftadapt.wrap(make_tiny("llama", "causal"), "ia3")
    assert model.peft_config["default"].target_modules == set(ia3_table["llama"])  # peft's table per architecture
    # GPT-2's Conv1D is transposed: fan_in_fan_out is set for it
    gpt2 = peftadapt.wrap(make_tiny("gpt2", "causal"), "ia3", target_modules=["c_attn"], feedforward_modules=[])
    assert gpt2.peft_config["default"].fan_in_fan_out is True
    # train_head=False: no head copy trains
    probe = peftadapt.wrap(make_tiny("bert", "seqcls"), "lokr", train_head=False)
    assert not any("modules_to_save" in n for n, p in probe.named_parameters() if p.requires_grad)
    frozen_head = peftadapt.wrap(make_tiny("bert", "seqcls"), "prompt_tuning", train_head=False)
    assert [n for n, p in frozen_head.named_parameters() if p.requires_grad] == [
        "prompt_encoder.default.embedding.weight"
    ]

    h = peftadapt.PeftMethod.help("ia3")
    assert "feedforward_modules" in h and "train_head" in h and h["feedforward_modules"]
    assert "peft_type" in peftadapt.PeftMethod.help()
    with pytest.raises(ValueError, match="did you mean 'feedforward_modules'"):
        peftadapt.wrap(make_tiny(), "ia3", feedforward_module=["down_proj"])
    with pytest.raises(ValueError, match="adalora: AdaLoRA does not work when `total_step` is None"):
        peftadapt.wrap(make_tiny(), "adalora")
    with pytest.raises(ValueError, match="prompt_tuning adapts no modules"):
        peftadapt.wrap(make_tiny(), "prompt_tuning", target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] match no module"):
        peftadapt.wrap(make_tiny(), "oft", target_modules=["nope"])
    with pytest.raises(ValueError, match="peft_type 'NOPE' is not a peft method"):
        peftadapt.wrap(make_tiny(), "peft", peft_type="NOPE")
    with pytest.raises(ValueError, match="unknown method 'ia4'"):
        peftadapt.wrap(make_tiny(), "ia4")


def test_run_file_names_peft_methods_with_their_options():
    from peftadapt.train import load_run_config

    base = {"model": {"path": "m"}, "data": {"source": {"path": "s.csv", "label": "y"}}}
    run = load_run_config({**base, "method": {"name": "ia3", "feedforward_modules": ["down_proj"]}})
    assert run.method.name == "ia3" and run.method.options == {"feedforward_modules": ["down_proj"]}
    load_run_config({**base, "method": {"name": "adalora", "total_step": 100, "target_r": 4}})
    with pytest.raises(ValueError, match=r"unknown key method\.feedforward_module; did you mean feedforward_modules"):
        load_run_config({**base, "method": {"name": "ia3", "feedforward_module": ["down_proj"]}})
    with pytest.raises(ValueError, match=r"^method.total_step: adalora needs the run's number of optimizer steps"):
        load_run_config({**base, "method": "adalora"})  # neither total_step nor training.max_steps
    with pytest.raises(ValueError, match=r"method \(adalora\): adalora: AdaLoRA does not work when `total_step`"):
        load_run_config({**base, "method": {"name": "adalora", "total_step": 0}})  # peft's own check still runs


def test_import_and_build_config_do_not_import_peft():
    """peft costs seconds to import; only wrapping with (or reading the options of) a peft method loads it."""
    import subprocess
    import sys

    code = (
        "import sys, peftadapt\n"
        "from peftadapt.methods import build_config\n"
        "build_config('lora', r=4); build_config('adapter')\n"
        "assert 'peft' not in sys.modules, 'peft imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
