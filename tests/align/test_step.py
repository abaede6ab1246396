"""DomainAdaptation: the DA step equals its formula, skips the target forward while off, cleans up."""

import copy

import pytest
import torch

import peftadapt
from peftadapt.align import MMD, DomainAdaptation, Regularizer, Term, build

from ..conftest import make_tiny, token_batch

LAYER = "bert.encoder.layer.1"  # the last encoder block: hidden_states[-1] of the plain forward


def _model(seed=0):
    """A tiny LoRA BERT classifier without dropout (the forward is a function of the batch)."""
    m = make_tiny("bert", "seqcls", seed=seed, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = peftadapt.wrap(m, "lora", r=4, dropout=0.0)
    # LoRA B starts at 0; move it so the adapter changes the features and gets a non-trivial gradient
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model.train()


def _batches():
    src = {**token_batch(seed=0, batch=4), "labels": torch.tensor([0, 1, 1, 0])}
    tgt = token_batch(seed=1, batch=5, pad_last=4)
    return src, tgt


def _masked_mean(h, mask):
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_loss_and_adapter_gradients_equal_the_hand_computation():
    model, src, tgt = _model(), *_batches()
    ref, task_only = copy.deepcopy(model), copy.deepcopy(model)
    w = 0.3
    with DomainAdaptation(model, [Term(MMD(), weight=w)], layer=LAYER) as da:
        loss, logs = da.loss(src, tgt, progress=0.5)
        loss.backward()
    # by hand: the task loss, masked-mean features of the last block's output, w * MMD
    out_s = ref(**src, output_hidden_states=True)
    out_t = ref(**tgt, output_hidden_states=True)
    fs = _masked_mean(out_s.hidden_states[-1], src["attention_mask"])
    ft = _masked_mean(out_t.hidden_states[-1], tgt["attention_mask"])
    mmd = MMD()(fs, ft)
    want = out_s.loss + w * mmd
    want.backward()
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    assert logs["task_loss"].item() == pytest.approx(out_s.loss.item(), abs=1e-6)
    assert logs["reg/mmd"].item() == pytest.approx(mmd.item(), abs=1e-6)
    assert logs["reg_loss"].item() == pytest.approx(w * mmd.item(), abs=1e-6)
    assert logs["weight/mmd"] == w
    assert all(
        isinstance(logs[k], torch.Tensor) and not logs[k].requires_grad for k in ("task_loss", "reg_loss", "reg/mmd")
    )
    got, exp = _lora_grads(model), _lora_grads(ref)
    assert got.keys() == exp.keys() and len(got) >= 4
    for n in exp:
        torch.testing.assert_close(got[n], exp[n], atol=1e-6, rtol=1e-5)
    assert abs(mmd.item()) > 1e-2  # the alignment term really contributes (unbiased MMD may be < 0)
    task_only(**src).loss.backward()
    assert max(float((exp[n] - g).abs().max()) for n, g in _lora_grads(task_only).items()) > 1e-4
    assert _hooks(model) == 0


def test_split_form_equals_loss_for_a_caller_that_ran_the_source_forward():
    model, src, tgt = _model(), *_batches()
    with DomainAdaptation(model, [Term("mmd", weight=0.5), Term("coral", weight=2.0)], layer=LAYER) as da:
        loss, logs = da.loss(src, tgt, progress=0.2)
        out = model(**src)  # what transformers' Trainer.compute_loss has already done
        reg, split_logs = da.alignment_loss(out, src["attention_mask"], tgt, progress=0.2)
    assert (out.loss + reg).item() == pytest.approx(loss.item(), abs=1e-6)
    assert split_logs.keys() == {k for k in logs if k != "task_loss"}
    assert split_logs["reg/coral"].item() == pytest.approx(logs["reg/coral"].item(), abs=1e-7)


def test_the_target_forward_runs_only_while_a_term_is_on():
    model, src, tgt = _model(), *_batches()
    calls = []
    model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
    da = DomainAdaptation(model, [Term("mmd", weight=0.4, start=0.5)], layer=LAYER)
    loss, logs = da.loss(src, None, progress=0.25)  # warm-up: no target batch needed
    assert calls == [4]  # the source forward only
    assert logs["reg_loss"].item() == 0.0 and logs["weight/mmd"] == 0.0 and "reg/mmd" not in logs
    assert loss is not None and loss.item() == pytest.approx(logs["task_loss"].item())
    assert not da.active(0.25) and da.active(0.5)
    calls.clear()
    _, logs = da.loss(src, tgt, progress=0.75)
    assert calls == [4, 5] and "reg/mmd" in logs and logs["weight/mmd"] == 0.4
    with pytest.raises(ValueError, match=r"target_batch .*a term is on"):
        da.loss(src, None, progress=0.75)
    da.remove()


def test_logits_reach_only_the_terms_that_read_them():
    model, src, tgt = _model(), *_batches()
    seen = {}

    class Spy(Regularizer):
        def __init__(self, name, needs_logits):
            super().__init__()
            self.name, self.needs_logits = name, needs_logits

        def forward(self, fs, ft, source_logits=None, target_logits=None):
            seen[self.name] = (source_logits is not None, target_logits is not None)
            return (fs.mean() - ft.mean()) ** 2

    torch.manual_seed(0)
    cdan = build("cdan", in_features=32, num_classes=2, hidden_size=8)
    with DomainAdaptation(model, [Term(Spy("plain", False)), Term(Spy("logits", True)), Term(cdan)]) as da:
        _, logs = da.loss(src, tgt, progress=0.0)
        assert len(da.parameters()) == len(list(cdan.parameters())) > 0
    assert seen == {"plain": (False, False), "logits": (True, True)}
    assert {"reg/plain", "reg/logits", "reg/cdan"} <= set(logs)


def test_hooks_are_removed_by_remove_and_by_an_error_inside_with():
    model, src, tgt = _model(), *_batches()
    before = _hooks(model)
    da = DomainAdaptation(model, ["mmd"])
    assert _hooks(model) > before
    da.remove()
    da.remove()  # twice is fine
    assert _hooks(model) == before
    with pytest.raises(RuntimeError, match="removed"):
        da.loss(src, tgt, progress=0.5)
    with pytest.raises(KeyError), DomainAdaptation(model, ["mmd"]) as da:
        assert _hooks(model) > before
        raise KeyError("boom")
    assert _hooks(model) == before


def test_bad_input_is_a_value_error_naming_value_and_fix():
    model, src, tgt = _model(), *_batches()
    with pytest.raises(ValueError, match=r"at least one term.*Term\('mmd'"):
        DomainAdaptation(model, [])
    with pytest.raises(ValueError, match=r"at least one term"):
        DomainAdaptation(model, None)
    lm = peftadapt.wrap(make_tiny("llama", "causal"), "lora", r=4)
    before = _hooks(lm)
    with pytest.raises(ValueError, match=r"\['entropy'\].*pass class_tokens.*mmd, coral, dann or target_lm"):
        DomainAdaptation(lm, ["entropy"])
    assert _hooks(lm) == before  # nothing registered by a constructor that raised
    DomainAdaptation(lm, ["mmd"]).remove()  # a causal LM with a feature-only term is fine
    with DomainAdaptation(model, ["mmd"]) as da:
        for bad in (1.5, -0.1, float("nan"), "half", True):
            with pytest.raises(ValueError, match=r"progress must be in \[0, 1\].*got"):
                da.loss(src, tgt, progress=bad)
        no_mask = {k: v for k, v in tgt.items() if k != "attention_mask"}
        with pytest.raises(ValueError, match=r"target_batch.*needs an attention_mask.*\['input_ids'\]"):
            da.loss(src, no_mask, progress=0.5)
        with pytest.raises(ValueError, match=r"source_batch needs labels"):
            da.loss({k: v for k, v in src.items() if k != "labels"}, tgt, progress=0.5)
        with pytest.raises(ValueError, match="source_batch must be a mapping"):
            da.loss([1, 2], tgt, progress=0.5)


def test_state_dict_device_and_modes_go_to_the_terms():
    model = _model()
    torch.manual_seed(0)
    dann = build("dann", in_features=32, hidden_size=8)
    with DomainAdaptation(model, [Term(dann, weight=0.1)]) as da:
        sd = {k: v.clone() for k, v in da.state_dict().items()}
        assert sd and all(k.startswith("terms.0.") for k in sd)
        with torch.no_grad():
            for p in dann.parameters():
                p.add_(1.0)
        da.load_state_dict(sd)
        assert all(torch.equal(da.state_dict()[k], sd[k]) for k in sd)
        assert da.to("cpu") is da and da.eval() is da and not dann.training
        da.train()
        assert dann.training and model.training
        assert "dann" in repr(da)
