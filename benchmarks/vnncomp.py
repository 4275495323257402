"""certdist on a VNN-COMP benchmark, compared with the competition's published verdicts.

    python benchmarks/vnncomp.py BENCH_DIR --timeout 30 --out mnistfc-certdist.csv \
        --published vnncomp2021_results/results_csv [--category mnistfc] [--covered-only] \
        [--compare abcrown=abcrown.csv] [--skip-run]

``BENCH_DIR`` is a benchmark folder of the competition's repository (e.g. ``vnncomp2021/benchmarks/mnistfc``)
holding ``instances.csv`` or ``<name>_instances.csv`` (rows ``onnx,vnnlib,timeout``). Nothing is fetched:
point it at local copies.

1. Runs :func:`certdist.verify_instances` on the instances, every one with ``--timeout`` seconds (by
   default the csv's own timeout), and writes ``--out`` (``onnx,vnnlib,result,time_s``). With
   ``--covered-only`` the instances whose network :func:`certdist.load_onnx` refuses are left out (the
   refused op is printed); otherwise they count as ``error``. ``--skip-run`` reads an existing ``--out``.
2. Reads the published per-tool results (``--published``: the ``results_csv`` folder of the results
   repository, one ``<tool>.csv`` per tool with rows ``category,onnx,vnnlib,prepare_s,result,run_s``;
   ``holds``/``unsat`` -> unsat, ``violated``/``sat`` -> sat, anything else unsolved). As the
   organisers' ``process_results.py`` does, a tool's ``run_s`` minus its overhead (its smallest run
   time of a solved instance over all categories, floor 1 s) is its time; RPM's mnistfc results are
   left out (the organisers removed them: a VNN-LIB parsing bug). ``--compare NAME=CSV`` adds a run of
   another tool in this script's csv format (e.g. alpha-beta-CROWN run locally at the same timeout).
3. Prints: certdist's solved (sat + unsat) and time; each published tool's solved count (at the
   competition's timeout and within ours); per instance certdist's verdict, the published consensus
   (verdict with the number of tools for it / against it) and the compared runs; EVERY instance where
   certdist's sat/unsat contradicts a published one, marked ``AGAINST MAJORITY`` when it contradicts the
   majority of the published verdicts (a soundness alarm) and ``minority`` when it sides with the
   majority against a tool the other tools outvote; then the instances certdist solves and no published
   tool does, and those published tools solve and certdist does not.

Exit status 1 when certdist contradicts the majority of published verdicts on some instance.
"""
from __future__ import annotations

import argparse
import csv
import glob
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

SOLVED = ("sat", "unsat")


def find_instances(bench: Path) -> Path:
    for name in ("instances.csv", f"{bench.name}_instances.csv"):
        if (bench / name).exists():
            return bench / name
    found = sorted(bench.glob("*instances.csv"))
    if not found:
        raise SystemExit(f"{bench}: no instances.csv")
    return found[0]


def key_of(onnx: str, vnnlib: str) -> tuple[str, str]:
    """An instance, independent of the folder: (network file name, property file name), .gz dropped."""
    strip = lambda p: Path(p).name[:-3] if Path(p).name.endswith(".gz") else Path(p).name  # noqa: E731
    return strip(onnx), strip(vnnlib)


def normalise(result: str) -> str:
    """The competition's result words (process_results.py's substitutions) as sat / unsat / other."""
    r = result.strip().lower()
    if r in ("unsat", "holds"):
        return "unsat"
    if r in ("sat", "violated"):
        return "sat"
    if r.startswith("run_instance_timeout") or r == "timeout":
        return "timeout"
    return r or "unknown"


def read_published(folder: Path, category: str) -> dict[str, dict[tuple[str, str], tuple[str, float]]]:
    """tool -> instance -> (verdict, time after the tool's overhead) of the results_csv folder."""
    skip = {"RPM": {"mnistfc"}}  # process_results.py: skip_benchmarks['RPM'] = ['mnistfc']
    out = {}
    for path in sorted(glob.glob(str(folder / "*.csv"))):
        tool = Path(path).stem
        rows = list(csv.reader(open(path, newline="")))
        solved_times = [float(r[5]) for r in rows if len(r) >= 6 and normalise(r[4]) in SOLVED]
        overhead = min(solved_times) if solved_times else 0.0
        mine = {}
        for r in rows:
            if len(r) < 6 or r[0] != category:
                continue
            verdict = normalise(r[4]) if category not in skip.get(tool, ()) else "skipped"
            mine[key_of(r[1], r[2])] = (verdict, max(float(r[5]) - overhead, 1.0))
        if mine:
            out[tool] = mine
    return out


def read_run(path: Path) -> dict[tuple[str, str], tuple[str, float]]:
    """A csv ``onnx,vnnlib,result,time_s`` (verify_instances' ``out``)."""
    rows = list(csv.DictReader(open(path, newline="")))
    return {key_of(r["onnx"], r["vnnlib"]): (r["result"].strip().lower(), float(r["time_s"])) for r in rows}


def covered_networks(items, quiet: bool = False) -> dict[str, str]:
    """network path -> '' when certdist's importer reads it, else the refusal message."""
    from certdist.interop.onnx_import import load_onnx
    status = {}
    for onnx, _, _ in items:
        if str(onnx) in status:
            continue
        try:
            load_onnx(onnx)
            status[str(onnx)] = ""
        except Exception as e:  # OnnxImportError names the op and the node
            status[str(onnx)] = f"{type(e).__name__}: {e}"
            if not quiet:
                print(f"refused: {onnx.name}: {status[str(onnx)]}", file=sys.stderr)
    return status


def run_certdist(instances: Path, bench: Path, out: Path, timeout: float | None, covered_only: bool):
    from certdist.verification.vnnlib_verify import format_instances_summary, read_instances, verify_instances
    items = read_instances(instances, bench)
    status = covered_networks(items)
    refused = {k: v for k, v in status.items() if v}
    use = [it for it in items if not (covered_only and status[str(it[0])])]
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "instances.csv"
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            for onnx, vnnlib, t in use:
                w.writerow([onnx, vnnlib, t])
        opts = {"timeout": timeout} if timeout is not None else {}
        summary = verify_instances(csv_path, root=bench, out=out, **opts)
    print(format_instances_summary(summary))
    return items, refused


def consensus(verdicts: dict[str, str]) -> tuple[str, int, int]:
    """(majority verdict or 'conflict-tie' / '-', tools for it, tools against it) of sat/unsat verdicts."""
    n_sat = sum(v == "sat" for v in verdicts.values())
    n_unsat = sum(v == "unsat" for v in verdicts.values())
    if n_sat == n_unsat:
        return ("-" if n_sat == 0 else "tie"), n_sat, n_unsat
    return ("sat", n_sat, n_unsat) if n_sat > n_unsat else ("unsat", n_unsat, n_sat)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", type=Path, help="benchmark folder with instances.csv (or <name>_instances.csv)")
    ap.add_argument("--instances", type=Path, help="the instances csv (default: found in BENCH)")
    ap.add_argument("--timeout", type=float, help="seconds per instance for every instance (default: the csv's)")
    ap.add_argument("--out", type=Path, required=True, help="certdist's results csv (written, or read with --skip-run)")
    ap.add_argument("--skip-run", action="store_true", help="do not run certdist: read --out")
    ap.add_argument("--covered-only", action="store_true", help="only the instances whose network certdist reads")
    ap.add_argument("--published", type=Path, help="the results repository's results_csv folder")
    ap.add_argument("--category", help="the benchmark's name in the published results (default: BENCH's name)")
    ap.add_argument("--compare", action="append", default=[], metavar="NAME=CSV",
                    help="another tool's run in this script's csv format (onnx,vnnlib,result,time_s)")
    args = ap.parse_args(argv)

    bench = args.bench.resolve()
    instances = args.instances or find_instances(bench)
    category = args.category or bench.name
    from certdist.verification.vnnlib_verify import read_instances
    items = read_instances(instances, bench)
    if args.skip_run:
        refused = {k: v for k, v in covered_networks(items, quiet=True).items() if v} if args.covered_only else {}
    else:
        t0 = time.monotonic()
        items, refused = run_certdist(instances, bench, args.out, args.timeout, args.covered_only)
        print(f"certdist wall time: {time.monotonic() - t0:.1f} s")
    ours = read_run(args.out)
    others = {}
    for spec in args.compare:
        name, _, path = spec.partition("=")
        others[name] = read_run(Path(path))
    published = read_published(args.published, category) if args.published else {}

    keys = [key_of(str(o), str(v)) for o, v, _ in items]
    covered = [k for k, (o, _, _) in zip(keys, items) if str(o) not in refused]
    T = args.timeout
    print(f"\n== {category}: {len(keys)} instances, {len(covered)} covered by certdist's importer"
          + (f", timeout {T:g} s each" if T else ", the csv's timeouts"))
    for net, msg in sorted(refused.items()):
        print(f"  not covered: {Path(net).name}: {msg}")

    def summary(name, run, solved_within=None):
        rs = [run.get(k, ("missing", 0.0)) for k in keys]
        solved = [(r, t) for r, t in rs if r in SOLVED and (solved_within is None or t <= solved_within)]
        n_sat = sum(r == "sat" for r, _ in solved)
        return (f"{name:<12} solved {len(solved):>3} / {len(keys)} (sat {n_sat}, unsat {len(solved) - n_sat}); "
                f"time on solved {sum(t for _, t in solved):8.1f} s, total {sum(t for _, t in rs):8.1f} s")
    print(summary("certdist", ours))
    for name, run in others.items():
        print(summary(name, run))
    if published:
        print("published (the competition's own timeouts and hardware; time = run time minus the tool's overhead):")
        for tool, run in sorted(published.items()):
            if all(v == "skipped" for v, _ in run.values()):
                print(f"  {tool:<12} left out (the organisers removed its {category} results)")
                continue
            line = summary(tool, run)
            if T:
                within = sum(1 for k in keys if run.get(k, ("", 0))[0] in SOLVED and run[k][1] <= T)
                line += f"; solved within {T:g} s: {within}"
            print("  " + line)

    # per instance
    print(f"\n{'instance':<62} {'certdist':>16} {'published consensus':>22}" + "".join(f" {n:>16}" for n in others))
    against, minority = [], []
    only_ours, only_theirs = [], []
    for k in keys:
        r, t = ours.get(k, ("missing", 0.0))
        verdicts = {tool: run[k][0] for tool, run in published.items() if k in run and run[k][0] in SOLVED}
        verdict, n_for, n_against = consensus(verdicts)
        cons = f"{verdict} ({n_for}:{n_against})" if verdict != "-" else "-"
        if published and not any(k in run for run in published.values()):
            cons = "not run"
        name = f"{Path(k[0]).stem}/{Path(k[1]).stem}"
        cols = "".join(f" {o.get(k, ('-', 0))[0]:>9} {o.get(k, ('-', 0))[1]:6.1f}" for o in others.values())
        print(f"{name[:62]:<62} {r:>9} {t:6.1f} {cons:>22}{cols}")
        if r in SOLVED:
            opposed = sorted(tool for tool, v in verdicts.items() if v != r)
            if opposed:
                entry = (name, r, verdict, n_for, n_against, opposed)
                (against if verdict in SOLVED and verdict != r or verdict == "tie" else minority).append(entry)
            if not verdicts:
                only_ours.append((name, r, any(k in run for run in published.values())))
        elif verdicts:
            only_theirs.append((name, verdict))
        for oname, o in others.items():  # a compared run that contradicts certdist
            if r in SOLVED and o.get(k, ("", 0))[0] in SOLVED and o[k][0] != r:
                against.append((name, r, f"{oname}: {o[k][0]}", 0, 0, [oname]))

    print(f"\ncertdist's sat/unsat contradicting a published one: {len(against) + len(minority)}")
    for name, r, verdict, n_for, n_against, opposed in against:
        print(f"  AGAINST MAJORITY  {name}: certdist {r}, published {verdict} ({n_for}:{n_against}); "
              f"opposed by {', '.join(opposed)}")
    for name, r, verdict, n_for, n_against, opposed in minority:
        print(f"  minority          {name}: certdist {r} = published majority {verdict} ({n_for}:{n_against}); "
              f"only {', '.join(opposed)} said otherwise")
    print(f"contradicting the published majority: {len(against)}")
    print(f"\nsolved by certdist, by no published tool: {len(only_ours)}")
    for name, r, listed in only_ours:
        print(f"  {name}: {r}" + ("" if listed or not published else "  (not in the published results: not run there)"))
    print(f"solved by a published tool, not by certdist: {len(only_theirs)}")
    for name, verdict in only_theirs:
        print(f"  {name}: published {verdict}")
    for oname, o in others.items():
        mine = [k for k in keys if ours.get(k, ("", 0))[0] in SOLVED and o.get(k, ("", 0))[0] not in SOLVED]
        theirs = [k for k in keys if o.get(k, ("", 0))[0] in SOLVED and ours.get(k, ("", 0))[0] not in SOLVED]
        print(f"\nsolved by certdist, not by {oname}: {len(mine)}")
        for k in mine:
            print(f"  {Path(k[0]).stem}/{Path(k[1]).stem}: {ours[k][0]} {ours[k][1]:.1f} s ({oname}: {o.get(k, ('missing', 0))[0]})")
        print(f"solved by {oname}, not by certdist: {len(theirs)}")
        for k in theirs:
            print(f"  {Path(k[0]).stem}/{Path(k[1]).stem}: {o[k][0]} {o[k][1]:.1f} s (certdist: {ours.get(k, ('missing', 0))[0]})")
    return 1 if against else 0


if __name__ == "__main__":
    raise SystemExit(main())
