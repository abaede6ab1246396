import pytest
import torch

from peftadapt import FeatureTap
from peftadapt.features import pool

from .conftest import make_tiny, token_batch


def _left_pad(batch):
    """Move each row's padding to the left."""
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    for r in range(ids.shape[0]):
        n = int(mask[r].sum())
        ids[r] = torch.cat([ids[r, n:], ids[r, :n]])
        mask[r] = torch.cat([mask[r, n:], mask[r, :n]])
    return {"input_ids": ids, "attention_mask": mask}


def test_pool_math():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    torch.testing.assert_close(pool(h, right, "mean")[0], h[0, :3].mean(0))
    torch.testing.assert_close(pool(h, right, "last")[0], h[0, 2])
    torch.testing.assert_close(pool(h, left, "last")[0], h[0, 3])
    torch.testing.assert_close(pool(h, left, "cls")[0], h[0, 1])
    torch.testing.assert_close(pool(h, right, "cls")[0], h[0, 0])
    torch.testing.assert_close(pool(h, None, "last"), h[:, -1])
    flat = torch.randn(2, 3)
    assert pool(flat, right, "mean") is flat  # already pooled
    with pytest.raises(ValueError, match="no tokens"):
        pool(h, torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]), "mean")
    with pytest.raises(ValueError, match=r"shape \(batch, seq\) = \(2, 4\)"):
        pool(h, torch.ones(2, 5), "mean")


def test_bert_classifier_input_is_the_pooled_cls_vector():
    m = make_tiny("bert", "seqcls")
    b = token_batch()
    with FeatureTap(m) as tap:
        m(**b)
        assert tap.layer_name == "classifier" and tap.capture == "input"
        feats = tap.pooled()
    want = m.bert(**b).pooler_output  # eval mode: dropout is the identity
    assert feats.shape == (3, 32)
    torch.testing.assert_close(feats, want)
    assert not m._forward_pre_hooks and not m.classifier._forward_pre_hooks  # removed on exit


@pytest.mark.parametrize("pad", ["right", "left"])
def test_decoder_score_input_last_token(pad):
    m = make_tiny("llama", "seqcls")
    b = token_batch(batch=3, length=10, pad_last=4)
    if pad == "left":
        b = _left_pad(b)
    tap = FeatureTap(m, pooling="last")
    m(**b)
    feats = tap.pooled()  # mask remembered from the call
    hs = m(**b, output_hidden_states=True).hidden_states[-1]
    last = [int(torch.nonzero(b["attention_mask"][r]).max()) for r in range(3)]
    torch.testing.assert_close(feats, torch.stack([hs[r, last[r]] for r in range(3)]))
    tap.remove()


def test_mean_pooling_on_base_model_default_layer():
    m = make_tiny("llama", "base")
    b = token_batch()
    tap = FeatureTap(m, pooling="mean")
    assert tap.layer_name == "norm"
    out = m(**b)
    mask = b["attention_mask"].unsqueeze(-1).float()
    want = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(tap.pooled(), want)
    bert = make_tiny("bert", "base")
    t2 = FeatureTap(bert, pooling="cls")
    out = bert(**b)
    assert t2.layer_name == "encoder.layer.1"
    torch.testing.assert_close(t2.pooled(), out.last_hidden_state[:, 0])


def test_peft_wrapped_model_plain_names_and_gradient_to_lora():
    from peft import LoraConfig, get_peft_model

    m = make_tiny("bert", "seqcls")
    pm = get_peft_model(m, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    b = token_batch()
    tap = FeatureTap(pm)
    assert tap.layer_name == "base_model.model.classifier"
    inner = FeatureTap(pm, layer="bert.encoder.layer.1", pooling="cls")
    assert inner.layer_name == "base_model.model.bert.encoder.layer.1"
    same = FeatureTap(pm, layer="base_model.model.bert.encoder.layer.1")
    assert same.module is inner.module
    pm.train()
    pm(**b)
    feats = inner.pooled()
    feats.pow(2).sum().backward()
    lora_b = [p for n, p in pm.named_parameters() if "lora_B" in n and "layer.1." in n]
    lora_a = [p for n, p in pm.named_parameters() if "lora_A" in n and "layer.1." in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    assert all(p.grad is not None for p in lora_a)
    # a plain model accepts the wrapped name too
    assert (
        FeatureTap(make_tiny("bert", "seqcls"), layer="base_model.model.bert.encoder.layer.0").layer_name
        == "bert.encoder.layer.0"
    )
    for t in (tap, inner, same):
        t.remove()


def test_each_forward_replaces_the_capture_and_remove_stops_it():
    m = make_tiny("gpt2", "seqcls")
    tap = FeatureTap(m, pooling="last")
    b1, b2 = token_batch(seed=0), token_batch(seed=1, batch=2, pad_last=0)
    m(**b1)
    f1 = tap.pooled()
    m(**b2)
    f2 = tap.pooled()
    assert f1.shape == (3, 32) and f2.shape == (2, 32)
    tap.remove()
    m(**b1)
    with pytest.raises(RuntimeError, match="nothing captured"):
        tap.pooled()


def test_explicit_mask_and_bad_arguments():
    m = make_tiny("llama", "causal")
    b = token_batch()
    tap = FeatureTap(m, pooling="mean")
    assert tap.layer_name == "lm_head"
    m(b["input_ids"])  # no mask in the call: pass it to pooled
    full = tap.pooled()
    masked = tap.pooled(b["attention_mask"])
    assert torch.equal(full[:2], masked[:2]) and not torch.allclose(full[2], masked[2])
    with pytest.raises(ValueError, match=r"valid poolings: \['mean', 'cls', 'last'\]"):
        FeatureTap(m, pooling="max")
    with pytest.raises(ValueError, match=r"no module named 'encoder.layer.9'"):
        FeatureTap(m, layer="encoder.layer.9")
    with pytest.raises(ValueError, match="ambiguous"):
        FeatureTap(m, layer="self_attn")
    with pytest.raises(ValueError, match="capture"):
        FeatureTap(m, capture="grad")
    tap.remove()


def test_real_minilm_default_tap_equals_pooler(minilm_classifier, minilm_tokenizer):
    m = minilm_classifier()
    b = minilm_tokenizer(
        ["a short one", "a somewhat longer review of a kitchen knife"], padding=True, return_tensors="pt"
    )
    with FeatureTap(m) as tap:
        m(**b)
        feats = tap.pooled()
    assert feats.shape == (2, 384)
    torch.testing.assert_close(feats, m.bert(**b).pooler_output)


def test_activation_checkpoint_recompute_does_not_overwrite_capture():
    from torch.utils.checkpoint import checkpoint

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
            self.classifier = torch.nn.Linear(4, 2)

        def forward(self, x):
            h = checkpoint(self.block, x, use_reentrant=True)  # recompute fires module hooks
            return self.classifier(h)

    torch.manual_seed(0)
    net = Net()
    tap = FeatureTap(net, layer="block")
    calls = []
    net.block.register_forward_hook(lambda *a: calls.append(1))
    out = net(torch.randn(3, 4, requires_grad=True))
    captured = tap.features
    (tap.pooled().sum() + out.sum()).backward()
    assert len(calls) == 2  # the block really ran again during backward
    assert tap.features is captured
    tap.remove()


def test_adapted_model_wrapper_names_resolve():
    import peftadapt

    if not hasattr(peftadapt, "wrap"):
        pytest.skip("peftadapt.wrap not available")
    m = peftadapt.wrap(make_tiny("bert", "seqcls"), "adapter")
    b = token_batch()
    with FeatureTap(m) as head_tap, FeatureTap(m, layer="bert.encoder.layer.1", pooling="cls") as inner:
        assert head_tap.layer_name.endswith("classifier") and head_tap.capture == "input"
        assert inner.layer_name.endswith(".bert.encoder.layer.1")
        out = m(**b, output_hidden_states=True)
        torch.testing.assert_close(inner.pooled(), out.hidden_states[-1][:, 0])
        assert head_tap.pooled().shape == (3, 32)
