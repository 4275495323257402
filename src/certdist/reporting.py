"""Result tables: collect ``results.json`` files and summarise them as mean +- std over seeds."""
from __future__ import annotations

import json
import math
from pathlib import Path

from certdist.config import RUNTIME_KEYS

METRICS = ("clean_acc", "pgd_acc", "ibp_cert_acc", "train_time_s")


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
    head = ["run", "dataset", "arch", "method", "teacher", "eps", "n", "clean %", "PGD %", "IBP-cert %", "train s"]
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
        cells += [_fmt([float(r[m]) for r in rs if m in r]) for m in METRICS]
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


def plot_diagnosis(run_dirs: list[str | Path], out: str | Path) -> Path:
    """What distillation does during training (issue 11), per epoch and run, from ``metrics.csv``: the
    certified loss against the weighted distillation term; the term's box-centre and box-width parts;
    the student's feature norm and IBP feature-box width against the teacher's feature norm; the
    evaluation split's clean and IBP-certified accuracy. Missing columns (no teacher) are skipped."""
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4))

    def line(ax, ep, rows, key, style, color, label, scale=1.0):
        vals = [(e, scale * float(r[key])) for e, r in zip(ep, rows) if r.get(key) not in (None, "")]
        if vals:
            ax.plot(*zip(*vals), style, color=color, label=label)

    for i, d in enumerate(map(Path, run_dirs)):
        f = d / "metrics.csv"
        if not f.exists():
            raise FileNotFoundError(f"no metrics.csv in {d}")
        rows = list(csv.DictReader(f.open()))
        ep = [int(float(r["epoch"])) for r in rows]
        c = f"C{i % 10}"
        name = d.parent.name if d.name.startswith("seed") else d.name
        line(axes[0], ep, rows, "train_cert_loss", "-", c, f"{name}: certified loss")
        line(axes[0], ep, rows, "train_dist_weighted", "--", c, f"{name}: beta x distillation")
        line(axes[1], ep, rows, "train_dist_centre", "-", c, f"{name}: centre part")
        line(axes[1], ep, rows, "train_dist_width", ":", c, f"{name}: width part")
        line(axes[2], ep, rows, "train_feat_norm", "-", c, f"{name}: student ||h(x_adv)||")
        line(axes[2], ep, rows, "train_teacher_norm", "--", c, f"{name}: teacher ||t||")
        line(axes[2], ep, rows, "train_feat_width", ":", c, f"{name}: student box width x100", scale=100.0)
        line(axes[3], ep, rows, "test_clean", "-", c, f"{name}: clean")
        line(axes[3], ep, rows, "test_ibp_cert", "--", c, f"{name}: IBP-cert")
    titles = ["loss terms (training mean)", "distillation: box centre vs width (unweighted)",
              "feature scale", "evaluation split, first 1000 points %"]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
    for ax in axes[:2]:
        if ax.lines:
            ax.set_yscale("log")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
