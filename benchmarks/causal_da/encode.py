"""Chat prompts for the causal-LM sentiment study, and the frozen trunk's output cached once per review.

Each review becomes one chat (the model's own template, so SmolLM2's default system turn is there too):

    user:      "Review: <first 64 tokens of the review>\n\nIs this review positive or negative? Answer with one word."
    assistant: "positive" | "negative"

The bottom ``30 - adapt_layers`` decoder blocks of SmolLM2-135M-Instruct carry no adapter and stay frozen, so
their output is computed once per review and cached (``~/.cache/peftadapt-causal-da``; ``CAUSAL_DA_CACHE``
overrides); training runs only the top blocks. The same pass keeps, per review:

- the zero-shot answer scores (the untrained model's logits of the two answer tokens at the last prompt
  position): the "zero-shot" row of the table;
- the prompt's last-token and mean features at EVERY layer (0 = embeddings .. 30 = final norm), for the
  layer probe that backs the default feature layer and pooling (``python -m benchmarks.causal_da.probe``).

Each cached row is the whole chat, prompt + true answer; whoever uses a review as unlabeled TARGET text cuts it
at ``prompt_len`` (attention mask 0 from there on). With causal attention the prompt positions never see the
answer, so the cut rows are exactly the prompt-only rows (checked in ``check_prompt_cut``).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.amazon.data import load_split

QUESTION = "Is this review positive or negative? Answer with one word."
ANSWERS = ("negative", "positive")  # label 0, label 1
REVIEW_TOKENS = 64


def model_dir() -> str:
    """SmolLM2-135M-Instruct converted to a transformers folder (``examples/convert_smollm2.py``)."""
    for cand in (os.environ.get("SMOLLM2_DIR"), "examples/data/smollm2-135m", "/work/models/smollm2-135m"):
        if cand and (Path(cand) / "config.json").exists():
            return str(cand)
    raise FileNotFoundError(
        "SmolLM2-135M-Instruct not found: run `python examples/convert_smollm2.py` (or set SMOLLM2_DIR)"
    )


def cache_dir() -> Path:
    d = Path(os.environ.get("CAUSAL_DA_CACHE", Path.home() / ".cache" / "peftadapt-causal-da"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def messages(review: str, tok) -> list[dict]:
    ids = tok(review, add_special_tokens=False)["input_ids"][:REVIEW_TOKENS]
    return [{"role": "user", "content": f"Review: {tok.decode(ids).strip()}\n\n{QUESTION}"}]


def answer_ids(tok) -> list[int]:
    ids = [tok(a, add_special_tokens=False)["input_ids"] for a in ANSWERS]
    if any(len(i) != 1 for i in ids) or ids[0] == ids[1]:
        raise ValueError(f"answers {ANSWERS} must each be one distinct token, got {ids}")
    return [i[0] for i in ids]


@dataclass
class Encoded:
    hidden: torch.Tensor      # (N, L, d) fp16: output of the last frozen block, prompt + true answer
    mask: torch.Tensor        # (N, L) attention mask of prompt + answer (right padding)
    input_ids: torch.Tensor   # (N, L)
    prompt_len: torch.Tensor  # (N,) tokens of the prompt (generation prompt included)
    labels: torch.Tensor      # (N,) 1 = positive
    zero_shot: torch.Tensor   # (N, 2) untrained logits of (negative, positive) at the last prompt position
    probe_last: torch.Tensor  # (N, layers+1, d) fp16 prompt last-token feature per layer
    probe_mean: torch.Tensor  # (N, layers+1, d) fp16 prompt mean feature per layer
    train: torch.Tensor       # indices of the train subset (balanced)
    test: torch.Tensor        # indices of the 400 test reviews

    def answer_labels(self) -> torch.Tensor:
        """Token labels for answer-only loss: the answer token and the <|im_end|> after it; -100 elsewhere."""
        lab = torch.full_like(self.input_ids, -100)
        rows = torch.arange(len(lab))
        for off in (0, 1):
            lab[rows, self.prompt_len + off] = self.input_ids[rows, self.prompt_len + off]
        return lab


def _subset(reviews, n_per_class: int, seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for label in (0, 1):
        rs = [r for r in reviews if r.label == label]
        rng.shuffle(rs)
        out += rs[:n_per_class]
    return out


def encode_domain(domain: str, adapt_layers: int, n_train_per_class: int = 400, log=print) -> Encoded:
    """The cached encoding of ``domain`` (computed once, then read from the cache)."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / f"{domain}_top{adapt_layers}_n{n_train_per_class}_r{REVIEW_TOKENS}.safetensors"
    split = load_split(domain)
    train = _subset(split.train, n_train_per_class, seed=17)
    reviews = train + list(split.test)
    if not path.exists():
        t = _run_trunk(reviews, adapt_layers, log=log, what=domain)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in t.items()}, str(tmp))
        os.replace(tmp, path)
    t = load_file(str(path))
    n = len(train)
    return Encoded(
        t["hidden"], t["mask"].long(), t["input_ids"].long(), t["prompt_len"].long(), t["labels"].long(),
        t["zero_shot"].float(), t["probe_last"], t["probe_mean"], torch.arange(n), torch.arange(n, len(reviews)),
    )


@torch.no_grad()
def _run_trunk(reviews, adapt_layers: int, log=print, what: str = "", bs: int = 16) -> dict:
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir())
    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32).eval()
    n_layers = model.config.num_hidden_layers
    frozen = n_layers - adapt_layers
    ans = answer_ids(tok)
    rows, plens = [], []
    for r in reviews:
        msg = messages(r.text, tok)
        prompt = tok.apply_chat_template(msg, tokenize=True, add_generation_prompt=True)
        prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
        full = tok.apply_chat_template([*msg, {"role": "assistant", "content": ANSWERS[r.label]}], tokenize=True)
        full = full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full
        if full[: len(prompt)] != prompt or full[len(prompt)] != ans[r.label]:
            raise RuntimeError("the chat template does not render the prompt as a prefix of prompt + answer")
        rows.append(full)
        plens.append(len(prompt))
    length = max(len(x) for x in rows)
    pad = tok.pad_token_id
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, x in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    plen = torch.tensor(plens)
    d = model.config.hidden_size
    hidden = torch.empty(len(rows), length, d, dtype=torch.float16)
    probe_last = torch.empty(len(rows), n_layers + 1, d, dtype=torch.float16)
    probe_mean = torch.empty_like(probe_last)
    zero_shot = torch.empty(len(rows), 2)
    w_ans = model.get_output_embeddings().weight[ans]  # (2, d)
    t0 = time.time()
    for s in range(0, len(rows), bs):
        sl = slice(s, s + bs)
        t = int(mask[sl].sum(1).max())
        out = model.model(input_ids=ids[sl, :t], attention_mask=mask[sl, :t], output_hidden_states=True)
        hs = out.hidden_states  # embeddings, block 1 .. block n (the last one after the final norm)
        hidden[sl, :t] = hs[frozen].half()
        hidden[sl, t:] = 0
        r = torch.arange(hs[0].shape[0])
        last = plen[sl] - 1
        pmask = (torch.arange(t)[None, :] < plen[sl, None]).float().unsqueeze(-1)
        for k, h in enumerate(hs):
            probe_last[sl, k] = h[r, last].half()
            probe_mean[sl, k] = ((h * pmask).sum(1) / pmask.sum(1)).half()
        zero_shot[sl] = hs[-1][r, last] @ w_ans.T
        if (s // bs) % 10 == 0:
            log(f"  encode {what}: {s + bs}/{len(rows)} reviews, {time.time() - t0:.0f}s")
    labels = torch.tensor([r.label for r in reviews])
    return {
        "hidden": hidden, "mask": mask.to(torch.int8), "input_ids": ids.to(torch.int32), "prompt_len": plen,
        "labels": labels, "zero_shot": zero_shot, "probe_last": probe_last, "probe_mean": probe_mean,
    }


def prompt_only(enc: Encoded, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden, mask, input_ids) of reviews ``idx`` cut at the prompt (the answer masked out), padding trimmed."""
    pl = enc.prompt_len[idx]
    t = int(pl.max())
    mask = (torch.arange(t)[None, :] < pl[:, None]).long()
    return enc.hidden[idx, :t].float(), mask, enc.input_ids[idx, :t] * mask + (1 - mask) * 2


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="encode the study's domains once (the trunk cache)")
    ap.add_argument("--domains", nargs="+", default=["books", "kitchen", "electronics"])
    ap.add_argument("--adapt-layers", type=int, default=4)
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
    for dom in a.domains:
        e = encode_domain(dom, a.adapt_layers, log=lambda m: print(m, flush=True))
        zs = (e.zero_shot[e.test].argmax(1) == e.labels[e.test]).float().mean()
        print(f"{dom}: {len(e.train)} train + {len(e.test)} test, L={e.hidden.shape[1]}, zero-shot test acc {zs:.3f}",
              flush=True)
