"""Which layer and which pooling should a causal LM's alignment read? A probe of the untrained SmolLM2.

From the encoding pass (``encode.py``: the prompt's last-token and mean features at every layer, 0 = embeddings,
30 = final norm), per pair S -> T, layer and pooling:

- ``transfer``: a linear sentiment probe (``peftadapt.validators.fit_logistic``) fit on S's labeled train
  reviews, accuracy on T's test reviews: how much of the sentiment a feature carries across domains;
- ``in-domain``: the same probe's accuracy on S's own test reviews;
- ``A-dist``: proxy A-distance 2(1 - 2 err) of a linear domain classifier (S train vs T train, fit on one half,
  err on the other): how far apart the domains are in that feature (0 = indistinguishable, 2 = separable).

A layer worth aligning carries the sentiment (high in-domain accuracy) and shows a gap (transfer < in-domain,
A-distance > 0) that alignment can close. Writes ``benchmarks/results/causal_da_probe.{json,md}``.

    python -m benchmarks.causal_da.probe
"""

from __future__ import annotations

import json
import os

import torch

from peftadapt.validators import fit_logistic

from .encode import encode_domain
from .run import PAIRS, RESULTS

LAYERS_SHOWN = (0, 5, 10, 15, 20, 24, 26, 27, 28, 29, 30)


def _acc(fit, x, y) -> float:
    return float((fit(x).argmax(1) == y).float().mean())


def probe(pairs=PAIRS, adapt_layers: int = 4) -> dict:
    enc = {d: encode_domain(d, adapt_layers) for d in sorted({d for p in pairs for d in p})}
    out: dict = {}
    for s, t in pairs:
        es, et = enc[s], enc[t]
        for pooling in ("last", "mean"):
            feats_s = es.probe_last if pooling == "last" else es.probe_mean
            feats_t = et.probe_last if pooling == "last" else et.probe_mean
            for layer in range(feats_s.shape[1]):
                xs, xst = feats_s[es.train, layer].float(), feats_s[es.test, layer].float()
                xt, xtt = feats_t[et.train, layer].float(), feats_t[et.test, layer].float()
                clf = fit_logistic(xs, es.labels[es.train], 2, l2=1e-2)
                dom = fit_logistic(torch.cat([xs[::2], xt[::2]]),
                                   torch.cat([torch.zeros(len(xs[::2])), torch.ones(len(xt[::2]))]).long(), 2)
                xd = torch.cat([xs[1::2], xt[1::2]])
                yd = torch.cat([torch.zeros(len(xs[1::2])), torch.ones(len(xt[1::2]))]).long()
                err = 1 - _acc(dom, xd, yd)
                out[f"{s}>{t}|{pooling}|{layer}"] = {
                    "transfer": _acc(clf, xtt, et.labels[et.test]),
                    "in_domain": _acc(clf, xst, es.labels[es.test]),
                    "a_distance": 2 * (1 - 2 * err),
                }
    return out


def table(res: dict, pairs=PAIRS) -> str:
    lines = [
        "| pair | pooling | " + " | ".join(f"L{k}" for k in LAYERS_SHOWN) + " |",
        "|---|---|" + "---|" * len(LAYERS_SHOWN),
    ]
    for s, t in pairs:
        for pooling in ("last", "mean"):
            row = []
            for k in LAYERS_SHOWN:
                c = res[f"{s}>{t}|{pooling}|{k}"]
                row.append(f"{100 * c['transfer']:.1f} / {100 * c['in_domain']:.1f} / {c['a_distance']:.2f}")
            lines.append(f"| {s} → {t} | {pooling} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
    res = probe()
    (RESULTS / "causal_da_probe.json").write_text(json.dumps(res, indent=1, sort_keys=True))
    md = [
        "# Layer / pooling probe of the untrained SmolLM2-135M-Instruct (`python -m benchmarks.causal_da.probe`)",
        "",
        (
            "Each cell: transfer accuracy % (linear sentiment probe fit on the source, scored on the target test) / "
            "in-domain accuracy % (the same probe on the source test) / proxy A-distance of the domains (0..2). "
            "L0 = embeddings, L30 = the final norm (the LM head's input)."
        ),
        "",
        table(res),
    ]
    (RESULTS / "causal_da_probe.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
