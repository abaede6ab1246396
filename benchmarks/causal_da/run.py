"""Domain adaptation for a causal LM: does aligning to unlabeled target text help an instruction-tuned model?

SmolLM2-135M-Instruct answers "positive" or "negative" to a review in a chat turn (``encode.py``). Training:
LoRA (r 8) on the attention projections (q, k, v, o) of the top ``adapt_layers`` decoder blocks, answer-only loss
(the answer token and the ``<|im_end|>`` after it). Unsupervised adaptation for a pair S -> T: labeled S chats +
unlabeled T prompts (the user turn + generation prompt, no answer); the score is accuracy on T's 400 test reviews,
the answer whose token has the higher log-likelihood at the end of the prompt. Nothing trains or selects on them.

One cell = pair x regularizer x seed:

    warm-up : W source-only steps (cached per source and seed, shared by every target and regularizer)
    adapt   : A more steps, loss = L_answer(S) + lambda * D(S, T); source-only runs the same A steps alone

Regularizers, each one ``peftadapt.align.Term`` through ``peftadapt.align.DomainAdaptation`` (the object every
peftadapt trainer calls), on the prompt's features at the final norm (the LM head's input):

- ``mmd`` (last-token pooling), ``mmd-mean`` (mean pooling over the prompt), ``coral`` (last token);
- ``entropy``: information maximisation on the two answers' logits at the end of the target prompt;
- ``target_lm``: the UDALM-style mixed objective, the model's own next-token loss on the target prompts.

Weights without target labels, one rule for all: lambda = 0.5 * L_answer / |D| measured on the warm-up model over
4 source / target batches (so the term starts at half the task loss), clamped to [1e-3, 1e3]; no grid, nothing
read from target labels.

Speed on 2 CPU cores: the bottom blocks are frozen and carry no adapter, so their output is computed once per
review (``encode.py``); only the top blocks, the final norm and the answer rows of the LM head run while training.

Usage::

    python -m benchmarks.causal_da.encode                      # the trunk cache, once (~10 min)
    nohup python -m benchmarks.causal_da.run > benchmarks/results/causal_da.log 2>&1 &
    python -m benchmarks.causal_da.report                      # table
    python -m benchmarks.causal_da.probe                       # layer / pooling probe of the untrained model

Cells are written one by one (atomic JSON rewrite) to ``benchmarks/results/causal_da.json``; a rerun skips
finished cells (resumable per cell).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutput

import peftadapt
from benchmarks.amazon.run import _atomic_save, _Sampler, _save_results
from peftadapt.align import DomainAdaptation, Term

from .encode import Encoded, answer_ids, cache_dir, encode_domain, model_dir, prompt_only

RESULTS = Path(__file__).resolve().parents[1] / "results"
REGULARIZERS = ("mmd", "mmd-mean", "coral", "entropy", "target_lm")
# one near pair (kitchen -> electronics) and one far pair (books -> kitchen), as in the MiniLM quick profile
PAIRS = [("books", "kitchen"), ("kitchen", "electronics")]


@dataclass
class Profile:
    pairs: list = field(default_factory=lambda: list(PAIRS))
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    regs: list = field(default_factory=lambda: list(REGULARIZERS))
    adapt_layers: int = 4
    batch: int = 8  # per domain
    warmup_steps: int = 100
    adapt_steps: int = 60
    learning_rate: float = 1e-3
    lora_r: int = 8
    balance: float = 0.5  # lambda = balance * L_answer / |D| at the start of adaptation


class TopLM(nn.Module):
    """SmolLM2's top ``k`` blocks + final norm + LM head, LoRA on their attention, over the cached trunk.

    ``forward(hidden, attention_mask, labels=None, input_ids=None)`` returns a ``CausalLMOutput`` whose
    ``loss`` is the mean next-token cross-entropy over the positions ``labels`` marks (answer-only for the
    source; every token when the ``target_lm`` term passes the target's own ids) and whose ``logits`` are the
    two answers' logits at the end of the prompt, (B, 2) in label order: the class logits that the entropy
    term reads and the prediction. Only the rows of the LM head that are needed are computed.
    """

    def __init__(self, prof: Profile):
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32)
        n = hf.config.num_hidden_layers
        hf.model.layers = nn.ModuleList(list(hf.model.layers)[n - prof.adapt_layers :])
        hf.config.num_hidden_layers = prof.adapt_layers
        hf.config.use_cache = False
        self.net = peftadapt.wrap(
            hf,
            "lora",
            r=prof.lora_r,
            alpha=2 * prof.lora_r,
            dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        )
        self.hf = peftadapt.base_model(self.net)
        self.register_buffer("answers", torch.tensor(answer_ids(AutoTokenizer.from_pretrained(model_dir()))))

    @property
    def norm(self) -> nn.Module:
        return self.hf.model.norm

    def forward(self, hidden, attention_mask, labels=None, input_ids=None) -> CausalLMOutput:
        h = self.hf.model(inputs_embeds=hidden, attention_mask=attention_mask).last_hidden_state
        w = self.hf.get_output_embeddings().weight
        rows = torch.arange(h.shape[0], device=h.device)
        if labels is not None and bool((labels[:, 0] == -100).all()) and bool((labels != -100).any(1).all()):
            first = (labels != -100).int().argmax(1)  # answer-only labels: the prompt ends right before
            loss_on = labels
        else:
            first = attention_mask.sum(1)  # right padding: the prompt is every attended token
            loss_on = labels
        logits = h[rows, first - 1] @ w[self.answers].T
        loss = None
        if loss_on is not None:
            tgt = loss_on[:, 1:]
            sel = tgt != -100
            token_logits = h[:, :-1][sel] @ w.T
            loss = F.cross_entropy(token_logits.float(), tgt[sel])
        return CausalLMOutput(loss=loss, logits=logits)

    def trainable_state(self) -> dict:
        return {k: v.detach().clone() for k, v in self.named_parameters() if v.requires_grad}


def source_batch(enc: Encoded, idx: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """(batch with answer-only labels, the prompt mask that source features are pooled over)."""
    t = int(enc.mask[idx].sum(1).max())
    mask = enc.mask[idx, :t]
    labels = enc.answer_labels()[idx, :t]
    prompt_mask = (torch.arange(t)[None, :] < enc.prompt_len[idx, None]).long()
    return {"hidden": enc.hidden[idx, :t].float(), "attention_mask": mask, "labels": labels}, prompt_mask


def target_batch(enc: Encoded, idx: torch.Tensor) -> dict:
    """Unlabeled target prompts (cut before the answer; the label is never read)."""
    h, m, ids = prompt_only(enc, idx)
    return {"hidden": h, "attention_mask": m, "input_ids": ids}


def build_da(model: TopLM, reg: str, weight: float) -> DomainAdaptation:
    name = "mmd" if reg == "mmd-mean" else reg
    r = peftadapt.align.build("entropy", diversity=True) if name == "entropy" else peftadapt.align.build(name)
    pooling = "mean" if reg == "mmd-mean" else "last"
    # causal_lm=False for entropy: TopLM's .logits are the two answers' logits (class logits), not per token
    return DomainAdaptation(
        model, [Term(r, weight=weight, name=name)], layer=model.norm, pooling=pooling, causal_lm=reg != "entropy"
    )


def train_steps(
    model: TopLM,
    src: Encoded,
    steps: int,
    prof: Profile,
    seed: int,
    tgt: Encoded | None = None,
    da: DomainAdaptation | None = None,
) -> dict:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=prof.learning_rate, weight_decay=0.0)
    s_samp = _Sampler(src.train, prof.batch, seed)
    t_samp = _Sampler(tgt.train, prof.batch, seed + 7) if tgt is not None else None
    model.train()
    task_sum, reg_sum = 0.0, 0.0
    for step in range(steps):
        sb, pmask = source_batch(src, s_samp.next())
        out = model(**sb)
        loss = out.loss
        if da is not None:
            reg, _ = da.alignment_loss(out, pmask, target_batch(tgt, t_samp.next()), step / max(1, steps - 1))
            reg_sum += float(reg.detach())
            loss = loss + reg
        task_sum += float(out.loss.detach())
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"task": task_sum / max(1, steps), "reg": reg_sum / max(1, steps)}


@torch.no_grad()
def balance_weight(model: TopLM, reg: str, src: Encoded, tgt: Encoded, prof: Profile, seed: int) -> float:
    """lambda = balance * L_answer / |D| on 4 source / target batches of the warm-up model (no target label)."""
    da = build_da(model, reg, 1.0)
    model.eval()
    s_samp, t_samp = _Sampler(src.train, prof.batch, seed + 99), _Sampler(tgt.train, prof.batch, seed + 98)
    task, raw = [], []
    try:
        for _ in range(4):
            sb, pmask = source_batch(src, s_samp.next())
            out = model(**sb)
            _, logs = da.alignment_loss(out, pmask, target_batch(tgt, t_samp.next()), 0.0)
            task.append(float(out.loss))
            raw.append(float(logs[f"reg/{da.alignment.members[0].name}"]))
    finally:
        da.remove()
    d = abs(sum(raw) / len(raw))
    return float(min(1e3, max(1e-3, prof.balance * (sum(task) / len(task)) / max(d, 1e-12))))


@torch.no_grad()
def evaluate(model: TopLM, enc: Encoded, idx: torch.Tensor, bs: int = 32) -> dict:
    model.eval()
    preds = []
    for s in range(0, len(idx), bs):
        b = target_batch(enc, idx[s : s + bs])
        preds.append(model(hidden=b["hidden"], attention_mask=b["attention_mask"]).logits.argmax(1))
    pred = torch.cat(preds)
    return {"acc": float((pred == enc.labels[idx]).float().mean()), "pos_frac": float(pred.float().mean())}


def warm_model(prof: Profile, enc: dict, source: str, seed: int) -> TopLM:
    torch.manual_seed(1000 + seed)
    model = TopLM(prof)
    key = f"{prof.adapt_layers}_{prof.batch}_{prof.warmup_steps}_{prof.learning_rate}_{prof.lora_r}"
    path = cache_dir() / f"warm_{source}_s{seed}_{key}.safetensors"
    if path.exists():
        from safetensors.torch import load_file

        bad = model.load_state_dict(load_file(str(path)), strict=False).unexpected_keys
        if bad:
            raise RuntimeError(f"warm-up checkpoint {path} does not fit: {bad[:4]}")
        return model
    train_steps(model, enc[source], prof.warmup_steps, prof, seed)
    _atomic_save(model.trainable_state(), path)
    return model


def run(prof: Profile, out: Path, log=print) -> dict:
    results = json.loads(out.read_text()) if out.exists() else {}
    cells = results.setdefault("cells", {})
    cmds = results.get("meta", {}).get("commands", [])
    env = " ".join(f"{k}={os.environ[k]}" for k in ("TORCH_THREADS",) if k in os.environ)
    cmd = f"{env} python -m benchmarks.causal_da.run {' '.join(sys.argv[1:])}".strip()
    # the study's design (every process of it runs a --pairs / --seeds / --regs slice of the default)
    design = {**asdict(prof), "pairs": Profile().pairs, "seeds": Profile().seeds, "regs": Profile().regs}
    results["meta"] = {
        "profile": design,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "commands": list(dict.fromkeys([*cmds, cmd])),
    }
    enc = {d: encode_domain(d, prof.adapt_layers) for d in sorted({d for p in prof.pairs for d in p})}
    for s, t in prof.pairs:  # zero-shot: the untrained model (from the encoding pass)
        e = enc[t]
        pred = e.zero_shot[e.test].argmax(1)
        cells[f"{s}>{t}|zero-shot|-"] = {
            "acc": float((pred == e.labels[e.test]).float().mean()),
            "pos_frac": float(pred.float().mean()),
        }
    _save_results(results, out)
    for seed in prof.seeds:
        for source in dict.fromkeys(s for s, _ in prof.pairs):
            targets = [t for s, t in prof.pairs if s == source]
            keys = [f"{source}>{t}|source-only|{seed}" for t in targets]
            if not all(k in cells for k in keys):
                t0 = time.time()
                model = warm_model(prof, enc, source, seed)
                torch.manual_seed(2000 + seed)
                stats = train_steps(model, enc[source], prof.adapt_steps, prof, seed + 1)
                for t, k in zip(targets, keys, strict=True):
                    cells[k] = {
                        **evaluate(model, enc[t], enc[t].test),
                        "task": stats["task"],
                        "seconds": time.time() - t0,
                    }
                    log(f"{k}: {cells[k]}")
                _save_results(results, out)
            for target in targets:
                for reg in prof.regs:
                    k = f"{source}>{target}|{reg}|{seed}"
                    if k in cells:
                        continue
                    t0 = time.time()
                    model = warm_model(prof, enc, source, seed)
                    w = balance_weight(model, reg, enc[source], enc[target], prof, seed)
                    torch.manual_seed(2000 + seed)
                    da = build_da(model, reg, w)
                    try:
                        stats = train_steps(model, enc[source], prof.adapt_steps, prof, seed + 1, enc[target], da)
                        cell = {**evaluate(model, enc[target], enc[target].test), **stats, "weight": w}
                    except FloatingPointError as e:
                        cell = {"acc": float("nan"), "error": str(e), "weight": w}
                    finally:
                        da.remove()
                    cell["seconds"] = time.time() - t0
                    cells[k] = cell
                    _save_results(results, out)
                    log(f"{k}: {cell}")
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(RESULTS / "causal_da.json"))
    ap.add_argument("--regs", nargs="+", choices=(*REGULARIZERS, "none"), default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument("--pairs", nargs="+", default=None, help="e.g. books:kitchen")
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--adapt-steps", type=int, default=None)
    ap.add_argument("--adapt-layers", type=int, default=None)
    args = ap.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
    prof = Profile()
    if args.regs is not None:
        prof.regs = [] if args.regs == ["none"] else args.regs
    for name in ("seeds", "warmup_steps", "adapt_steps", "adapt_layers"):
        if getattr(args, name) is not None:
            setattr(prof, name, getattr(args, name))
    if args.pairs:
        prof.pairs = [tuple(p.split(":")) for p in args.pairs]
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:7.0f}s] {msg}", flush=True)

    run(prof, Path(args.out), log)
    log("done")


if __name__ == "__main__":
    main()
