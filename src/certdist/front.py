"""Clean-vs-certified fronts (``certdist reproduce <front>``): CC-IBP against CC-Dist over alpha.

A comparison at one alpha cannot show a better trade-off (docs/results.md): a front trains the teacher
once, then for every alpha of the front a CC-IBP student and a CC-Dist student (the same recipe and alpha,
plus the distillation settings chosen on the validation split) over the seeds, evaluates every network on
the first ``eval_n`` TEST points (clean, PGD-40, IBP-certified, as ``certdist evaluate``) and certifies
every student on the first ``certify_n`` of them with the full ``certify`` pipeline under an effort budget
(verdicts do not depend on the machine's load). The pipeline front pairs that certified accuracy with the
clean accuracy of the ``eval_n`` points (both estimate the test set's; the pipeline's own clean accuracy
on its points is kept as ``pipeline_clean``). It writes ``<results>/<front>.json``, ``.md`` and ``.png``: per method and alpha the
mean ± std over seeds, both fronts in one plot (clean on x, certified on y, each method's non-dominated
front of the mean points as a step line) and, per seed, the dominated hypervolume of each method's front
(mean ± std over seeds; also the paired CC-Dist minus CC-IBP difference).

Every run holds out the last ``validation`` training images (``data.validation``) and reports on them
(``eval.split=validation``); those numbers are kept as ``val_*`` in the rows. Resumable: finished runs are
skipped (:func:`certdist.sweep.sweep`), evaluations are cached and certification appends per-point JSON lines.
Runs go seed by seed (every alpha and method of seed 0 first), so a front cut short holds whole seeds.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from certdist.verification.certify import CertifyConfig

METHODS = ("CC-IBP", "CC-Dist")


@dataclass(frozen=True)
class Front:
    setting: str                          # e.g. "fashion-mnist-0.1/dm_small"
    dataset: str
    eps: float
    teacher: str                          # the teacher's YAML config (trained once, seed 0)
    student: str                          # the students' YAML config (CC-IBP; alpha is overridden)
    alphas: tuple[float, ...]
    distill: tuple[str, ...]              # CC-Dist's distillation overrides (chosen on the validation split)
    seeds: tuple[int, ...] = (0, 1, 2)
    train: tuple[str, ...] = ()           # overrides for every run, teacher included
    teacher_train: tuple[str, ...] = ()   # overrides for the teacher only
    student_train: tuple[str, ...] = ()   # overrides for every student (both methods), before alpha
    certify_n: int = 300                  # the first N test points: the full certify pipeline
    eval_n: int | None = None             # the first N test points: clean, PGD-40, IBP-certified (None: certify_n)
    certify: "CertifyConfig | None" = None  # None: certdist.reproduce.certify_budget()
    max_domains: int | None = None        # overrides the budget's branch-and-bound domains per point
    validation: int = 5000                # the last N training images, held out
    # hypervolume references: (clean, certified) in %, or "nadir": per seed, the componentwise minimum of
    # every student point of both methods (the area above the worse of the two, paired by seed)
    references: tuple = ((0.0, 0.0),)
    note: str = ""


FRONTS: dict[str, Front] = {
    # issue 22: DM-small, the configs/small 10-epoch recipe on the first 10,000 training images (to fit a
    # shared 2-core CPU budget, one thread per run: ~1.5 min of training per student; validation PGD-10 for
    # the same reason); four alphas around and below the recipe's 0.1 (at 5,000 images alpha 0.03 dominated
    # 0.1 and 0.3 for both methods, so the front's interesting end is low alpha); CC-Dist's distillation as
    # shipped (chosen on the validation split in issue 11, chosen again by `certdist tune` on the 5,000-image
    # budget: 6 trials, beta x temperature, alpha 0.1, seed 0); certified under reproduce's budget with at
    # most 300 branch-and-bound domains per point (not 1,000: 48 networks, one CPU core each; the same
    # budget for both methods); docs/results.md, "Fronts"
    "fashion-mnist-0.1-front": Front(
        "fashion-mnist-0.1/dm_small", "fashion-mnist", 0.1,
        "configs/small/fashion-mnist_pgd-at-teacher.yaml", "configs/small/fashion-mnist_cc-ibp.yaml",
        alphas=(0.01, 0.03, 0.1, 0.3),
        distill=("distill.loss=kl", "distill.level=logits", "distill.temperature=4", "distill.beta=0.03"),
        train=("data.train_limit=10000", "num_threads=1", "eval.pgd_steps=10"),
        references=((0.0, 0.0), "nadir"), max_domains=300, certify_n=1000,
        note="DM-small, configs/small 10-epoch recipe, first 10,000 training images (last 5,000 held out), "
             "CC-Dist: KL on logits, T 4, beta 0.03 (the shipped configs/small/fashion-mnist_cc-dist.yaml "
             "setting; `certdist tune` on the validation split at alpha 0.1 chose it again)."),
    # MNIST 0.3: the teacher is much stronger than the students here (docs/results.md, issue 11). The
    # students use the expressive-losses MNIST 0.3 CC-IBP settings of `reproduce mnist-0.3` (train eps
    # x1.334, l1 3e-6) with alpha over the front; the teacher needs a clean epoch and a 3-epoch ramp at
    # eps 0.3. CC-Dist: KL T 4 beta 0.1, the setting the mnist-0.3 grid chose on validation. Students use
    # batch 64: with 10,000 images and batch 256 the 5-epoch ramp is 200 steps and every student collapsed
    # to chance (alpha 0.1 and 0.2, seed 0); batch 64 gives 780 ramp steps (val 92.6 / 43.7 IBP-cert at
    # epoch 8, alpha 0.1).
    "mnist-0.3-front": Front(
        "mnist-0.3/dm_small", "mnist", 0.3,
        "configs/small/mnist_pgd-at-teacher.yaml", "configs/small/mnist_cc-ibp.yaml",
        alphas=(0.1, 0.2, 0.3, 0.5),
        distill=("distill.loss=kl", "distill.level=logits", "distill.temperature=4", "distill.beta=0.1"),
        train=("eps=0.3", "data.train_limit=10000", "num_threads=1", "eval.pgd_steps=10"),
        teacher_train=("warmup_epochs=1", "ramp_epochs=3"),
        student_train=("l1=3e-6", "train_eps_mul=1.334", "batch_size=64"),
        references=((0.0, 0.0), "nadir"), max_domains=300, certify_n=1000,
        note="DM-small, configs/small 10-epoch recipe with the expressive-losses MNIST 0.3 student settings "
             "(train eps x1.334, l1 3e-6) and batch 64 for the students, first 10,000 training images (last 5,000 held out); CC-Dist: KL on "
             "logits, T 4, beta 0.1 (chosen on the validation split by the mnist-0.3 grid)."),
}


def _run_name(name: str, method: str | None, alpha: float | None = None) -> str:
    if method is None:
        return f"{name}_teacher"
    return f"{name}_{method.lower()}_a{alpha:g}"


def _overrides(f: Front, name: str, out_dir: str, method: str | None, alpha: float | None,
               teacher_ckpt: str | None) -> list[str]:
    ov = [f"out_dir={out_dir}", f"data.validation={f.validation}", "eval.split=validation", "progress=false",
          *f.train, f"name={_run_name(name, method, alpha)}"]
    ov += list(f.teacher_train if method is None else f.student_train)
    if method is not None:
        ov.append(f"alpha={alpha:g}")
    if method == "CC-Dist":
        ov += [*f.distill, f"distill.teacher={teacher_ckpt}"]
    return ov


def _config(f: Front, method: str | None) -> str:
    path = f.teacher if method is None else f.student
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: run `certdist reproduce` from the repository root")
    return path


def _run(f: Front, name: str, out_dir: str, method: str | None, alpha: float | None, seed: int,
         teacher_ckpt: str | None, collect_only: bool) -> Path | None:
    """The run folder (trained now unless finished; with ``collect_only`` None when it has not finished)."""
    from certdist.sweep import run_dir, sweep
    ov = _overrides(f, name, out_dir, method, alpha, teacher_ckpt)
    cfg = _config(f, method)
    if collect_only:
        d = run_dir(cfg, seed, ov)
        return d if (d / "results.json").exists() else None
    return sweep([cfg], [seed], ov)[0]


def _evaluate(run: Path, dataset: str, eps: float, n: int) -> dict:
    """Clean / PGD-40 / IBP-certified accuracy on the first ``n`` test points, cached: reproduce's."""
    from certdist.reproduce import evaluate_run
    return evaluate_run(run, dataset, eps, n)


def _certify_budget(f: Front | None = None) -> "CertifyConfig":
    """The front's effort budget: ``f.certify`` or reproduce's, with ``f.max_domains`` when set."""
    from dataclasses import replace

    from certdist.reproduce import certify_budget
    cfg = (f.certify if f is not None else None) or certify_budget()
    return cfg if f is None or f.max_domains is None else replace(cfg, max_domains=f.max_domains)


def _certify(run: Path, f: Front) -> dict:
    from certdist import data as D
    from certdist.threats import ThreatModel
    from certdist.training.checkpoint import model_from_checkpoint
    from certdist.verification.certify import certify_dataset
    model, _ = model_from_checkpoint(run / "last.pt")
    test = D.load(f.dataset, "test", limit=f.certify_n)
    return certify_dataset(model, test.images.float() / 255, test.labels, ThreatModel(f.eps),
                           run / f"certify_test{f.certify_n}.jsonl", config=_certify_budget(f),
                           progress=False)


def _certified_done(run: Path, n: int) -> bool:
    p = run / f"certify_test{n}.jsonl"
    return p.exists() and len(p.read_text().splitlines()) >= n


def _row(f: Front, method: str, alpha: float | None, run: Path, ev: dict, cert: dict | None) -> dict:
    res = json.loads((run / "results.json").read_text())
    if cert is not None and cert["n"] != f.certify_n:
        raise ValueError(f"{run}: certified on {cert['n']} points, not the front's {f.certify_n}")
    r2 = lambda v: None if v is None else round(v, 2)  # noqa: E731
    return {"setting": f.setting, "method": method, "alpha": alpha, "seed": res["seed"],
            "clean": r2(ev["clean_acc"]), "pgd": r2(ev["pgd_acc"]), "ibp_cert": r2(ev["ibp_cert_acc"]),
            "certified": None if cert is None else round(100 * cert["certified_accuracy"], 2),
            "pipeline_attack": None if cert is None else round(100 * cert["attack_accuracy"], 2),
            "pipeline_clean": None if cert is None else round(100 * cert["clean_accuracy"], 2),
            "n": ev["n"], "certified_n": None if cert is None else cert["n"], "split": "test",
            "val_clean": r2(res.get("clean_acc")), "val_robust": r2(res.get("robust_acc")),
            "val_ibp_cert": r2(res.get("ibp_cert_acc")), "val_split": res.get("split"),
            "train_time_s": res.get("train_time_s"), "run": str(run)}


def _student_job(task: tuple) -> str:
    """One front point (a worker process of ``run_front(jobs=...)``): train, evaluate, certify."""
    f, name, out_dir, method, alpha, seed, teacher_ckpt = task
    run = _run(f, name, out_dir, method, alpha, seed, teacher_ckpt, False)
    _evaluate(run, f.dataset, f.eps, f.eval_n or f.certify_n)
    _certify(run, f)
    return str(run)


def run_front(name: str, out_dir: str = "runs/fronts", results: str = "results", seeds: Sequence[int] | None = None,
              collect_only: bool = False, jobs: int = 1) -> dict:
    """Run front ``name`` of :data:`FRONTS` (everything not yet done) and write ``<results>/<name>.json``,
    ``.md`` and ``.png``. ``seeds``: the front's own by default. ``collect_only``: start nothing; write the
    files from what has finished (labelled partial). ``jobs``: after the teacher, the student runs (each
    trained, evaluated and certified in turn) go to that many worker processes of cpu_count // jobs
    threads (:func:`certdist.sweep.run_jobs`); the numbers do not depend on it. Returns the JSON record."""
    if name not in FRONTS:
        raise ValueError(f"unknown front {name!r}; known: {', '.join(FRONTS)}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    f = FRONTS[name]
    seeds = tuple(f.seeds if seeds is None else seeds)
    teacher_run = _run(f, name, out_dir, None, None, 0, None, collect_only)
    if teacher_run is None:
        raise FileNotFoundError(f"{name}: the teacher has not finished (run without --collect)")
    teacher_ckpt = str(teacher_run / "last.pt")
    if jobs > 1 and not collect_only:
        from certdist.sweep import run_jobs
        run_jobs(_student_job, [(f, name, out_dir, m, a, s, teacher_ckpt) for s in seeds for a in f.alphas
                                for m in METHODS], jobs, "front run")
    rows = []
    eval_n = f.eval_n or f.certify_n
    if not collect_only or (teacher_run / f"eval_test{eval_n}.json").exists():
        rows.append(_row(f, "PGD-AT teacher", None, teacher_run, _evaluate(teacher_run, f.dataset, f.eps, eval_n),
                         None))
    expected = len(seeds) * len(f.alphas) * len(METHODS)
    for seed in seeds:  # seed-major: a front cut short holds whole seeds
        for alpha in f.alphas:
            for method in METHODS:
                run = _run(f, name, out_dir, method, alpha, seed, teacher_ckpt, collect_only)
                if run is None or (collect_only and not (run / f"eval_test{eval_n}.json").exists()):
                    continue
                ev = _evaluate(run, f.dataset, f.eps, eval_n)
                cert = _certify(run, f) if not collect_only or _certified_done(run, f.certify_n) else None
                rows.append(_row(f, method, alpha, run, ev, cert))
    students = [r for r in rows if r["method"] in METHODS]
    note = f.note
    if len(students) < expected:
        note += f" PARTIAL: {len(students)} of {expected} student runs finished."
    missing = sum(1 for r in students if r["certified"] is None)
    if missing:
        note += f" {missing} student runs have no pipeline certification yet."
    cfg = _certify_budget(f)
    record = {"front": name, "setting": f.setting, "dataset": f.dataset, "eps": f.eps, "alphas": list(f.alphas),
              "seeds": list(seeds), "distill": list(f.distill), "train": list(f.train),
              "teacher_train": list(f.teacher_train), "student_train": list(f.student_train), "certify_n": f.certify_n,
              "eval_n": eval_n,
              "certify": {"timeout": cfg.timeout, "max_domains": cfg.max_domains}, "note": note, "rows": rows,
              "summary": summarize(rows), "hypervolume": hypervolumes(rows, f.references)}  # over the alphas run
    write_front(name, record, results)
    return record


# ---------------------------------------------------------------------------------------------
# fronts and hypervolume


def non_dominated(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (both coordinates maximised)."""
    from certdist.tune import pareto_front
    return pareto_front([tuple(p) for p in points])


def hypervolume(points: Sequence[tuple[float, float]], ref: tuple[float, float] = (0.0, 0.0)) -> float:
    """The area dominated by ``points`` (both coordinates maximised) and bounded below by ``ref``: the
    union of the rectangles [ref, p]. A dominated point adds nothing; a point not above ``ref`` in both
    coordinates adds nothing."""
    rx, ry = ref
    area, top = 0.0, ry
    for x, y in sorted(((float(x), float(y)) for x, y in points), key=lambda p: (-p[0], p[1])):
        if x > rx and y > top:  # sweeping from the largest x: only a higher y adds a new strip
            area += (x - rx) * (y - top)
            top = y
    return area


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def summarize(rows: list[dict]) -> list[dict]:
    """Per (method, alpha): seeds and mean / sample std of every metric (the teacher has alpha None)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["alpha"]), []).append(r)
    out = []
    for (method, alpha), rs in groups.items():
        e = {"method": method, "alpha": alpha, "seeds": len(rs), "n": rs[0]["n"]}
        for k in ("clean", "pgd", "ibp_cert", "certified", "val_clean", "val_robust", "val_ibp_cert"):
            vals = [r[k] for r in rs if r.get(k) is not None]
            e[k] = list(_mean_std(vals)) if vals else None
            e[f"{k}_seeds"] = len(vals)
        out.append(e)
    return out


def hypervolumes(rows: list[dict], references: Sequence = ((0.0, 0.0),),
                 metrics: Sequence[str] = ("certified", "ibp_cert"), alphas: Sequence[float] | None = None) -> list[dict]:
    """Per certified metric and reference point (``(clean, certified)`` or ``"nadir"``: per seed the
    componentwise minimum of both methods' points): each method's per-seed hypervolume of (clean, metric)
    over the alphas that every seed with the metric has for both methods (``alphas``: among these only;
    a front cut short is compared over the alphas it holds, recorded as ``alphas``), mean ± std over those
    seeds, and the paired per-seed CC-Dist minus CC-IBP difference."""
    students = [r for r in rows if r["method"] in METHODS]
    out = []
    for metric in metrics:
        have = {(r["method"], r["seed"], r["alpha"]): (r["clean"], r[metric]) for r in students if r[metric] is not None}
        seeds = sorted({s for (_, s, _) in have})
        cand = sorted(alphas if alphas is not None else {a for (_, _, a) in have})
        common = [a for a in cand if all((m, s, a) in have for m in METHODS for s in seeds)]
        if not common:
            seeds = []
        pts = {(m, s): [have[(m, s, a)] for a in common] for m in METHODS for s in seeds}
        alphas_m = common
        for ref in references:
            def ref_of(s):
                if ref != "nadir":
                    return tuple(ref)
                both = pts[(METHODS[0], s)] + pts[(METHODS[1], s)]
                return min(p[0] for p in both), min(p[1] for p in both)
            e = {"metric": metric, "reference": ref if ref == "nadir" else list(ref), "alphas": alphas_m, "seeds": seeds,
                 "per_seed": {}, "mean_std": {}}
            if ref == "nadir":
                e["nadir"] = [list(ref_of(s)) for s in seeds]
            for m in METHODS:
                e["per_seed"][m] = [round(hypervolume(pts[(m, s)], ref_of(s)), 2) for s in seeds]
                e["mean_std"][m] = [round(v, 2) for v in _mean_std(e["per_seed"][m])] if seeds else None
            diff = [a - b for a, b in zip(e["per_seed"]["CC-Dist"], e["per_seed"]["CC-IBP"])]
            e["per_seed"]["difference"] = [round(d, 2) for d in diff]
            e["mean_std"]["difference"] = [round(v, 2) for v in _mean_std(diff)] if diff else None
            out.append(e)
    return out


# ---------------------------------------------------------------------------------------------
# writing


def _cell(e: dict, k: str) -> str:
    if e.get(k) is None:
        return "-"
    (m, sd), n = e[k], e[f"{k}_seeds"]
    text = f"{m:.2f}" if n == 1 else f"{m:.2f} ± {sd:.2f}"
    return text + (f" ({n} seed{'s' if n > 1 else ''})" if n != e["seeds"] else "")


def format_markdown(record: dict) -> str:
    lines = [f"# {record['front']}", "", record["note"], "",
             f"Setting {record['setting']}; clean, PGD-40 and IBP-certified accuracy on the first "
             f"{record.get('eval_n') or record['certify_n']} test points, the full certify pipeline on the first "
             f"{record['certify_n']} (its clean accuracy in the per-run table), with "
             f"at most {record['certify']['max_domains']} branch-and-bound domains per point "
             f"({record['certify']['timeout']:g} s wall-clock cap). CC-Dist overrides: "
             f"{' '.join(record['distill'])}; every run: {' '.join(record['train']) or '-'}"
             + "".join(f"; {who}: {' '.join(record[k])}" for who, k in (("teacher", "teacher_train"),
                                                                       ("students", "student_train")) if record.get(k))
             + ".", "",
             "Test (mean ± sample std over seeds):", "",
             "| method | alpha | seeds | clean % | PGD % | IBP-cert % | certified % |", "|---|---|---|---|---|---|---|"]
    summary = sorted(record["summary"], key=lambda e: (e["alpha"] is not None, e["alpha"] or 0, e["method"]))
    for e in summary:
        a = "-" if e["alpha"] is None else f"{e['alpha']:g}"
        lines.append(f"| {e['method']} | {a} | {e['seeds']} | {_cell(e, 'clean')} | {_cell(e, 'pgd')} | "
                     f"{_cell(e, 'ibp_cert')} | {_cell(e, 'certified')} |")
    lines += ["", "Validation (the held-out training images, as trained; PGD with the runs' eval.pgd_steps):", "",
              "| method | alpha | seeds | clean % | PGD % | IBP-cert % |", "|---|---|---|---|---|---|"]
    for e in summary:
        a = "-" if e["alpha"] is None else f"{e['alpha']:g}"
        lines.append(f"| {e['method']} | {a} | {e['seeds']} | {_cell(e, 'val_clean')} | {_cell(e, 'val_robust')} | "
                     f"{_cell(e, 'val_ibp_cert')} |")
    lines += ["", "Dominated hypervolume of each method's front over the alphas that both methods have on every "
              "seed (clean x certified, %^2), per seed, then mean ± std over seeds; difference = CC-Dist minus "
              "CC-IBP, paired by seed:", "",
              "| certified by | reference (clean, cert) | alphas | seeds | CC-IBP | CC-Dist | difference | "
              "per seed (CC-IBP / CC-Dist) |", "|---|---|---|---|---|---|---|---|"]
    for h in record["hypervolume"]:
        if not h["seeds"]:
            continue
        ms = lambda k: (f"{h['mean_std'][k][0]:.1f}" if len(h["seeds"]) == 1  # noqa: E731
                        else f"{h['mean_std'][k][0]:.1f} ± {h['mean_std'][k][1]:.1f}")
        per = "; ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(h["per_seed"]["CC-IBP"], h["per_seed"]["CC-Dist"]))
        by = "pipeline" if h["metric"] == "certified" else "IBP"
        ref = ("nadir " + ", ".join(f"({x:g}, {y:g})" for x, y in h["nadir"]) if h["reference"] == "nadir"
               else f"({h['reference'][0]:g}, {h['reference'][1]:g})")
        lines.append(f"| {by} | {ref} | {', '.join(f'{a:g}' for a in h['alphas'])} | {len(h['seeds'])} | {ms('CC-IBP')} | "
                     f"{ms('CC-Dist')} | {ms('difference')} | {per} |")
    lines += ["", "Per run:", "",
              "| method | alpha | seed | clean % | PGD % | IBP-cert % | certified % | pipeline clean % | val clean % | "
              "val PGD % | val IBP-cert % | train s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f2 = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in record["rows"]:
        a = "-" if r["alpha"] is None else f"{r['alpha']:g}"
        lines.append(f"| {r['method']} | {a} | {r['seed']} | {f2(r['clean'])} | {f2(r['pgd'])} | {f2(r['ibp_cert'])} | "
                     f"{f2(r['certified'])} | {f2(r.get('pipeline_clean'))} | {f2(r['val_clean'])} | {f2(r['val_robust'])} | {f2(r['val_ibp_cert'])} | "
                     f"{r.get('train_time_s') or '-'} |")
    return "\n".join(lines) + "\n"


def plot_front(record: dict, out: str | Path) -> Path:
    """Clean (x) vs certified (y): per method and alpha the mean with std error bars (small markers: the
    seeds), each method's non-dominated front of the mean points as a step line; pipeline-certified on
    the left (where measured), IBP-certified on the right."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    rows = [r for r in record["rows"] if r["method"] in METHODS]
    keys = [k for k in ("certified", "ibp_cert") if any(r[k] is not None for r in rows)] or ["ibp_cert"]
    fig = Figure(figsize=(6.2 * len(keys), 4.8))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        pts_all = [(r["clean"], r[key]) for r in rows if r[key] is not None]
        low = (min(p[0] for p in pts_all), min(p[1] for p in pts_all)) if pts_all else (0.0, 0.0)
        for i, m in enumerate(METHODS):
            color = f"C{i}"
            rs = [r for r in rows if r["method"] == m and r[key] is not None]
            if not rs:
                continue
            ax.scatter([r["clean"] for r in rs], [r[key] for r in rs], s=10, color=color, alpha=0.35)
            means = []
            for e in summarize(rs):
                (cx, sx), (cy, sy) = e["clean"], e[key]
                means.append((cx, cy))
                ax.errorbar(cx, cy, xerr=sx, yerr=sy, fmt="o", color=color, capsize=3, ms=5)
                ax.annotate(f"{e['alpha']:g}", (cx, cy), textcoords="offset points", xytext=(5, 4), fontsize=7,
                            color=color)
            front = sorted(means[j] for j in non_dominated(means))
            front = [(min(low[0], front[0][0]), front[0][1]), *front, (front[-1][0], min(low[1], front[-1][1]))]
            n_seeds = len({r["seed"] for r in rs})
            hv = next((h for h in record["hypervolume"] if h["metric"] == key and h["seeds"]
                       and h["mean_std"][m] is not None), None)
            label = f"{m} ({n_seeds} seed{'s' if n_seeds > 1 else ''})"
            if hv:
                ref = "nadir" if hv["reference"] == "nadir" else f"ref ({hv['reference'][0]:g}, {hv['reference'][1]:g})"
                label += f", HV {hv['mean_std'][m][0]:.0f}" + (f" ± {hv['mean_std'][m][1]:.0f}" if len(hv["seeds"]) > 1
                                                                else "") + f" ({ref})"
            ax.plot([p[0] for p in front], [p[1] for p in front], drawstyle="steps-pre", color=color, label=label)
        ax.set_xlabel("clean accuracy % (test)")
        ax.set_ylabel("certified accuracy % (" + ("full pipeline" if key == "certified" else "IBP") + ")")
        n = record["certify_n"] if key == "certified" else record.get("eval_n") or record["certify_n"]
        ax.set_title(f"{record['front']}: {record['setting']}, n = {n} (labels: alpha)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    return out


def write_front(name: str, record: dict, results: str | Path = "results") -> list[Path]:
    d = Path(results)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    (d / f"{name}.md").write_text(format_markdown(record))
    return [d / f"{name}.json", d / f"{name}.md", plot_front(record, d / f"{name}.png")]
