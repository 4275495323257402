"""Result tables and plots: collect ``results.json`` files (and the certify / AutoAttack results beside them)
and summarise them as mean +- std over the seeds of each distinct setting."""
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
    """The ``results.json`` of every run given or found under the given folders, each with ``run`` (its
    folder) and the run folder's verification results at the run's eps (see :func:`run_extras`):
    ``pipeline`` (certify_*.jsonl, shards merged) and ``autoattack_eval`` (an AutoAttack evaluation)."""
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
            r |= run_extras(f.parent, run_eps(r), r)
            rows.append(r)
    return rows


def run_eps(r: dict) -> float | None:
    """The test eps of a run's results (its evaluation's, else its config's)."""
    from certdist.threats import parse_eps
    eps = r.get("eps", (r.get("config") or {}).get("eps"))
    try:
        return None if eps is None else parse_eps(eps)
    except ValueError:
        return None


def _same_eps(a, b) -> bool:
    try:
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return False


def _read_json(f: Path):
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def pipeline_result(run: str | Path, eps: float | None) -> dict | None:
    """The verification pipeline's result in a run folder at ``eps``: the ``certify*.jsonl`` files
    (``certify`` writes ``certify_eps<eps>[_shard<i>of<n>].jsonl``, ``reproduce`` ``certify_test<n>.jsonl``; the
    shards of one file are merged), else a saved summary (``certify*.json``); of several, the one with
    the most points. ``{"certified_acc", "clean_acc", "attack_acc" (%), "n", "unknown", "file"}`` or None."""
    import re

    from certdist.verification.certify import read_records, summarize
    run = Path(run)
    groups: dict[str, list[dict]] = {}
    for f in sorted(run.glob("certify*.jsonl")):
        base = re.sub(r"_shard\d+of\d+(?=\.jsonl$)", "", f.name)
        try:
            recs = read_records(f)
        except ValueError:
            continue
        groups.setdefault(base, []).extend(r for r in recs if _same_eps(r.get("eps"), eps))
    best = None
    for base, recs in groups.items():
        by_index = {r["index"]: r for r in recs if "index" in r and "status" in r}
        if by_index:
            summ = summarize(by_index[i] for i in sorted(by_index))
            if best is None or summ["n"] > best[1]["n"]:
                best = (base, summ)
    if best is None:  # summaries only (e.g. copied from a cluster without the per-point files)
        for f in sorted(run.glob("certify*.json")):
            summ = _read_json(f)
            if (isinstance(summ, dict) and {"n", "counts", "certified_accuracy"} <= set(summ) and summ["n"]
                    and _same_eps(summ.get("eps"), eps) and (best is None or summ["n"] > best[1]["n"])):
                best = (f.name, summ)
    if best is None:
        return None
    base, summ = best
    pct = lambda k: None if summ.get(k) is None else 100.0 * summ[k]  # noqa: E731
    return {"certified_acc": pct("certified_accuracy"), "clean_acc": pct("clean_accuracy"),
            "attack_acc": pct("attack_accuracy"), "n": int(summ["n"]),
            "unknown": int((summ.get("counts") or {}).get("unknown", 0)), "file": base}


def autoattack_result(run: str | Path, eps: float | None, results: dict | None = None) -> dict | None:
    """AutoAttack accuracy at ``eps`` of a run: its results (``eval.attack=autoattack``) or an evaluation file
    in its folder (``certdist evaluate --attack autoattack`` writes ``eval_eps<eps>_autoattack.json``); of
    several, the one with the most points. ``{"acc" (%), "n", "file"}`` or None."""
    found = []
    if results and results.get("attack") == "autoattack" and _same_eps(results.get("eps"), eps):
        found.append((results, "results.json"))
    for f in sorted(Path(run).glob("*.json")):
        if f.name == "results.json" or f.name.startswith("certify"):
            continue
        ev = _read_json(f)
        if isinstance(ev, dict) and ev.get("attack") == "autoattack" and _same_eps(ev.get("eps"), eps) \
                and ev.get("robust_acc") is not None and ev.get("n"):
            found.append((ev, f.name))
    if not found:
        return None
    ev, name = max(found, key=lambda t: t[0].get("n") or 0)
    return {"acc": float(ev["robust_acc"]), "n": ev.get("n"), "file": name}


def run_extras(run: str | Path, eps: float | None, results: dict | None = None) -> dict:
    """``pipeline`` (:func:`pipeline_result`) and ``autoattack_eval`` (:func:`autoattack_result`) of a run folder."""
    if results is None:
        results = _read_json(Path(run) / "results.json")
    return {"pipeline": pipeline_result(run, eps), "autoattack_eval": autoattack_result(run, eps, results)}


# keys that do not change what a run computes: where it is written and how it reports
IRRELEVANT_KEYS = RUNTIME_KEYS | {"seed", "out_dir"}


def _settings_dict(r: dict) -> dict:
    """The run's config without seed, runtime and location keys; without ``distill`` when it has no
    teacher (the distillation settings then change nothing)."""
    cfg = r.get("config") or {}
    skip = IRRELEVANT_KEYS | (set() if (cfg.get("distill") or {}).get("teacher") else {"distill"})
    return {k: v for k, v in cfg.items() if k not in skip}


def _settings(r: dict) -> str:
    return json.dumps(_settings_dict(r), sort_keys=True, default=str)


def _group_key(r: dict) -> tuple:
    """One row per distinct setting: name, dataset, arch, method, teacher, eps and every other setting
    (the config minus seed and run-irrelevant keys): runs differing in anything else than the seed are
    different rows, never averaged as seeds of one."""
    teacher = "yes" if r.get("teacher") else "-"
    return (r.get("config", {}).get("name", "?"), r.get("dataset"), r.get("arch"), r.get("method"), teacher,
            run_eps(r), _settings(r))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{m:.2f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return f"{m:.2f} ± {sd:.2f}"


def _counts(values: list) -> str:
    """Point counts of the runs of a row: one number when they agree, else each run's."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    return str(vals[0]) if len(set(vals)) == 1 else "/".join(map(str, vals))


def _of_seeds(cell: str, have: int, total: int) -> str:
    return cell if have in (0, total) else f"{cell} ({have} of {total} seeds)"


def format_table(rows: list[dict], group: bool = True) -> str:
    """A Markdown table. With ``group``, one row per distinct setting (runs that differ only in the seed)
    with the mean and sample standard deviation over its seeds: ``seeds`` counts the runs averaged,
    ``points`` the test points each was evaluated on; runs of one name with other settings get their own
    rows, labelled with the keys that differ. Without ``group``, one row per run (``seed``). The
    verification pipeline's certified accuracy (``verified %``, its ``verified pts`` and ``unknown`` points)
    and an AutoAttack evaluation (``AutoAttack %``, ``AA pts``) are shown when a run folder holds them."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = _group_key(r) if group else _group_key(r) + (r.get("run", id(r)),)
        groups.setdefault(key, []).append(r)
    has_pipe = any(r.get("pipeline") for r in rows)
    has_aa = any(r.get("autoattack_eval") for r in rows)
    head = ["run", "dataset", "arch", "method", "teacher", "eps", "seeds" if group else "seed", "points", "clean %",
            "attack", "robust %", "IBP-cert %"]
    head += ["verified %", "verified pts", "unknown"] if has_pipe else []
    head += ["AutoAttack %", "AA pts"] if has_aa else []
    head += ["train s"]
    labels = _row_labels(groups)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, rs in groups.items():
        eps = key[5]
        cells = [labels[key]] + [str(v) for v in key[1:5]] + [format_eps(eps) if isinstance(eps, float) else str(eps)]
        cells.append(str(len(rs)) if group else str(rs[0].get("seed", (rs[0].get("config") or {}).get("seed", "-"))))
        cells.append(_counts([r.get("n") for r in rs]))
        vals = [_fmt([float(_metric(r, m)) for r in rs if _metric(r, m) is not None]) for m in METRICS]
        cells += vals[:1] + [", ".join(sorted({_attack_label(r) for r in rs}))] + vals[1:3]
        if has_pipe:
            pipe = [r["pipeline"] for r in rs if r.get("pipeline")]
            cells += [_of_seeds(_fmt([p["certified_acc"] for p in pipe]), len(pipe), len(rs)),
                      _counts([p["n"] for p in pipe]), _counts([p["unknown"] for p in pipe])]
        if has_aa:
            aa = [r["autoattack_eval"] for r in rs if r.get("autoattack_eval")]
            cells += [_of_seeds(_fmt([a["acc"] for a in aa]), len(aa), len(rs)), _counts([a["n"] for a in aa])]
        cells += vals[3:]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _row_labels(groups: dict[tuple, list[dict]]) -> dict[tuple, str]:
    """The ``run`` cell of each row: the run name, and where several rows share a name, the settings in
    which they differ (``name (lr=0.01)``)."""
    by_name: dict[str, list[tuple]] = {}
    for key in groups:
        by_name.setdefault(str(key[0]), []).append(key)
    labels = {}
    for name, keys in by_name.items():
        settings = {k: _flat(_settings_dict(groups[k][0]) | {"eps": k[5], "dataset": k[1], "arch": k[2]})
                    for k in keys}
        differ = sorted({f for s in settings.values() for f in s
                         if len({json.dumps(t.get(f), sort_keys=True, default=str) for t in settings.values()}) > 1})
        for k in keys:
            extra = ", ".join(f"{f}={settings[k].get(f)}" for f in differ if f not in ("eps", "dataset", "arch"))
            labels[k] = f"{name} ({extra})" if extra and len(keys) > 1 else name
    return labels


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


def epoch_eval_points(d: str | Path, per_epoch_max: int = 1000) -> int | None:
    """How many points a run's per-epoch evaluation (the ``test_*`` / ``val_*`` columns of ``metrics.csv``)
    used: the first ``per_epoch_max`` of its evaluation split, whose size comes from the config (the
    ``data.validation`` hold-out, ``data.test_limit`` or the dataset's test split) or, for a ``fit`` run,
    from its final evaluation; None when unknown."""
    d = Path(d)
    res = _read_json(d / "results.json") or {}
    cfg = res.get("config")
    if cfg is None and (d / "config.yaml").is_file():
        import yaml
        try:
            cfg = yaml.safe_load((d / "config.yaml").read_text())
        except yaml.YAMLError:
            cfg = None
    cfg = cfg if isinstance(cfg, dict) else {}
    data, ev = cfg.get("data") or {}, cfg.get("eval") or {}
    size = None
    if data.get("dataset"):
        if ev.get("split") == "validation":
            size = data.get("validation")
        else:
            try:
                from certdist.data import dataset_info
                size = dataset_info(data["dataset"]).num_samples("test")
            except (ValueError, KeyError, ImportError, AttributeError):
                size = None
            if data.get("test_limit") is not None:
                size = data["test_limit"] if size is None else min(size, data["test_limit"])
    elif res.get("n") and (ev.get("limit") is None or res["n"] < ev["limit"]):  # fit(): evaluated the whole split
        size = res["n"]
    return None if size is None else min(int(size), per_epoch_max)


def _points_title(counts: list[int | None]) -> str:
    known = sorted({c for c in counts if c is not None})
    if len(known) == 1 and None not in counts:
        return f"first {known[0]} points"
    if known:
        return "first " + "/".join(map(str, known)) + " points per run" + (", some unknown" if None in counts else "")
    return "points per run unknown"


def final_point(d: str | Path, rows: list[dict]) -> tuple[float | None, float | None, str, int | None]:
    """``(clean %, certified %, which, points)`` of a run for the trade-off panel: the verification pipeline's
    certified accuracy and the clean accuracy on the same points when the run folder holds a certification
    at the run's eps (``which`` = ``"pipeline"``), else the IBP-certified accuracy of ``results.json`` or of
    its last epoch (``"IBP"``)."""
    d = Path(d)
    res = _read_json(d / "results.json")
    if isinstance(res, dict):
        pipe = pipeline_result(d, run_eps(res))
        if pipe is not None and pipe["clean_acc"] is not None:
            return pipe["clean_acc"], pipe["certified_acc"], "pipeline", pipe["n"]
    clean, cert = _final_point(d, rows)
    n = res.get("n") if isinstance(res, dict) and "clean_acc" in res else epoch_eval_points(d)
    return clean, cert, "IBP", n


def plot_figure(run_dirs: list[str | Path]):
    """The figure of :func:`plot_runs`: four panels (test accuracy curves, training eps, training loss,
    and the clean-vs-certified trade-off of the runs' final networks, certified by the verification
    pipeline where the run folder holds a certification, else by IBP, marked and labelled), integer
    epoch ticks; titles state the number of points evaluated."""
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    dirs = run_folders(run_dirs)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    epoch_points: list[int | None] = []
    kinds: set[str] = set()
    for i, d in enumerate(dirs):
        color = f"C{i % 10}"
        rows = list(csv.DictReader((d / "metrics.csv").open()))
        if not rows:
            continue
        ep = [int(float(r["epoch"])) for r in rows]
        label = _label(d)
        prefix = eval_prefix(rows[0])
        if prefix:
            epoch_points.append(epoch_eval_points(d))
            axes[0].plot(ep, [float(r[f"{prefix}_clean"]) for r in rows], color=color,
                         label=f"{label} {prefix} clean")
            axes[0].plot(ep, [float(r[f"{prefix}_ibp_cert"]) for r in rows], "--", color=color,
                         label=f"{label} {prefix} IBP-cert")
        axes[1].plot(ep, [float(r["eps"]) for r in rows], color=color, label=label)
        axes[2].plot(ep, [float(r["train_loss"]) for r in rows], color=color, label=label)
        clean, cert, which, n = final_point(d, rows)
        if clean is not None:
            kinds.add(which)
            pipe = which == "pipeline"
            axes[3].scatter([cert], [clean], edgecolors=color, facecolors=color if pipe else "none",
                            marker="o" if pipe else "^", label=f"{label} ({which})")
            axes[3].annotate(f"{label} ({which}" + (f", {n} pts)" if n else ")"), (cert, clean), fontsize=7,
                             xytext=(3, 3), textcoords="offset points")
    shown = {"pipeline": "pipeline-verified", "IBP": "IBP-certified"}
    if len(kinds) == 2:
        trade = "trade-off: clean vs certified % (final; filled: pipeline-verified, open: IBP-certified)"
        xlabel = "certified accuracy % (pipeline-verified where certified, else IBP)"
    else:
        which = shown[next(iter(kinds))] if kinds else "IBP-certified"
        trade, xlabel = f"trade-off: clean vs {which} % (final)", f"{which} accuracy %"
    titles = [f"evaluation split accuracy % ({_points_title(epoch_points)})", "training eps", "training loss", trade]
    for k, (ax, title) in enumerate(zip(axes, titles)):
        ax.set_title(title, fontsize=9 if k == 3 else None)
        ax.grid(alpha=0.3)
        if k < 3:
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[3].set_xlabel(xlabel)
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
    """What distillation does during training, per epoch and run, from ``metrics.csv``: the
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
              "feature scale", f"evaluation split, {_points_title([epoch_eval_points(d) for d in run_dirs])} %"]
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
