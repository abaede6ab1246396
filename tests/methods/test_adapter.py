"""Bottleneck adapters (Houlsby / Pfeiffer): placement, identity at init, counts, training, errors."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from peftadapt import AdaptedModel, Adapter
from peftadapt.methods.adapter import ARCHITECTURES, BottleneckAdapter
from peftadapt.methods.base import build_config
from tests.conftest import make_tiny, token_batch

_COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)


def _extra_tiny(kind: str, head: str = "seqcls"):
    """Tiny models of the other architectures in the adapter table (not in conftest)."""
    torch.manual_seed(0)
    cfg = {
        "roberta": lambda: tf.RobertaConfig(**_COMMON),
        "xlm-roberta": lambda: tf.XLMRobertaConfig(**_COMMON),
        "electra": lambda: tf.ElectraConfig(**_COMMON, embedding_size=32),
        "distilbert": lambda: tf.DistilBertConfig(
            vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64
        ),
        "qwen3": lambda: tf.Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=8, pad_token_id=0),
    }[kind]()
    cls = tf.AutoModelForSequenceClassification if head == "seqcls" else tf.AutoModelForCausalLM
    return cls.from_config(cfg).eval()


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _perturb(model, std=0.5, seed=1):
    """Give every adapter's up-projection nonzero weights so it changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n and ".up." in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


# -- identity at init -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("head", ["seqcls", "causal"])
@pytest.mark.parametrize("style", ["houlsby", "pfeiffer"])
def test_identity_at_init_and_changes_after_perturbation(kind, head, style):
    if kind == "bert" and head == "causal":
        head = "base"
    model = make_tiny(kind, head)
    batch = token_batch()
    with torch.no_grad():
        ref = model(**batch)[0]
    wrapped = build_config(style).apply(model)
    assert isinstance(wrapped, AdaptedModel)
    with torch.no_grad():
        out = wrapped(**batch)[0]
    assert torch.equal(out, ref)
    _perturb(wrapped)
    with torch.no_grad():
        assert not torch.allclose(wrapped(**batch)[0], ref, atol=1e-4)


@pytest.mark.parametrize("kind", ["roberta", "xlm-roberta", "electra", "distilbert", "qwen3"])
def test_identity_on_other_table_architectures(kind):
    model = _extra_tiny(kind)
    batch = token_batch()
    ref = _logits(model, batch)
    wrapped = Adapter().apply(model)
    assert torch.equal(_logits(wrapped, batch), ref)
    points = Adapter().injection_points(wrapped.model)
    assert len(points) == 2 * model.config.num_hidden_layers


def test_every_table_entry_is_tested():
    tested = {"bert", "llama", "qwen2", "mistral", "gpt2", "roberta", "xlm-roberta", "electra", "distilbert", "qwen3"}
    assert set(ARCHITECTURES) == tested


def test_identity_on_minilm(minilm_classifier, minilm_tokenizer):
    model = minilm_classifier()
    batch = minilm_tokenizer(
        ["a short sentence", "another, slightly longer sentence here"], padding=True, return_tensors="pt"
    )
    ref = _logits(model, batch)
    wrapped = Adapter(style="houlsby").apply(model)
    assert torch.equal(_logits(wrapped, batch), ref)


# -- placement ---------------------------------------------------------------------------


def test_houlsby_and_pfeiffer_injection_points():
    bert = make_tiny("bert", "seqcls")
    assert Adapter(style="houlsby").injection_points(bert) == [
        "bert.encoder.layer.0.attention.output.dense",
        "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.attention.output.dense",
        "bert.encoder.layer.1.output.dense",
    ]
    assert Adapter(style="pfeiffer").injection_points(bert) == [
        "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.output.dense",
    ]
    assert Adapter(placement="attention").injection_points(bert) == [
        "bert.encoder.layer.0.attention.output.dense",
        "bert.encoder.layer.1.attention.output.dense",
    ]
    llama = make_tiny("llama", "causal")
    assert Adapter().injection_points(llama) == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
    ]
    gpt2 = make_tiny("gpt2", "causal")
    assert Adapter(style="pfeiffer").injection_points(gpt2) == [
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.mlp.c_proj",
    ]
    assert Adapter(style="houlsby").injection_points(gpt2)[0] == "transformer.h.0.attn.c_proj"


def test_bert_adapter_sits_before_residual_and_layernorm():
    """Houlsby Fig. 2: LayerNorm(dense(h) + adapter_delta + input), not an adapter after the LayerNorm."""
    wrapped = Adapter(style="houlsby").apply(make_tiny("bert", "seqcls"))
    self_output = wrapped.model.bert.encoder.layer[0].attention.output
    c = torch.linspace(-1, 1, 32)
    with torch.no_grad():
        self_output.dense.adapters["default"].up.bias.copy_(c)
    torch.manual_seed(0)
    h, inp = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    dense = self_output.dense.base_layer
    with torch.no_grad():
        expected = self_output.LayerNorm(dense(h) + c + inp)
        assert torch.allclose(self_output(h, inp), expected, atol=1e-6)


def test_llama_adapter_acts_on_sublayer_output_before_residual():
    """Pre-norm decoder: x + adapter(o_proj(attn(norm(x)))): a bias in the adapter adds to the residual stream."""
    wrapped = Adapter(placement="ffn").apply(make_tiny("llama", "base"))
    mlp = wrapped.model.layers[0].mlp
    c = torch.linspace(-1, 1, 32)
    with torch.no_grad():
        mlp.down_proj.adapters["default"].up.bias.copy_(c)
        x = torch.randn(2, 5, 32)
        base_mlp = mlp.down_proj.base_layer(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        assert torch.allclose(mlp(x), base_mlp + c, atol=1e-6)


# -- parameter counts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, points, b",
    [
        ({"style": "houlsby"}, 4, 2),  # 32 // 16
        ({"style": "pfeiffer"}, 2, 2),
        ({"style": "houlsby", "reduction_factor": 4}, 4, 8),
        ({"style": "pfeiffer", "bottleneck_size": 5}, 2, 5),
        ({"placement": "attention", "reduction_factor": 8}, 2, 4),
    ],
)
def test_parameter_counts_exact(options, points, b):
    model = make_tiny("bert", "seqcls")
    total_before = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.classifier.parameters())
    wrapped = Adapter(**options).apply(model)
    h = 32
    per_adapter = 2 * h * b + b + h
    trainable, total = wrapped.get_nb_trainable_parameters()
    assert trainable == points * per_adapter + head
    assert total == total_before + points * per_adapter + head  # + the head copy
    assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) == trainable


def test_no_head_training_when_disabled_and_lm_head_never_trained():
    wrapped = Adapter(train_head=False).apply(make_tiny("llama", "seqcls"))
    assert wrapped.get_nb_trainable_parameters()[0] == 4 * (2 * 32 * 2 + 2 + 32)
    causal = Adapter().apply(make_tiny("gpt2", "causal"))
    assert causal.get_nb_trainable_parameters()[0] == 4 * (2 * 32 * 2 + 2 + 32)
    assert not any(p.requires_grad for p in causal.model.lm_head.parameters())


def test_options_build_the_modules_asked_for():
    wrapped = Adapter(activation="gelu", dropout=0.25, scaling=0.5, bottleneck_size=3).apply(make_tiny("bert", "base"))
    ad = wrapped.model.encoder.layer[1].output.dense.adapters["default"]
    assert isinstance(ad, BottleneckAdapter)
    assert isinstance(ad.act, torch.nn.GELU) and ad.dropout.p == 0.25 and ad.scaling == 0.5
    assert ad.down.weight.shape == (3, 32) and ad.up.weight.shape == (32, 3)
    assert torch.count_nonzero(ad.up.weight) == 0 and torch.count_nonzero(ad.up.bias) == 0
    with torch.no_grad():
        ad.up.weight.fill_(0.1)
        x = torch.randn(4, 32)
        assert torch.allclose(ad(x), x + 0.5 * ad.up(torch.nn.functional.gelu(ad.down(x))), atol=1e-6)


def test_aliases_preset_the_style():
    assert build_config("houlsby").style == "houlsby"
    assert build_config("pfeiffer", reduction_factor=8).style == "pfeiffer"
    assert build_config("adapter").style == "houlsby"
    with pytest.raises(ValueError, match="fixes"):
        build_config("pfeiffer", style="houlsby")


def test_half_precision_base_gets_float32_adapters():
    model = make_tiny("llama", "causal").to(torch.bfloat16)
    batch = token_batch()
    ref = _logits(model, batch)
    wrapped = Adapter().apply(model)
    ad = wrapped.model.model.layers[0].self_attn.o_proj.adapters["default"]
    assert ad.down.weight.dtype == torch.float32
    out = _logits(wrapped, batch)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


def test_generate_through_wrapper_matches_base_at_init():
    model = make_tiny("llama", "causal")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=4, do_sample=False)
    wrapped = Adapter().apply(model)
    with torch.no_grad():
        out = wrapped.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)


# -- training ---------------------------------------------------------------------------------

_SENTENCES = [
    "I loved this film",
    "what a wonderful day",
    "great food and kind staff",
    "this is excellent",
    "I hated every minute",
    "a terrible, boring mess",
    "the service was awful",
    "this is bad",
]
_LABELS = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])


def test_minilm_training_lowers_loss_and_changes_only_adapters_and_head(minilm_classifier, minilm_tokenizer):
    torch.manual_seed(0)
    wrapped = Adapter(style="houlsby", reduction_factor=16).apply(minilm_classifier())
    batch = minilm_tokenizer(_SENTENCES, padding=True, return_tensors="pt")
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n or ".heads.default." in n for n in trainable)
    # 6 layers x 2 points x (2*384*24 + 24 + 384) + classifier copy (384*2 + 2)
    assert sum(before[n].numel() for n in trainable) == 12 * (2 * 384 * 24 + 24 + 384) + 770

    def loss():
        with torch.no_grad():
            return wrapped(**batch, labels=_LABELS).loss.item()

    loss0 = loss()
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    wrapped.train()
    for _ in range(4):
        opt.zero_grad()
        wrapped(**batch, labels=_LABELS).loss.backward()
        opt.step()
    wrapped.eval()
    assert loss() < loss0 - 0.2  # 0.69 -> ~0.07 on this seed
    for n, p in wrapped.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"trainable {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


def test_gradient_checkpointing_through_wrapper_reaches_adapters():
    batch = token_batch()

    def grads(checkpointing: bool):
        wrapped = Adapter(activation="tanh").apply(make_tiny("llama", "causal"))
        _perturb(wrapped)
        if checkpointing:
            # reentrant checkpointing gives no gradient at all unless the inputs require grad
            wrapped.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            assert wrapped.is_gradient_checkpointing  # forwarded attribute
        wrapped.train()
        wrapped(**batch, labels=batch["input_ids"]).loss.backward()
        out = {n: p.grad for n, p in wrapped.named_parameters() if p.requires_grad}
        if checkpointing:
            wrapped.gradient_checkpointing_disable()
            assert not wrapped.is_gradient_checkpointing
        return out

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 16
    for n, g in plain.items():
        assert checkpointed[n] is not None, n
        assert g.abs().sum() > 0 and torch.allclose(checkpointed[n], g, atol=1e-6), n


# -- errors ------------------------------------------------------------------------------------


def test_unsupported_architecture_names_it_and_lists_supported():
    cfg = tf.GPTNeoXConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match=r"gpt_neox.*supported model types: \[.*'bert'.*'llama'"):
        Adapter().apply(model)
    assert not any(getattr(m, "_peftadapt_injected", False) for m in model.modules())


@pytest.mark.parametrize(
    "options, match",
    [
        ({"reduction_factr": 4}, r"unknown option.*reduction_factr.*valid options.*reduction_factor"),
        ({"activation": "mish"}, r"unknown activation 'mish'.*relu.*gelu"),
        ({"style": "lora"}, r"unknown adapter style 'lora'.*houlsby.*pfeiffer"),
        ({"placement": "output"}, r"placement.*attention.*ffn"),
        ({"placement": []}, r"placement"),
        ({"reduction_factor": 0}, r"reduction_factor must be a positive"),
        ({"bottleneck_size": 0}, r"bottleneck_size must be a positive"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_options_raise_with_choices(options, match):
    with pytest.raises(ValueError, match=match):
        build_config("adapter", **options)


def test_reduction_factor_too_large_for_hidden_size():
    model = make_tiny("bert", "seqcls")
    with pytest.raises(ValueError, match=r"reduction_factor=64 leaves a bottleneck of 0 for hidden size 32"):
        Adapter(reduction_factor=64).apply(model)
    assert type(model.bert.encoder.layer[0].output.dense) is torch.nn.Linear  # untouched


def test_wrapping_a_wrapped_model_points_to_add_adapter():
    wrapped = Adapter().apply(make_tiny("bert", "seqcls"))
    with pytest.raises(ValueError, match=r"already a peftadapt AdaptedModel.*add_adapter"):
        Adapter().apply(wrapped)
    with pytest.raises(ValueError, match=r"already has peftadapt adapter modules.*add_adapter"):
        Adapter().apply(wrapped.model)  # the HF model with adapters injected


def test_wrapping_a_peft_model_points_to_add_adapter():
    peft = pytest.importorskip("peft")
    model = make_tiny("llama", "causal")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"peft PeftModel.*add_adapter"):
        Adapter().apply(pm)
    with pytest.raises(ValueError, match=r"peft adapter layers.*add_adapter"):
        Adapter().apply(pm.get_base_model())


def test_adapters_on_a_4bit_base_train_in_float32():
    pytest.importorskip("bitsandbytes")
    from peftadapt.quant import build_quantized
    from tests.conftest import _tiny_config

    model = build_quantized(_tiny_config("llama"), 4, task="causal", device="cpu")
    o_proj = model.model.layers[0].self_attn.o_proj
    assert type(o_proj).__name__ == "Linear4bit"
    batch = token_batch()
    ref = _logits(model, batch)
    wrapped = Adapter(activation="tanh").apply(model)
    assert torch.equal(_logits(wrapped, batch), ref)
    ad = wrapped.model.model.layers[0].self_attn.o_proj.adapters["default"]
    assert ad.down.weight.dtype == torch.float32
    assert wrapped.get_nb_trainable_parameters()[0] == 4 * (2 * 32 * 2 + 2 + 32)
    _perturb(wrapped)
    wrapped.train()
    wrapped(**batch, labels=batch["input_ids"]).loss.backward()
    assert ad.down.weight.grad is not None and ad.down.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("x_dtype,scaling", [(torch.float64, 1.0), (torch.float64, 0.5), (torch.float32, 2.0)])
def test_bottleneck_forward_and_grads_match_the_formula(x_dtype, scaling):
    """The fused forward (residual as the GEMM addend) is x + s * (up(act(down(x)))) with the
    same gradients, for any scaling."""
    torch.manual_seed(0)
    a = BottleneckAdapter(16, 4, activation="gelu", scaling=scaling, dtype=x_dtype)
    torch.nn.init.normal_(a.up.weight)
    torch.nn.init.normal_(a.up.bias)
    x = torch.randn(2, 3, 16, dtype=x_dtype, requires_grad=True)
    y = a(x)
    ref = x + scaling * a.up(a.act(a.down(x)))
    assert y.shape == x.shape and y.dtype == x.dtype
    tol = 1e-12 if x_dtype == torch.float64 else 1e-5
    assert torch.allclose(y, ref, atol=tol, rtol=0)
    w = torch.randn_like(y)
    params = [x, a.up.weight, a.up.bias, a.down.weight, a.down.bias]
    for g, r in zip(
        torch.autograd.grad((y * w).sum(), params), torch.autograd.grad((ref * w).sum(), params), strict=True
    ):
        assert torch.allclose(g, r, atol=tol * 10, rtol=0)


def test_bottleneck_fp32_adapter_on_bf16_input_returns_bf16():
    a = BottleneckAdapter(8, 2, dtype=torch.float32)
    torch.nn.init.normal_(a.up.weight)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    y = a(x)
    ref = (x.float() + a.up(a.act(a.down(x.float())))).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)
