"""One command per results table (``certdist reproduce <table>``): teacher, students, seeds,
certification, then ``results/<table>.md``, ``results/<table>.json`` and ``results/<table>.png``. The tables
are data: ``tables/reproduce.yaml`` in the package.

Every step is resumable: finished runs are skipped and interrupted ones resumed (:func:`certdist.sweep.sweep`),
certification appends per-point JSON lines and skips the points already done. Runs from the repository
root (the tables name files in ``configs/``).

Protocol: every run holds out the last 5,000 training images (``data.validation``) and
reports on them during training (``eval.split=validation``); hyper-parameters are chosen on that split
only (the ``*-grid`` tables). The final tables certify the first ``certify_n`` TEST points of every
student with the full pipeline under the effort budget :data:`CERTIFY_BUDGET` (quick attack, IBP, CROWN, full
attack, alpha-CROWN, MILP/BaB with a domain budget; the same verdicts on any machine; the wall clock only a cap) and
evaluate every network (teacher included) on the same points: clean, PGD-40 (margin loss, 1 restart) and
IBP-certified accuracy, as ``certdist evaluate``.

JSON rows: ``{"setting", "method", "teacher", "seed", "clean", "pgd", "ibp_cert", "certified", "n"}``
(accuracies in %, ``teacher`` null without one, ``certified`` null where the pipeline was not run),
plus ``split``, ``train_time_s``, ``pipeline_attack`` (accuracy under the pipeline's stronger attack) and
``role`` (teacher / student).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from certdist.verification.certify import CertifyConfig

RUNTIME = ["num_threads=1", "progress=false"]


def certify_budget() -> "CertifyConfig":
    """The effort budget of the final tables' certification: work, not seconds, bounds every stage, so a
    table's verdicts do not depend on the machine or its load; the 600 s wall clock is only a cap against a runaway point."""
    from certdist.verification.certify import CertifyConfig
    return CertifyConfig(timeout=600.0, max_domains=1000)


@dataclass(frozen=True)
class Method:
    label: str                      # the table's "method" column
    config: str                     # a YAML file under configs/
    overrides: tuple[str, ...] = ()
    distill: bool = False           # gets distill.teacher=<the table's teacher>


@dataclass(frozen=True)
class Table:
    setting: str                    # e.g. "mnist-0.1/dm_small"
    dataset: str
    eps: float
    teacher: Method
    methods: tuple[Method, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    certify_n: int | None = 1000    # None: a validation table (no certification)
    certify: "CertifyConfig | None" = None   # None: CERTIFY_BUDGET
    validation: int = 5000          # the last N training images, held out
    note: str = ""


VALIDATION = "Validation: seed 0, the 5,000 held-out training images, PGD-40."
FINAL = ("Final: {} seeds, first 1,000 test points, full certify pipeline under the effort budget (at most 1,000 "
         "branch-and-bound domains per point, 600 s wall-clock cap; before verifier 2026.12.1: 10 s per point).")
TABLES_FILE = Path(__file__).parent / "tables" / "reproduce.yaml"


def _method(spec: dict, dataset: str) -> Method:
    """A method of ``tables/reproduce.yaml``: ``label``, ``config``, ``overrides``; or ``dist: <variant>``, a CC-Dist
    student of the setting's CC-IBP config, run name ``<prefix>_cc-dist_<variant>``."""
    extra = tuple(spec.get("overrides", ()))
    if "dist" in spec:
        name = spec["dist"]
        return Method(f"CC-Dist ({name})", f"configs/small/{dataset}_cc-ibp.yaml",
                      (f"name={spec.get('prefix') or dataset}_cc-dist_{name}", *extra), True)
    return Method(spec["label"], spec["config"], extra)


def _tables(s: dict) -> dict[str, Table]:
    """A setting's validation table ``<name>-grid`` (seed 0; the final table's seed-0 runs are among its
    runs) and its final table ``<name>``; ``setting`` defaults to ``<name>/dm_small``."""
    name, dataset, eps = s["name"], s["dataset"], float(s["eps"])
    setting, note, seeds = s.get("setting") or f"{name}/dm_small", s.get("note", ""), tuple(s.get("seeds", (0, 1, 2)))
    methods = {k: _method(v, dataset) for k, v in s["methods"].items()}
    teacher = _method(s["teacher"], dataset)
    grid, final = tuple(methods[k] for k in s["grid"]), tuple(methods[k] for k in s["final"])
    return {f"{name}-grid": Table(setting, dataset, eps, teacher, grid, seeds=(0,), certify_n=None,
                                  note=VALIDATION + note),
            name: Table(setting, dataset, eps, teacher, final, seeds=seeds, note=FINAL.format(len(seeds)) + note)}


def _load_tables(path: Path = TABLES_FILE) -> tuple[dict[str, Table], dict[str, Method]]:
    """The tables of ``tables/reproduce.yaml``, in its order, and per dataset the variant chosen on its validation
    split (``chosen``)."""
    import yaml
    settings = yaml.safe_load(path.read_text())["settings"]
    tables: dict[str, Table] = {}
    chosen: dict[str, Method] = {}
    for s in settings:
        tables.update(_tables(s))
        if "chosen" in s:
            chosen[s["dataset"]] = _method(s["methods"][s["chosen"]], s["dataset"])
    return tables, chosen


TABLES, CHOSEN = _load_tables()  # CHOSEN: the variant that configs/small/<dataset>_cc-dist.yaml ships


def _overrides(t: Table, out_dir: str, m: Method, teacher_ckpt: str | None) -> list[str]:
    ov = [f"out_dir={out_dir}", f"data.validation={t.validation}", "eval.split=validation", *RUNTIME, *m.overrides]
    if m.distill:
        ov.append(f"distill.teacher={teacher_ckpt}")
    return ov


def _train(t: Table, m: Method, seeds, out_dir: str, teacher_ckpt: str | None) -> list[Path]:
    from certdist.sweep import sweep
    if not Path(m.config).is_file():
        raise FileNotFoundError(f"{m.config} not found: run `certdist reproduce` from the repository root")
    return sweep([m.config], list(seeds), _overrides(t, out_dir, m, teacher_ckpt))


def _certify(run: Path, dataset: str, eps: float, n: int, cfg: "CertifyConfig | None") -> dict:
    from certdist import data as D
    from certdist.threats import ThreatModel
    from certdist.training.checkpoint import model_from_checkpoint
    from certdist.verification.certify import certify_dataset
    model, _ = model_from_checkpoint(run / "last.pt")
    test = D.load(dataset, "test", limit=n)
    return certify_dataset(model, test.images.float() / 255, test.labels, ThreatModel(eps),
                           run / f"certify_test{n}.jsonl", config=cfg or certify_budget(), progress=False)


def evaluate_run(run: Path, dataset: str, eps: float, n: int) -> dict:
    """Clean / PGD-40 / IBP-certified accuracy on the first ``n`` test points (as `certdist evaluate`)."""
    out = run / f"eval_test{n}.json"
    if out.exists():
        return json.loads(out.read_text())
    from certdist import data as D
    from certdist.evaluation import evaluate
    from certdist.threats import ThreatModel
    from certdist.training.checkpoint import model_from_checkpoint
    model, _ = model_from_checkpoint(run / "last.pt")
    test = D.load(dataset, "test", limit=n)
    res = evaluate(model, test.images, test.labels, ThreatModel(eps), progress=False)
    out.write_text(json.dumps(res, indent=2))
    return res


def _row(t: Table, label: str, teacher: str | None, run: Path, split: str, ev: dict, cert: dict | None) -> dict:
    """clean / pgd / ibp_cert from ``ev`` (PGD-40, the evaluation of every run), certified from the pipeline
    (its own, stronger attack's accuracy is kept as ``pipeline_attack``)."""
    res = json.loads((run / "results.json").read_text())
    if cert is not None and cert["n"] != ev["n"]:
        raise ValueError(f"{run}: evaluated on {ev['n']} points, certified on {cert['n']}")
    return {"setting": t.setting, "method": label, "teacher": teacher, "seed": res["seed"],
            "clean": round(ev["clean_acc"], 2), "pgd": round(ev["pgd_acc"], 2), "ibp_cert": round(ev["ibp_cert_acc"], 2),
            "certified": None if cert is None else round(100 * cert["certified_accuracy"], 2),
            "n": ev["n"], "split": split, "train_time_s": res.get("train_time_s"),
            "pipeline_attack": None if cert is None else round(100 * cert["attack_accuracy"], 2),
            "role": "teacher" if label == t.teacher.label else "student"}


def _finished(t: Table, m: Method, seeds, out_dir: str, teacher_ckpt: str | None) -> list[Path]:
    """The run folders of ``m`` whose training has finished (nothing is started)."""
    from certdist.sweep import run_dir
    dirs = [run_dir(m.config, s, _overrides(t, out_dir, m, teacher_ckpt)) for s in seeds]
    return [d for d in dirs if (d / "results.json").exists()]


def _student_job(task: tuple) -> str:
    """One (method, seed) of a table (a worker process of ``run_table(jobs=...)``): train, evaluate, certify."""
    t, m, seed, out_dir, teacher_ckpt = task
    run, = _train(t, m, (seed,), out_dir, teacher_ckpt)
    if t.certify_n is not None:
        evaluate_run(run, t.dataset, t.eps, t.certify_n)
        _certify(run, t.dataset, t.eps, t.certify_n, t.certify)
    return str(run)


def run_table(name: str, out_dir: str = "runs/reproduce", results_dir: str = "results",
              collect_only: bool = False, jobs: int = 1) -> list[dict]:
    """Run table ``name`` (everything not yet done) and write its files. ``collect_only``: start nothing;
    write the table from the runs (and certifications) that have finished, labelled partial if any is missing.
    ``jobs``: after the teacher, the (method, seed) runs (each trained, evaluated and certified in turn) go
    to that many worker processes of cpu_count // jobs threads (:func:`certdist.sweep.run_jobs`)."""
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; known: {', '.join(TABLES)}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    t = TABLES[name]
    runs = (lambda m, seeds, ck: _finished(t, m, seeds, out_dir, ck)) if collect_only else \
        (lambda m, seeds, ck: _train(t, m, seeds, out_dir, ck))
    expected = 1 + len(t.methods) * len(t.seeds)
    teacher_runs = runs(t.teacher, (0,), None)
    if not teacher_runs:
        raise FileNotFoundError(f"{name}: the teacher has not finished (run without --collect)")
    teacher_run = teacher_runs[0]
    teacher_ckpt = str(teacher_run / "last.pt")
    if jobs > 1 and not collect_only:
        from certdist.sweep import run_jobs
        run_jobs(_student_job, [(t, m, s, out_dir, teacher_ckpt) for m in t.methods for s in t.seeds], jobs,
                 "table run")
    teacher_name = t.teacher.label
    rows = []
    if t.certify_n is not None:
        out = teacher_run / f"eval_test{t.certify_n}.json"
        if not collect_only or out.exists():
            ev = evaluate_run(teacher_run, t.dataset, t.eps, t.certify_n)
            rows.append(_row(t, teacher_name, None, teacher_run, "test", ev, None))
    else:
        rows.append(_row(t, teacher_name, None, teacher_run, "validation",
                         json.loads((teacher_run / "results.json").read_text()), None))
    for m in t.methods:
        for run in runs(m, t.seeds, teacher_ckpt):
            teacher = teacher_name if m.distill else None
            if t.certify_n is None:
                rows.append(_row(t, m.label, teacher, run, "validation", json.loads((run / "results.json").read_text()),
                                 None))
                continue
            ev_file = run / f"eval_test{t.certify_n}.json"
            cert_file = run / f"certify_test{t.certify_n}.jsonl"
            if collect_only and not ev_file.exists():
                continue
            ev = evaluate_run(run, t.dataset, t.eps, t.certify_n)
            cert = None
            if not collect_only or (cert_file.exists() and len(cert_file.read_text().splitlines()) >= t.certify_n):
                cert = _certify(run, t.dataset, t.eps, t.certify_n, t.certify)
            rows.append(_row(t, m.label, teacher, run, "test", ev, cert))
    note = t.note
    if len(rows) < expected:
        note += f" PARTIAL: {len(rows)} of {expected} rows finished (the others were still running or queued)."
    uncertified = sum(1 for r in rows if r["certified"] is None and r["role"] != "teacher")
    if t.certify_n is not None and uncertified:
        note += (f" {uncertified} student rows have no pipeline certification yet (the certified column averages "
                 "the certified seeds).")
    write_results(name, rows, results_dir, note)
    return rows


# ---------------------------------------------------------------------------------------------
# writing the table


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def summarize_seeds(rows: list[dict]) -> list[dict]:
    """One entry per (setting, method, teacher): the number of seeds and mean / sample std per metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["method"], r["teacher"]), []).append(r)
    out = []
    for (setting, method, teacher), rs in groups.items():
        e = {"setting": setting, "method": method, "teacher": teacher, "seeds": len(rs), "n": rs[0]["n"]}
        for k in ("clean", "pgd", "ibp_cert", "certified"):
            vals = [r[k] for r in rs if r[k] is not None]
            e[k] = _mean_std(vals) if vals else None
            e[f"{k}_seeds"] = len(vals)
        out.append(e)
    return out


def format_markdown(rows: list[dict], note: str = "") -> str:
    def cell(e, k):
        if e[k] is None:
            return "-"
        (m, sd), n = e[k], e[f"{k}_seeds"]
        text = f"{m:.2f}" if n == 1 else f"{m:.2f} ± {sd:.2f}"
        return text + (f" ({n} seed{'s' if n > 1 else ''})" if n != e["seeds"] else "")
    lines = [note, ""] if note else []
    lines += ["| setting | method | teacher | seeds | n | clean % | PGD % | IBP-cert % | certified % |",
              "|---|---|---|---|---|---|---|---|---|"]
    for e in summarize_seeds(rows):
        lines.append(f"| {e['setting']} | {e['method']} | {e['teacher'] or '-'} | {e['seeds']} | {e['n']} | "
                     f"{cell(e, 'clean')} | {cell(e, 'pgd')} | {cell(e, 'ibp_cert')} | {cell(e, 'certified')} |")
    lines += ["", "Per seed:", "", "| method | seed | split | clean % | PGD % | IBP-cert % | certified % | train s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = "-" if r["certified"] is None else f"{r['certified']:.2f}"
        lines.append(f"| {r['method']} | {r['seed']} | {r['split']} | {r['clean']:.2f} | {r['pgd']:.2f} | "
                     f"{r['ibp_cert']:.2f} | {c} | {r.get('train_time_s') or '-'} |")
    return "\n".join(lines) + "\n"


def plot_tradeoff(rows: list[dict], out: str | Path, title: str = "") -> Path:
    """Clean vs certified accuracy, one small marker per seed and the mean with std error bars per method
    (students only): against pipeline-certified accuracy (left, where it exists) and IBP-certified accuracy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in ("certified", "ibp_cert") if any(r[k] is not None for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.2), squeeze=False)
    for ax, xkey in zip(axes[0], keys):
        students = [r for r in rows if r.get("role") != "teacher" and r[xkey] is not None]
        for i, e in enumerate(summarize_seeds(students)):  # only the seeds that have the x metric
            rs = [r for r in students if r["method"] == e["method"] and r["setting"] == e["setting"]]
            color = f"C{i % 10}"
            ax.scatter([r[xkey] for r in rs], [r["clean"] for r in rs], s=12, color=color, alpha=0.5)
            ax.errorbar(e[xkey][0], e["clean"][0], xerr=e[xkey][1], yerr=e["clean"][1], fmt="o", color=color,
                        capsize=3, label=f"{e['method']} ({e['seeds']} seed{'s' if e['seeds'] > 1 else ''})")
        ax.set_xlabel("certified accuracy % (" + ("full pipeline" if xkey == "certified" else "IBP") + ")")
        ax.set_ylabel("clean accuracy %")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_results(name: str, rows: list[dict], results_dir: str | Path = "results", note: str = "") -> list[Path]:
    d = Path(results_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (d / f"{name}.md").write_text(f"# {name}\n\n" + format_markdown(rows, note))
    png = plot_tradeoff(rows, d / f"{name}.png", f"{name}: {rows[0]['setting']}" if rows else name)
    return [d / f"{name}.json", d / f"{name}.md", png]
