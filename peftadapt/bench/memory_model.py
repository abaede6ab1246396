"""Analytic memory model of one training step (weights + training state + activations).

The model predicts the peak memory of one training step from the architecture
alone, so that a user can ask "will LoRA on a 7B fit?" without building it, and
so that every measurement in ``peftadapt bench`` is printed next to its
prediction (``measured / analytic``; a ratio far from 1 flags either a leak in
the method or a gap in this model).

    total = weights + trainable * (grad_bytes + optimizer_bytes) + activations

* ``weights``: every parameter at its storage dtype; a quantized linear weight
  costs 0.5 byte (4-bit NF4/FP4) or 1 byte (8-bit) per element plus its
  scales (one absmax per 64-element block for 4-bit, 8-bit when double
  quantized; one fp32 scale per output row for 8-bit). Embeddings, norms and the output head stay at the
  compute dtype, as bitsandbytes leaves them.
* ``grads`` + ``optimizer``: one gradient per trainable parameter at its dtype,
  plus AdamW's two fp32 moments (8 bytes; SGD with momentum 4, plain SGD 0).
* ``activations``: the tensors autograd saves for the backward pass, counted
  per token and per layer, following Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models" (Sec. 4.1), adapted to
  the two block layouts below. With a frozen base, a linear layer saves no
  input (its weight gradient is not needed): this is why PEFT saves activation
  memory as well as optimizer memory, and the model counts it.

Per layer and token (elements; h = hidden, i = intermediate, m = adapter
bottleneck, r = LoRA rank, a = heads, s = sequence length):

  Llama (pre-RMSNorm, SwiGLU, SDPA):  2h (norm inputs, kept as fp32 copies: RMSNorm
      computes in fp32, so at bf16 they cost 8 bytes each) + 4h (q, k, v and output
      of attention) + 3i (SiLU input, SiLU output, up output)
      + h for q/k/v inputs, + h for o input, + h for gate/up inputs, + i for the
      down input, each only when that linear layer is trainable.
  BERT (post-LayerNorm, GELU, SDPA): 2h (LayerNorm inputs) + 4h (attention)
      + i (GELU input) + 2h/4 (two dropout masks, 1 byte each, when training)
      + the same trainable-linear terms (h q/k/v, h o, h intermediate, i output).
  Eager attention adds the softmax output, a*s per token (and a byte mask for
  BERT's attention dropout). SDPA's "math" fallback, which torch takes on the
  CPU whenever attention dropout is on in training (the CPU flash kernel has
  no dropout), keeps three a*s matrices per token at the compute dtype: the
  softmax output, the dropout scale mask and the dropped probabilities
  (checked by hooking autograd's saved tensors in tests/test_bench.py).
  LoRA adds the adapted layer's input (if not already saved) + r per module;
  with fp32 adapters on a bf16 base (``adapter_dtype``) each adapted module
  saves its own fp32 copy of its input + r, at 4 bytes (checked against
  autograd's saved tensors in tests/test_bench.py);
  DoRA additionally saves the weight-shaped ``W + BA`` (out*in elements, per
  module, independent of tokens). A bottleneck adapter adds h + 2m per
  insertion (Houlsby: 2 per layer, Pfeiffer: 1). Prefix tuning adds p key and
  value positions per layer (2*p*kv_dim per sequence) and widens the eager
  attention matrix to s + p.

Gradient checkpointing keeps only each layer's input (h per token per layer)
plus one layer's activations, recomputed during the backward pass.

Outside the layers: the final norm input (h), the head's input (h, if the head
is trainable), and for a causal LM the logits and the log-softmax output
(2 * vocab per token) and, transiently, the gradient of the logits (vocab per
token). A regularizer's target batch adds its layer activations (no logits). Transient buffers inside the
backward pass and allocator slack are not modelled; the measured/analytic ratio shows them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# bytes per element of each storage dtype name
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
QUANT_BITS = {None: None, "none": None, "4bit": 4, "8bit": 8}
# bytes of optimizer state per trainable parameter; transformers' ``optim`` names too. bitsandbytes'
# 8-bit AdamW keeps both moments in 8 bits with one fp32 absmax per 256-element block and each
# moment (tensors under 4096 elements stay 32-bit: not counted). Paged state counts as on the GPU:
# paging moves it to CPU RAM only under memory pressure.
OPTIMIZER_BYTES = {
    "adamw": 8,
    "adam": 8,
    "sgd": 0,
    "sgdm": 4,
    "adamw_torch": 8,
    "paged_adamw_32bit": 8,
    "adamw_8bit": 2 + 2 * 4 / 256,
    "paged_adamw_8bit": 2 + 2 * 4 / 256,
}
FAMILIES = ("llama", "bert")
METHODS = ("full", "head", "lora", "dora", "houlsby", "pfeiffer", "prefix")

_LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BERT_LINEARS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


@dataclasses.dataclass
class Arch:
    """The few numbers of a transformer that fix its memory."""

    family: str  # "llama" | "bert"
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    head: str = "causal"  # "causal" | "seqcls" | "base"
    num_labels: int = 2
    max_positions: int = 512
    type_vocab: int = 2
    tied_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v
    attn_dropout: float = 0.0  # attention-probability dropout (BERT: 0.1); decides SDPA's CPU kernel

    @classmethod
    def from_config(cls, config: Any, head: str = "causal") -> Arch:
        """Read an ``Arch`` off a transformers config (Llama/Mistral/Qwen2-like or BERT-like)."""
        mt = getattr(config, "model_type", "")
        family = "bert" if mt in ("bert", "roberta", "xlm-roberta", "distilbert", "electra") else "llama"
        if family == "llama" and not hasattr(config, "intermediate_size"):
            raise ValueError(f"unsupported model_type {mt!r} for the analytic model; supported families: {FAMILIES}")
        heads = config.num_attention_heads
        return cls(
            family=family,
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            intermediate=config.intermediate_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            vocab=config.vocab_size,
            head=head,
            num_labels=getattr(config, "num_labels", 2),
            max_positions=getattr(config, "max_position_embeddings", 512),
            type_vocab=getattr(config, "type_vocab_size", 2),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=mt == "qwen2" or bool(getattr(config, "attention_bias", False)),
            attn_dropout=float(
                getattr(config, "attention_probs_dropout_prob", None)
                or getattr(config, "attention_dropout", None)
                or 0.0
            ),
        )

    def sdpa_kernel(self, device: str, training: bool = True) -> str:
        """The attention variant the memory model should count for SDPA on ``device``:
        "math" on the CPU when attention dropout is on in training, else "sdpa"."""
        return "math" if device == "cpu" and training and self.attn_dropout > 0 else "sdpa"

    # -- parameter counts ---------------------------------------------------
    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear layer of one block, by module name."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        if self.family == "llama":
            return {
                "q_proj": (h, h),
                "k_proj": (kv, h),
                "v_proj": (kv, h),
                "o_proj": (h, h),
                "gate_proj": (i, h),
                "up_proj": (i, h),
                "down_proj": (h, i),
            }
        return {
            "query": (h, h),
            "key": (h, h),
            "value": (h, h),
            "attention.output.dense": (h, h),
            "intermediate.dense": (i, h),
            "output.dense": (h, i),
        }

    def layer_linear_params(self) -> int:
        return sum(o * i for o, i in self.linear_shapes().values())

    def layer_other_params(self) -> int:
        """Biases and norm weights of one block."""
        h, i = self.hidden, self.intermediate
        if self.family == "llama":
            bias = (h + 2 * self.kv_dim) if self.qkv_bias else 0
            return 2 * h + bias  # two RMSNorm weights (+ q/k/v biases on Qwen2)
        # biases of q,k,v,o (4h), intermediate (i), output (h); two LayerNorms (4h)
        return 4 * h + i + h + 4 * h

    def head_params(self) -> int:
        h = self.hidden
        if self.head == "causal":
            return 0 if self.tied_embeddings else self.vocab * h
        if self.head == "seqcls":
            if self.family == "bert":
                return h * h + h + self.num_labels * h + self.num_labels  # pooler + classifier
            return self.num_labels * h  # Llama "score", no bias
        if self.head == "base":
            return h * h + h if self.family == "bert" else 0  # BERT AutoModel keeps the pooler
        raise ValueError(f"unknown head {self.head!r}; valid heads: causal, seqcls, base")

    def embedding_params(self) -> int:
        h = self.hidden
        if self.family == "llama":
            return self.vocab * h + h  # token embeddings + final norm
        return (self.vocab + self.max_positions + self.type_vocab) * h + 2 * h  # + embedding LayerNorm

    def total_params(self) -> int:
        return (
            self.embedding_params()
            + self.layers * (self.layer_linear_params() + self.layer_other_params())
            + self.head_params()
        )


def _check(name: str, value: Any, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {sorted(map(str, valid))}")


def weight_bytes(
    arch: Arch, dtype: str = "float32", quant: str | None = None, blocksize: int = 64, double_quant: bool = True
) -> int:
    """Bytes of all weights; with ``quant`` the block linear layers are 4- or 8-bit.

    4-bit: half a byte per weight plus one absmax per ``blocksize`` block, as
    fp32, or with ``double_quant`` (QLoRA's default) as 8 bits plus one fp32
    constant per 256 blocks."""
    _check("dtype", dtype, DTYPE_BYTES)
    _check("quant", quant, QUANT_BITS)
    b = DTYPE_BYTES[dtype]
    lin = arch.layers * arch.layer_linear_params()
    other = arch.total_params() - lin
    bits = QUANT_BITS[quant]
    if bits is None:
        return (lin + other) * b
    if bits == 4:
        blocks = lin / blocksize
        qbytes = lin * 0.5 + (blocks * 1 + blocks / 256 * 4 if double_quant else blocks * 4)
    else:
        rows = arch.layers * sum(o for o, _ in arch.linear_shapes().values())
        qbytes = lin * 1 + rows * 4  # int8 + fp32 scale per output row
    return int(other * b + qbytes)


def default_targets(arch: Arch, method: str) -> tuple[str, ...]:
    """Module names LoRA/DoRA adapt by default in the benchmark: the attention query and value."""
    return ("q_proj", "v_proj") if arch.family == "llama" else ("query", "value")


def trainable_params(
    arch: Arch,
    method: str,
    *,
    r: int = 8,
    targets: tuple[str, ...] | None = None,
    reduction_factor: int = 16,
    prefix_tokens: int = 20,
) -> int:
    """Trainable parameters of ``method`` on ``arch`` (the head is trainable for PEFT on a classifier,
    as peft's ``modules_to_save`` and our wrap do for sequence classification)."""
    _check("method", method, METHODS)
    h, L = arch.hidden, arch.layers
    head = arch.head_params() if arch.head == "seqcls" else 0
    if method == "full":
        return arch.total_params()
    if method == "head":
        return arch.head_params()
    if method in ("lora", "dora"):
        shapes = arch.linear_shapes()
        targets = targets or default_targets(arch, method)
        n = sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)
        if method == "dora":
            n += sum(shapes[t][0] for t in targets)  # magnitude vector
        return L * n + head
    if method in ("houlsby", "pfeiffer"):
        m = max(1, h // reduction_factor)
        per = h * m + m + m * h + h  # down + bias, up + bias
        return L * per * (2 if method == "houlsby" else 1) + head
    # prefix: p virtual tokens x (key + value) x layers; peft stores them as one embedding
    return prefix_tokens * 2 * arch.kv_dim * L + head


def activation_bytes(
    arch: Arch,
    method: str,
    batch: int,
    seq: int,
    *,
    dtype: str = "float32",
    grad_ckpt: bool = False,
    attention: str = "sdpa",
    r: int = 8,
    targets: tuple[str, ...] | None = None,
    reduction_factor: int = 16,
    prefix_tokens: int = 20,
    training: bool = True,
    adapter_dtype: str | None = None,
) -> dict[str, int]:
    """Bytes autograd keeps for the backward pass, split into ``layers`` and ``outside``.

    See the module docstring for the per-token formulas. ``adapter_dtype``: the LoRA/DoRA weights'
    dtype when it differs from ``dtype`` (peft and peftadapt keep adapters in fp32 on a bf16 or
    4-bit base): each adapted module then casts its input to that dtype and saves the copy.
    """
    _check("method", method, METHODS)
    _check("attention", attention, ("sdpa", "eager", "math"))
    b = DTYPE_BYTES[dtype]
    ab = DTYPE_BYTES[adapter_dtype] if adapter_dtype is not None else b
    h, i, a, kv = arch.hidden, arch.intermediate, arch.heads, arch.kv_dim
    tokens = batch * seq
    full = method == "full"
    grad_through_layers = method != "head"

    # -- one layer, per token (elements) --------------------------------------
    layer = 0.0
    if grad_through_layers:
        if arch.family == "llama":
            # Llama's RMSNorm computes on an fp32 copy of its input and saves that copy
            layer = 2 * h * 4 / b + 4 * h + 3 * i
            trainable_inputs = {
                "q_proj": h,
                "k_proj": h,
                "v_proj": h,
                "o_proj": h,
                "gate_proj": h,
                "up_proj": h,
                "down_proj": i,
            }
            groups = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
        else:
            layer = 2 * h + 4 * h + i + (2 * h / b if training else 0)  # dropout masks are 1 byte each
            trainable_inputs = {
                "query": h,
                "key": h,
                "value": h,
                "attention.output.dense": h,
                "intermediate.dense": h,
                "output.dense": i,
            }
            groups = [
                ("query", "key", "value"),
                ("attention.output.dense",),
                ("intermediate.dense",),
                ("output.dense",),
            ]
        kv_extra = 0
        width = seq + (prefix_tokens if method == "prefix" else 0)
        if attention == "eager":
            layer += a * width * (1 + (1 / b if arch.family == "bert" and training else 0))
        elif attention == "math":  # softmax output, dropout scale mask, dropped probabilities
            layer += 3 * a * width
        if full:
            layer += sum(trainable_inputs[g[0]] for g in groups)
        elif method in ("lora", "dora"):
            targets = targets or default_targets(arch, method)
            seen = set()
            for t in targets:
                grp = next(g for g in groups if t in g)
                if ab != b:  # each module saves its own cast copy of the input, and A's output
                    layer += (trainable_inputs[t] + r) * ab / b
                    continue
                if grp not in seen:  # modules of a group read the same input tensor
                    seen.add(grp)
                    layer += trainable_inputs[t]
                layer += r
        elif method in ("houlsby", "pfeiffer"):
            m = max(1, h // reduction_factor)
            layer += (h + 2 * m) * (2 if method == "houlsby" else 1)
        elif method == "prefix":
            kv_extra = 2 * prefix_tokens * kv  # per sequence, per layer
    else:
        kv_extra = 0

    per_layer_bytes = layer * tokens * b + (kv_extra * batch * b if grad_through_layers else 0)
    if grad_through_layers and grad_ckpt:
        layers_bytes = arch.layers * h * tokens * b + per_layer_bytes  # stored inputs + one recomputed layer
    else:
        layers_bytes = arch.layers * per_layer_bytes

    # -- outside the layers ----------------------------------------------------
    outside = 0.0
    head_trainable = full or method == "head" or arch.head == "seqcls"
    if grad_through_layers:
        outside += h * tokens * (4 if arch.family == "llama" else b)  # final norm input (Llama: its fp32 copy)
    if arch.head == "causal":
        if head_trainable or grad_through_layers:
            # logits (the model's output) + log-softmax output; the gradient of the logits is transient
            outside += 3 * arch.vocab * tokens * 4
        if head_trainable:
            outside += h * tokens * b
    elif arch.head == "seqcls":
        outside += h * batch * b * 2  # pooled input to the (pooler and) classifier
    extra_dora = 0
    if method == "dora":
        shapes = arch.linear_shapes()
        targets = targets or default_targets(arch, method)
        extra_dora = sum(shapes[t][0] * shapes[t][1] for t in targets) * b * (1 if grad_ckpt else arch.layers)
    return {"layers": int(layers_bytes + extra_dora), "outside": int(outside)}


def analytic_memory(
    arch: Arch,
    method: str,
    batch: int,
    seq: int,
    *,
    dtype: str = "float32",
    quant: str | None = None,
    grad_ckpt: bool = False,
    optimizer: str = "adamw",
    attention: str = "sdpa",
    trainable: int | None = None,
    regularizer: bool = False,
    adapter_dtype: str | None = None,
    dequant: bool = False,
    **method_options: Any,
) -> dict[str, int]:
    """Predicted peak bytes of one training step, by part, and their ``total``.

    ``trainable`` overrides the predicted trainable-parameter count (pass the
    measured one so that the estimate isolates activations and states).
    With ``regularizer`` a second (target) batch runs through the model in the
    same step, and its layer activations are kept until the backward pass (not
    its logits: the target batch has no task loss).
    ``adapter_dtype``: the dtype of trainable parameters other than a full fine-tune's (fp32 under
    peft and peftadapt on a half-precision or quantized base; default ``dtype``): their gradients
    and the activations of the adapted modules use it.
    ``dequant``: count one dequantized linear weight at ``dtype`` (bitsandbytes dequantizes a
    quantized weight for each matmul, one layer at a time; a transient the measured peaks include).
    """
    _check("optimizer", optimizer, OPTIMIZER_BYTES)
    if batch < 1 or seq < 1:
        raise ValueError(f"batch and seq must be >= 1, got batch={batch}, seq={seq}")
    opts = {k: v for k, v in method_options.items() if k in ("r", "targets", "reduction_factor", "prefix_tokens")}
    n_train = trainable if trainable is not None else trainable_params(arch, method, **opts)
    w = weight_bytes(arch, dtype, quant)
    # trainable parameters live at the compute dtype (or adapter_dtype) even on a quantized base
    grads = n_train * DTYPE_BYTES[adapter_dtype if adapter_dtype is not None and method != "full" else dtype]
    optim = n_train * OPTIMIZER_BYTES[optimizer]
    if method == "full":
        adapter_dtype = None
    act = activation_bytes(
        arch,
        method,
        batch,
        seq,
        dtype=dtype,
        grad_ckpt=grad_ckpt,
        attention=attention,
        adapter_dtype=adapter_dtype,
        **opts,
    )
    acts = act["layers"] + act["outside"]
    if regularizer:
        # the target batch goes through the same layers and is kept for the backward pass of the
        # alignment term; it has no labels, so no logits/log-softmax are kept for it
        acts += act["layers"] + (arch.hidden * batch * seq * DTYPE_BYTES[dtype] if method != "head" else 0)
    deq = max(o * i for o, i in arch.linear_shapes().values()) * DTYPE_BYTES[dtype] if dequant and quant else 0
    out = {
        "weights": int(w),
        "grads": int(grads),
        "optimizer": int(optim),
        "activations": int(acts),
        "total": int(w + grads + optim + acts + deq),
        "trainable": int(n_train),
    }
    if deq:
        out["dequant"] = int(deq)
    return out
