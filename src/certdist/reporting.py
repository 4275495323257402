"""Result tables: collect ``results.json`` files and summarise them as mean +- std over seeds."""
from __future__ import annotations

import json
import math
from pathlib import Path

from certdist.config import RUNTIME_KEYS

METRICS = ("clean_acc", "robust_acc", "ibp_cert_acc", "train_time_s")
ATTACK_LABELS = {"pgd": "PGD", "apgd": "APGD", "autoattack": "AutoAttack", "none": "none"}


def _metric(r: dict, m: str):
    if m == "robust_acc" and m not in r:  # results written before the attack was named
        return r.get("pgd_acc")
    return r.get(m)


def _attack_label(r: dict) -> str:
    a = r.get("attack", "pgd" if "pgd_acc" in r else None)
    if a is None:
        return "-"
    label = ATTACK_LABELS.get(a, a)
    steps = (r.get("attack_settings") or {}).get("steps", r.get("pgd_steps"))
    return f"{label}-{steps}" if a in ("pgd", "apgd") and steps is not None else label


def collect(paths: list[str | Path]) -> list[dict]:
    rows = []
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(p.rglob("results.json"))
        if not files:
            raise FileNotFoundError(f"no results.json under {p}")
        for f in files:
            r = json.loads(f.read_text())
            r["run"] = str(f.parent)
            rows.append(r)
    return rows


def _group_key(r: dict) -> tuple:
    teacher = "yes" if r.get("teacher") else "-"
    return (r.get("config", {}).get("name", "?"), r.get("dataset"), r.get("arch"), r.get("method"), teacher,
            r.get("eps"))


def _settings(r: dict) -> str:
    """The run's settings without seed and runtime keys, to detect groups that mix settings."""
    skip = RUNTIME_KEYS | {"seed"}
    return json.dumps({k: v for k, v in r.get("config", {}).items() if k not in skip}, sort_keys=True)


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{m:.2f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return f"{m:.2f} ± {sd:.2f}"


def format_table(rows: list[dict], group: bool = True) -> str:
    """A Markdown table; with ``group``, one row per run name (the seeds of one setting) with the
    mean and sample standard deviation over its runs; a group whose runs differ in more than the seed
    is marked "mixed settings"."""
    head = ["run", "dataset", "arch", "method", "teacher", "eps", "n", "clean %", "attack", "robust %", "IBP-cert %",
            "train s"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = _group_key(r) if group else _group_key(r) + (r.get("run", id(r)),)
        groups.setdefault(key, []).append(r)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, rs in groups.items():
        n = f"{len(rs)}" + (" seeds" if group and len(rs) > 1 else "")
        if len({_settings(r) for r in rs}) > 1:
            n += " (mixed settings!)"
        cells = [str(v) for v in key[:6]] + [n]
        vals = [_fmt([float(_metric(r, m)) for r in rs if _metric(r, m) is not None]) for m in METRICS]
        cells += vals[:1] + [", ".join(sorted({_attack_label(r) for r in rs}))] + vals[1:]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Training curves of runs (``metrics.csv``): test clean and IBP-certified accuracy, training eps
    and loss per epoch, one line per run. Saved as an image (PNG, PDF or SVG by extension)."""
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for i, d in enumerate(map(Path, run_dirs)):
        color = f"C{i % 10}"
        f = d / "metrics.csv"
        if not f.exists():
            raise FileNotFoundError(f"no metrics.csv in {d}")
        rows = list(csv.DictReader(f.open()))
        ep = [int(float(r["epoch"])) for r in rows]
        label = f"{d.parent.name}/{d.name}" if d.name.startswith("seed") else d.name
        axes[0].plot(ep, [float(r["test_clean"]) for r in rows], color=color, label=f"{label} clean")
        axes[0].plot(ep, [float(r["test_ibp_cert"]) for r in rows], "--", color=color, label=f"{label} IBP-cert")
        axes[1].plot(ep, [float(r["eps"]) for r in rows], color=color, label=label)
        axes[2].plot(ep, [float(r["train_loss"]) for r in rows], color=color, label=label)
    for ax, title in zip(axes, ["test accuracy % (first 1000 points)", "training eps", "training loss"]):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].set_yscale("log")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
