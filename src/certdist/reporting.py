"""Result tables: collect ``results.json`` files and summarise them as mean +- std over seeds."""
from __future__ import annotations

import json
import math
from pathlib import Path

from certdist.config import RUNTIME_KEYS
from certdist.threats import format_eps

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
        if not p.exists():
            raise FileNotFoundError(f"no such file or folder: {p}")
        if not files:
            raise FileNotFoundError(f"no finished run (results.json) under {p}")
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
        cells = [str(v) for v in key[:5]] + [format_eps(key[5]) if isinstance(key[5], (int, float)) else str(key[5]), n]
        vals = [_fmt([float(_metric(r, m)) for r in rs if _metric(r, m) is not None]) for m in METRICS]
        cells += vals[:1] + [", ".join(sorted({_attack_label(r) for r in rs}))] + vals[1:]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_folders(paths: list[str | Path]) -> list[Path]:
    """The run folders (holding ``metrics.csv``) given or found under the given parent folders."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no such folder: {p}")
        found = [p] if (p / "metrics.csv").is_file() else sorted(f.parent for f in p.rglob("metrics.csv"))
        if not found:
            raise FileNotFoundError(f"no run (metrics.csv) under {p}")
        out += [d for d in found if d not in out]
    return out


def _label(d: Path) -> str:
    return f"{d.parent.name}/{d.name}" if d.name.startswith("seed") else d.name


def plot_figure(run_dirs: list[str | Path]):
    """The figure of :func:`plot_runs`: four panels (test accuracy curves, training eps, training loss,
    and the clean-vs-certified trade-off of the runs' last epochs), integer epoch ticks."""
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    dirs = run_folders(run_dirs)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for i, d in enumerate(dirs):
        color = f"C{i % 10}"
        rows = list(csv.DictReader((d / "metrics.csv").open()))
        if not rows:
            continue
        ep = [int(float(r["epoch"])) for r in rows]
        label = _label(d)
        prefix = eval_prefix(rows[0])
        if prefix:
            axes[0].plot(ep, [float(r[f"{prefix}_clean"]) for r in rows], color=color,
                         label=f"{label} {prefix} clean")
            axes[0].plot(ep, [float(r[f"{prefix}_ibp_cert"]) for r in rows], "--", color=color,
                         label=f"{label} {prefix} IBP-cert")
        axes[1].plot(ep, [float(r["eps"]) for r in rows], color=color, label=label)
        axes[2].plot(ep, [float(r["train_loss"]) for r in rows], color=color, label=label)
        clean, cert = _final_point(d, rows)
        if clean is not None:
            axes[3].scatter([cert], [clean], color=color, label=label)
            axes[3].annotate(label, (cert, clean), fontsize=7, xytext=(3, 3), textcoords="offset points")
    titles = ["evaluation split accuracy % (first 1000 points)", "training eps", "training loss",
              "trade-off: clean vs IBP-certified % (final)"]
    for k, (ax, title) in enumerate(zip(axes, titles)):
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if k < 3:
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[3].set_xlabel("IBP-certified accuracy %")
    axes[3].set_ylabel("clean accuracy %")
    if axes[0].lines:
        axes[0].legend(fontsize=7)
    if axes[2].lines:
        axes[2].set_yscale("log")
    fig.tight_layout()
    return fig


def _final_point(d: Path, rows: list[dict]) -> tuple[float | None, float | None]:
    """(clean, IBP-certified) accuracy of a run: results.json when finished, else its last epoch."""
    f = d / "results.json"
    if f.is_file():
        r = json.loads(f.read_text())
        if "clean_acc" in r and "ibp_cert_acc" in r:
            return float(r["clean_acc"]), float(r["ibp_cert_acc"])
    prefix = eval_prefix(rows[-1]) if rows else None
    if prefix:
        return float(rows[-1][f"{prefix}_clean"]), float(rows[-1][f"{prefix}_ibp_cert"])
    return None, None


def eval_prefix(row: dict) -> str | None:
    """The evaluation split's column prefix of a ``metrics.csv`` row: ``val`` (``eval.split=validation``) or
    ``test``; None when the run evaluated nothing per epoch."""
    for prefix in ("val", "test"):
        if row.get(f"{prefix}_clean") not in (None, ""):
            return prefix
    return None


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Training curves of runs (``metrics.csv``; run folders or parent folders) and their clean-vs-certified
    trade-off, saved as an image (PNG, PDF or SVG by extension)."""
    import matplotlib.pyplot as plt
    fig = plot_figure(run_dirs)
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
        prefix = eval_prefix(rows[-1]) if rows else None
        if prefix:
            line(axes[3], ep, rows, f"{prefix}_clean", "-", c, f"{name}: {prefix} clean")
            line(axes[3], ep, rows, f"{prefix}_ibp_cert", "--", c, f"{name}: {prefix} IBP-cert")
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
