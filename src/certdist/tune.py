"""Hyper-parameter search on the validation split (``certdist tune``, :func:`certdist.tune`) with Optuna.

Every trial is an ordinary ``certdist train`` run of the base config + fixed overrides + the trial's
sampled values, forced onto the validation split: ``data.validation`` (the LAST N training images, never
trained on; the config's own value, ``validation=N``, or a tenth of the training set, at most 5,000) and
``eval.split=validation``, so the search never loads the test split. Trial ``k`` trains into
``<out>/trials/<study>_trial<k>/seed<seed>`` (a folder that already holds a run is an error, never
overwritten). The objectives (maximised) are read from the trial's ``results.json``: ``clean``
(validation clean accuracy), ``certified`` (IBP-certified) and ``robust`` (under the config's
``eval.attack``). A trial is pruned after an epoch where the median of the finished trials at that epoch
dominates it on the objectives with a per-epoch value (Optuna's own pruners take one objective only).

The study lives in ``sqlite:///<out>/study.db`` (or ``storage``); rerunning adds trials to it, and several
processes (``workers``, or several ``certdist tune`` on the same ``out``) share it. The report:
``trials.csv``, ``pareto.csv`` (also printed), ``pareto.png`` (clean vs certified, front highlighted) and
``best/trial<k>.yaml``: the Pareto-optimal configs for ``certdist train --config`` (the base config's
own split settings, i.e. trained on the whole training set and evaluated on test).
"""
from __future__ import annotations

import csv
import difflib
import json
import math
import os
import statistics
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from certdist.config import ConfigError, RunConfig, config_keys, differing_keys, dump_yaml, load_config, to_dict

# objective name -> (key in results.json, per-epoch column of metrics.csv or None)
OBJECTIVES = {"clean": ("clean_acc", "val_clean"), "certified": ("ibp_cert_acc", "val_ibp_cert"),
              "robust": ("robust_acc", None)}
KINDS = ("uniform", "loguniform", "int", "logint", "choice")
SAMPLERS = ("tpe", "nsga2", "random")
# keys the search sets itself: they may not be searched over
RESERVED = frozenset({"name", "out_dir", "eval.split", "data.validation", "progress", "device", "num_threads",
                      "logger"})
MIN_PEERS = 3  # finished trials needed at an epoch before a trial can be pruned there
__all__ = ["Param", "TuneError", "TuneResult", "parse_space", "pareto_front", "tune"]


class TuneError(ConfigError):
    """A bad search space, a study made with other settings, or a trial folder already in use."""


@dataclass(frozen=True)
class Param:
    """One searched config key: ``kind`` one of :data:`KINDS`; ``low``/``high`` (and ``step``) for ranges,
    ``choices`` for ``choice``."""
    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple = ()

    def spec(self) -> str:
        """The canonical ``key=kind:...`` text (what ``--space`` takes)."""
        if self.kind == "choice":
            return f"{self.key}=choice:{json.dumps(list(self.choices))}"
        tail = f":{_num(self.step)}" if self.step is not None else ""
        return f"{self.key}={self.kind}:{_num(self.low)}:{_num(self.high)}{tail}"

    def suggest(self, trial) -> Any:
        if self.kind == "choice":
            scalar = all(c is None or isinstance(c, (bool, int, float, str)) for c in self.choices)
            if scalar:
                return trial.suggest_categorical(self.key, list(self.choices))
            i = trial.suggest_categorical(self.key, [json.dumps(c) for c in self.choices])
            return json.loads(i)
        if self.kind in ("int", "logint"):
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1),
                                     log=self.kind == "logint")
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.kind == "loguniform")


def _num(v: float | None) -> str:
    return str(int(v)) if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e15) else repr(v)


def _override(key: str, value: Any) -> str:
    """``key=value`` as the config loader reads it back (JSON is YAML flow; strings as they are)."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


# ---------------------------------------------------------------------------------------------
# the search space


def _number(key: str, text: Any, what: str) -> float:
    from certdist.threats import parse_eps
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    try:
        return parse_eps(str(text).strip())  # numbers, and the eps notation 8/255
    except ValueError:
        raise TuneError(f"space {key}: the {what} {text!r} is not a number") from None


def _parse_one(key: str, spec: Any) -> Param:
    """A spec (``loguniform:1e-4:1e-3``, ``choice:0.05,0.1``, a list of choices, or a mapping with ``type``,
    ``low``, ``high``, ``step`` / ``choices``) -> :class:`Param`, checked (not yet against the config)."""
    if isinstance(spec, (list, tuple)):
        spec = {"type": "choice", "choices": list(spec)}
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"type", "low", "high", "step", "log", "choices"}
        if unknown:
            raise TuneError(f"space {key}: unknown fields {sorted(unknown)}; use type, low, high, step, choices")
        kind = spec.get("type") or ("choice" if "choices" in spec else "uniform")
        if kind in ("uniform", "int") and spec.get("log"):
            kind = "log" + ("uniform" if kind == "uniform" else "int")
        parts = {"low": spec.get("low"), "high": spec.get("high"), "step": spec.get("step"),
                 "choices": spec.get("choices")}
    elif isinstance(spec, str):
        kind, _, rest = spec.partition(":")
        kind = kind.strip()
        if kind == "choice":
            rest = rest.strip()
            if rest.startswith("["):
                try:
                    choices = yaml.safe_load(rest)
                except yaml.YAMLError as e:
                    raise TuneError(f"space {key}: bad choice list {rest!r}: {e}") from None
            else:
                choices = [yaml.safe_load(c) if c.strip() else None for c in rest.split(",")] if rest else []
            parts = {"choices": choices}
        else:
            vals = rest.split(":") if rest else []
            if len(vals) not in (2, 3):
                raise TuneError(f"space {key}: {spec!r} should be {kind or 'kind'}:low:high[:step] "
                                f"(kinds: {', '.join(KINDS)})")
            parts = {"low": vals[0], "high": vals[1], "step": vals[2] if len(vals) == 3 else None}
    else:
        raise TuneError(f"space {key}: expected a spec like loguniform:1e-4:1e-3 or choice:a,b, got {spec!r}")
    if kind not in KINDS:
        raise TuneError(f"space {key}: unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    if kind == "choice":
        choices = parts["choices"]
        if not isinstance(choices, list) or not choices:
            raise TuneError(f"space {key}: choice needs at least one value, e.g. {key}=choice:0.05,0.1")
        if len({json.dumps(c, sort_keys=True) for c in choices}) != len(choices):
            raise TuneError(f"space {key}: repeated choices {choices}")
        return Param(key, "choice", choices=tuple(tuple(c) if isinstance(c, list) else c for c in choices))
    if parts.get("low") is None or parts.get("high") is None:
        raise TuneError(f"space {key}: {kind} needs low and high")
    low, high = _number(key, parts["low"], "lower end"), _number(key, parts["high"], "upper end")
    step = None if parts.get("step") in (None, "") else _number(key, parts["step"], "step")
    if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
        raise TuneError(f"space {key}: need low < high, got {_num(low)} and {_num(high)}")
    if kind in ("loguniform", "logint") and not low > 0:
        raise TuneError(f"space {key}: a log range needs low > 0, got {_num(low)}")
    if step is not None and (not step > 0 or kind in ("loguniform", "logint")):
        raise TuneError(f"space {key}: a step must be > 0 and only goes with uniform or int ranges")
    if kind in ("int", "logint"):
        if not (low.is_integer() and high.is_integer() and (step is None or step.is_integer())):
            raise TuneError(f"space {key}: int ranges need integer ends (and step), got {spec!r}")
        return Param(key, kind, int(low), int(high), None if step is None else int(step))
    return Param(key, kind, low, high, step)


def _flatten(data: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in data.items():
        if isinstance(v, Mapping) and not ({"type", "low", "high", "choices", "step", "log"} & set(v)):
            out += _flatten(v, f"{prefix}{k}.")  # nested sections: distill: {beta: ...}
        else:
            out.append((f"{prefix}{k}", v))
    return out


def parse_space(space: "str | os.PathLike | Mapping[str, Any] | Iterable[str] | None",
                base: RunConfig | None = None) -> list[Param]:
    """The search space from a YAML file path, a mapping ``{key: spec}`` or ``key=spec`` strings, where a
    spec is ``uniform:low:high[:step]``, ``loguniform:low:high``, ``int:low:high[:step]``, ``logint:low:high``,
    ``choice:a,b,c`` (``choice:[[8, 9], [5, 6]]`` for lists), a YAML list of choices or a mapping
    ``{type, low, high, step}`` / ``{choices}``. Keys are dotted config keys (``distill.beta``). With ``base``
    (the resolved base config) every end and choice is checked to make a valid config. TuneError otherwise."""
    if space is None:
        items: list[tuple[str, Any]] = []
    elif isinstance(space, (str, os.PathLike)) and not (isinstance(space, str) and "=" in space):
        p = Path(space)
        if not p.is_file():
            raise TuneError(f"search-space file not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, Mapping):
            raise TuneError(f"{p}: expected a mapping of config keys to specs")
        items = _flatten(data)
    elif isinstance(space, Mapping):
        items = _flatten(space)
    else:
        items = []
        for s in ([space] if isinstance(space, str) else space):
            k, eq, v = str(s).partition("=")
            if not eq or not k.strip():
                raise TuneError(f"space {s!r} is not of the form key=kind:... (e.g. lr=loguniform:1e-4:1e-3)")
            items.append((k.strip(), v.strip()))
    known = [k for k, _ in config_keys()]
    params: list[Param] = []
    for key, spec in items:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            raise TuneError(f"space: unknown config key {key!r}" + (f"; did you mean {', '.join(close)}?" if close
                                                                    else "; see certdist config show"))
        if key in RESERVED:
            raise TuneError(f"space: {key} is set by the search itself and cannot be searched over")
        if any(p.key == key for p in params):
            raise TuneError(f"space: {key} is given twice")
        params.append(_parse_one(key, spec))
    if base is not None:
        for p in params:
            ends = list(p.choices) if p.kind == "choice" else [p.low, p.high]
            for v in ends:
                v = list(v) if isinstance(v, tuple) else v
                try:
                    _apply(base, {p.key: v})
                except ConfigError as e:
                    raise TuneError(f"space {p.spec()}: the value {v!r} makes a bad config: {e}") from None
    return params


def _apply(base: RunConfig, values: Mapping[str, Any]) -> RunConfig:
    """``base`` with dotted-key ``values`` replaced, validated as ``certdist train`` would."""
    from certdist.config import from_dict
    data = _base_record(base)
    for k, v in values.items():
        d = data
        *parents, last = k.split(".")
        for s in parents:
            d = d.setdefault(s, {})
        d[last] = list(v) if isinstance(v, tuple) else v
    return from_dict(data)


def _base_record(base: RunConfig) -> dict:
    """The config as a dict that rebuilds it; ``distill.level`` left out when it is the loss's default,
    so a searched ``distill.loss`` picks its own level as on the command line."""
    data = to_dict(base)
    d = data["distill"]
    if d["level"] == ("logits" if d["loss"] == "kl" else "features"):
        d.pop("level")
    return data


# ---------------------------------------------------------------------------------------------
# the study


@dataclass
class TuneResult:
    """What :func:`tune` made: the Optuna ``study``, the Pareto ``front`` (one dict per trial: number,
    objective values, params, run folder, config YAML) and the report files (None without a report)."""
    study: Any
    front: list[dict] = field(default_factory=list)
    trials_csv: Path | None = None
    pareto_csv: Path | None = None
    plot: Path | None = None
    configs: list[Path] = field(default_factory=list)
    table: str = ""


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ImportError("certdist tune needs Optuna: pip install 'certdist[tune]' (or pip install optuna)") from None
    return optuna


# A running trial's process writes a heartbeat every HEARTBEAT_S seconds; one silent for GRACE_S (its process
# was killed) is marked FAIL by the next trial started on the study and queued again with the same values
# (at most MAX_RETRY times), resuming the killed trial's folder from its last checkpoint.
HEARTBEAT_S = 60
GRACE_S = 300
MAX_RETRY = 2


def _storage(optuna, url: str):
    """An RDB storage (SQLite, PostgreSQL, MySQL URLs) with heartbeats and retries of killed trials; other
    URLs are given to Optuna as they are."""
    if "://" not in url:
        return url
    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    key = "heartbeat_stale_trial_callback"
    if retry_cls is None:  # Optuna < 4.9
        retry_cls, key = optuna.storages.RetryFailedTrialCallback, "failed_trial_callback"
    # several processes write to one SQLite file: wait for its lock, not fail
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite:") else None
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                          grace_period=GRACE_S, **{key: retry_cls(max_retry=MAX_RETRY)})


def _sampler(optuna, name: str, seed: int, n_objectives: int):
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise TuneError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")


def default_validation(cfg: RunConfig) -> int:
    """The validation hold-out of the search: the config's ``data.validation``, else a tenth of the
    training set, at most 5,000 images."""
    from certdist.data import dataset_info
    if cfg.data.validation is not None:
        return cfg.data.validation
    return max(1, min(5000, dataset_info(cfg.data.dataset).num_train // 10))


def _signature(base: RunConfig, params: Sequence[Param], objectives: Sequence[str], validation: int) -> dict:
    return {"base": to_dict(base), "space": sorted(p.spec() for p in params), "objectives": list(objectives),
            "validation": validation}


def _check_signature(study, sig: dict) -> None:
    saved = study.user_attrs.get("certdist")
    if saved is None:
        if study.trials:
            raise TuneError(f"study {study.study_name!r} exists with trials but was not made by certdist tune")
        study.set_user_attr("certdist", sig)
        return
    problems = []
    diff = differing_keys(saved["base"], sig["base"])
    if diff:
        problems.append(f"base config keys {diff}")
    for k in ("space", "objectives", "validation"):
        if saved.get(k) != sig[k]:
            problems.append(f"{k} {saved.get(k)} (now {sig[k]})")
    if problems:
        raise TuneError(f"study {study.study_name!r} was made with other settings: {'; '.join(problems)}. Resume "
                        "it with the same config, space and objectives, or use another --out / --study-name")


def _trial_config(base: RunConfig, values: Mapping[str, Any], out: Path, study_name: str, number: int,
                  validation: int, runtime: Mapping[str, Any]) -> RunConfig:
    forced = {"name": f"{study_name}_trial{number:04d}", "out_dir": str(out / "trials"),
              "data.validation": validation, "eval.split": "validation", "progress": False, **runtime}
    cfg = _apply(base, {**values, **forced})
    assert cfg.eval.split == "validation" and cfg.data.validation == validation  # the test split stays unread
    return cfg


def _trial_number_of(run_dir: str) -> int:
    """The trial number in ``<out>/trials/<study>_trial<k>/seed<s>``."""
    name = Path(run_dir).parent.name
    try:
        return int(name.rsplit("_trial", 1)[1])
    except (IndexError, ValueError):
        raise TuneError(f"cannot resume the killed trial's folder {run_dir}: not a <study>_trial<k> folder") from None


def _finished_same(run: Path, cfg: RunConfig) -> bool:
    """``run`` holds a finished run of ``cfg`` (the keys that matter for the result)."""
    from certdist.training.loop import RESUME_IGNORES
    f = run / "results.json"
    if not f.exists():
        return False
    saved = json.loads(f.read_text()).get("config", {})
    return not differing_keys(saved, to_dict(cfg), RESUME_IGNORES)


def _objective_fn(study, base: RunConfig, params: Sequence[Param], objectives: Sequence[str], out: Path,
                  validation: int, prune_after: int | None, runtime: Mapping[str, Any]):
    optuna = _optuna()
    from certdist.training.loop import run_dir_for, train
    per_epoch = [OBJECTIVES[o][1] for o in objectives if OBJECTIVES[o][1]]

    def objective(trial):
        values = {p.key: p.suggest(trial) for p in params}
        # a retry of a killed trial inherits its user attributes: its folder, resumed from the last checkpoint
        inherited = trial.user_attrs.get("run_dir")
        number = _trial_number_of(inherited) if inherited else trial.number
        cfg = _trial_config(base, values, out, study.study_name, number, validation, runtime)
        run = run_dir_for(cfg)
        resume = inherited is not None and Path(inherited) == run and (run / "last.pt").exists()
        if not resume and run.exists() and any(run.iterdir()):
            raise TuneError(f"{run} already holds a run (of an earlier study in {out}?); it is not overwritten: "
                            "use another --out or --study-name, or remove that folder")
        trial.set_user_attr("run_dir", str(run))
        if resume:
            trial.set_user_attr("resumed_from", number)

        def on_epoch(row: dict) -> None:
            e = int(row["epoch"])
            vals = [row.get(c) for c in per_epoch]
            if not per_epoch or any(v is None for v in vals):
                return
            trial.set_user_attr(f"epoch{e}", vals)
            if prune_after is None or e < prune_after or e >= cfg.epochs:
                return
            peers = [t.user_attrs.get(f"epoch{e}") for t in
                     study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
            peers = [p for p in peers if p and len(p) == len(vals)]
            if len(peers) < MIN_PEERS:
                return
            med = [statistics.median(col) for col in zip(*peers)]
            if all(v <= m for v, m in zip(vals, med)) and any(v < m for v, m in zip(vals, med)):
                trial.set_user_attr("pruned_at", e)
                raise optuna.TrialPruned(f"epoch {e}: {vals} dominated by the median {med} of {len(peers)} "
                                         "finished trials")

        if not (resume and _finished_same(run, cfg)):  # a trial killed after training but before reporting
            train(cfg, resume=resume, on_epoch=on_epoch)
        results = json.loads((run / "results.json").read_text())
        if results.get("split") != "validation":
            raise TuneError(f"{run}: evaluated on the {results.get('split')!r} split, not validation")
        trial.set_user_attr("results", {k: results.get(k) for k in
                                        ("split", "n", "clean_acc", "robust_acc", "ibp_cert_acc", "attack")})
        return tuple(float(results[OBJECTIVES[o][0]]) for o in objectives)

    return objective


def tune(config: "str | os.PathLike | None", space: Any, trials: int = 20, out: "str | os.PathLike" = "runs/tune",
         overrides: Sequence[str] = (), objectives: Sequence[str] = ("clean", "certified"), workers: int = 1,
         sampler: str = "tpe", seed: int = 0, prune: bool = True, prune_after: int | None = None,
         validation: int | None = None, storage: str | None = None, study_name: str = "tune",
         certify_front: bool = False, certify_timeout: float = 10.0, certify_limit: int | None = 100,
         report: bool = True, verbose: bool = True) -> TuneResult:
    """Search hyper-parameters of ``config`` (a YAML path as for ``certdist train``, or None: the defaults)
    + ``overrides`` (``key=value``) over ``space`` (see :func:`parse_space`) on the validation split.

    Runs ``trials`` new trials (split over ``workers`` processes sharing the study) in the study
    ``study_name`` of ``storage`` (default ``sqlite:///<out>/study.db``, created or resumed); ``objectives``:
    names of :data:`OBJECTIVES`, all maximised (two: a Pareto front). ``sampler``: ``tpe`` (multi-objective
    TPE), ``nsga2`` or ``random``, seeded with ``seed``. ``prune``: stop a trial after epoch ``prune_after``
    (default: the first epoch after the warm-up and eps ramp) or later when the median of the finished
    trials at that epoch dominates it (no better anywhere, worse somewhere; needs 3 finished trials). ``validation``: the held-out size (see
    :func:`default_validation`). ``certify_front``: also run the full verification pipeline
    (:func:`certdist.certify`, ``certify_timeout`` s per point) on the first ``certify_limit`` validation
    points of every Pareto-optimal trial. ``report``: write ``trials.csv``, ``pareto.csv``, ``pareto.png``
    and ``best/trial<k>.yaml`` under ``out`` and print the front. Returns a :class:`TuneResult`."""
    optuna = _optuna()
    from certdist.training.loop import TrainingError
    out = Path(out)
    objectives = list(objectives)
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives or len(set(objectives)) != len(objectives):
        raise TuneError(f"objectives: need distinct names from {', '.join(OBJECTIVES)}, got {objectives}")
    if trials < 0 or workers < 1:
        raise TuneError(f"need trials >= 0 and workers >= 1, got {trials} and {workers}")
    if sampler not in SAMPLERS:
        raise TuneError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    overrides = list(overrides)
    base = load_config(config, overrides)
    params = parse_space(space, base)
    if not params:
        raise TuneError("empty search space: give key=kind:... items (e.g. lr=loguniform:1e-4:1e-3) or a space file")
    validation = validation if validation is not None else default_validation(base)
    _apply(base, {"data.validation": validation, "eval.split": "validation"})  # a bad size fails now
    if prune and prune_after is None:
        prune_after = base.warmup_epochs + base.ramp_epochs + 1
    if not prune:
        prune_after = None
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{out.resolve() / 'study.db'}"
    storage_obj = _storage(optuna, storage)
    study = optuna.create_study(storage=storage_obj, study_name=study_name, load_if_exists=True,
                                directions=["maximize"] * len(objectives))
    _check_signature(study, _signature(base, params, objectives, validation))
    # seeded by the trials so far too: a resumed study (or a second worker) does not replay the first draws
    study = optuna.load_study(storage=storage_obj, study_name=study_name,
                              sampler=_sampler(optuna, sampler, seed + len(study.trials), len(objectives)))
    runtime: dict[str, Any] = {}
    if workers > 1 and base.num_threads is None:  # processes share the cores: oversubscription is >10x slower
        runtime["num_threads"] = max(1, (os.cpu_count() or 1) // workers)
    shares = [trials // workers + (i < trials % workers) for i in range(workers)]
    procs = []
    for i in range(1, workers):
        if shares[i]:
            cmd = [sys.executable, "-m", "certdist", "tune", *([str(config)] if config is not None else []),
                   *overrides, *(_override(k, v) for k, v in runtime.items()), "--space", *(p.spec() for p in params),
                   "--trials", str(shares[i]), "--out", str(out), "--storage", storage, "--study-name", study_name,
                   "--objective", *objectives, "--sampler", sampler, "--seed", str(seed + 1000 * i),
                   "--validation", str(validation), "--no-report",
                   *(["--prune-after", str(prune_after)] if prune_after is not None else ["--no-prune"])]
            procs.append(subprocess.Popen(cmd))
    try:
        if shares[0]:
            if not verbose:
                optuna.logging.set_verbosity(optuna.logging.WARNING)
            fn = _objective_fn(study, base, params, objectives, out, validation, prune_after, runtime)
            study.optimize(fn, n_trials=shares[0], catch=(TrainingError,))
    finally:
        codes = [p.wait() for p in procs]
    if any(codes):
        raise TuneError(f"{sum(1 for c in codes if c)} of {len(procs)} worker processes failed; see their output")
    result = TuneResult(study)
    if report:
        result = write_report(study, out, objectives, base, overrides, certify_front=certify_front,
                              certify_timeout=certify_timeout, certify_limit=certify_limit, verbose=verbose)
    return result


# ---------------------------------------------------------------------------------------------
# the report


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates (all objectives maximised)."""
    def dominates(a, b):
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


def best_config(base: RunConfig, params: Mapping[str, Any], number: int) -> RunConfig:
    """The base config with a trial's values, named ``<base name>_tune<k>``, with the base config's own
    split settings (train on the training set, evaluate as the base config does)."""
    return _apply(base, {**params, "name": f"{base.name}_tune{number:04d}"})


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(rows: list[dict], cols: list[str]) -> str:
    cells = [[c for c in cols]] + [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(s.ljust(w) for s, w in zip(row, widths)).rstrip() for row in cells)


def _write_csv(path: Path, rows: list[dict], cols: list[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: (json.dumps(v) if isinstance(v, (list, tuple)) else v) for c, v in r.items()})


def write_report(study, out: "str | os.PathLike", objectives: Sequence[str], base: RunConfig,
                 overrides: Sequence[str] = (), certify_front: bool = False, certify_timeout: float = 10.0,
                 certify_limit: int | None = 100, verbose: bool = True) -> TuneResult:
    """``trials.csv`` (every trial), ``pareto.csv`` and ``pareto.png`` (the front of the finished trials) and
    ``best/trial<k>.yaml`` (their configs, ready for ``certdist train --config``) under ``out``."""
    optuna = _optuna()
    out = Path(out)
    keys = sorted({k for t in study.trials for k in t.params})
    rows = []
    for t in study.trials:
        r: dict[str, Any] = {"trial": t.number, "state": t.state.name}
        for o, v in zip(objectives, t.values or []):
            r[o] = round(v, 4)
        r |= {k: t.params.get(k, "") for k in keys}
        r |= {"pruned_at": t.user_attrs.get("pruned_at", ""), "run_dir": t.user_attrs.get("run_dir", "")}
        rows.append(r)
    cols = ["trial", "state", *objectives, *keys, "pruned_at", "run_dir"]
    _write_csv(out / "trials.csv", rows, cols)

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    front_idx = pareto_front([t.values for t in done])
    front_trials = sorted((done[i] for i in front_idx), key=lambda t: [-v for v in t.values])
    best_dir = out / "best"
    best_dir.mkdir(exist_ok=True)
    for old in best_dir.glob("trial*.yaml"):  # the folder holds the current front only
        old.unlink()
    front, configs = [], []
    for t in front_trials:
        cfg = best_config(base, t.params, t.number)
        path = best_dir / f"trial{t.number:04d}.yaml"
        vals = ", ".join(f"{o} {v:.2f} %" for o, v in zip(objectives, t.values))
        path.write_text(f"# certdist tune: trial {t.number} of study {study.study_name!r} ({out}), Pareto-optimal on "
                        f"the validation split: {vals}\n# searched: {json.dumps(t.params)}\n"
                        f"# train: certdist train --config {path}\n" + dump_yaml(cfg))
        configs.append(path)
        row = {"trial": t.number, **{o: round(v, 4) for o, v in zip(objectives, t.values)}, **t.params,
               "run_dir": t.user_attrs.get("run_dir", ""), "config": str(path)}
        if certify_front and row["run_dir"]:  # (a trial added by hand has no run)
            row |= _certify_trial(Path(row["run_dir"]), certify_timeout, certify_limit)
        front.append(row)
    extra = ["verified", "verify_n"] if certify_front else []
    pcols = ["trial", *objectives, *extra, *keys, "config", "run_dir"]
    _write_csv(out / "pareto.csv", front, pcols)
    table = _table(front, ["trial", *objectives, *extra, *keys])
    plot = _plot(study, done, front_idx, objectives, out / "pareto.png")
    if verbose:
        n_state = {}
        for t in study.trials:
            n_state[t.state.name.lower()] = n_state.get(t.state.name.lower(), 0) + 1
        print(f"study {study.study_name!r}: {len(study.trials)} trials ("
              + ", ".join(f"{v} {k}" for k, v in sorted(n_state.items())) + f"); Pareto front on the validation split "
              f"({', '.join(objectives)}, %):")
        print(table)
        print(f"written: {out / 'trials.csv'}, {out / 'pareto.csv'}, {plot}, {best_dir}/trial*.yaml")
    return TuneResult(study, front, out / "trials.csv", out / "pareto.csv", plot, configs, table)


def _certify_trial(run_dir: Path, timeout: float, limit: int | None) -> dict:
    """The full verification pipeline on the trial's validation points (never the test split)."""
    from certdist.config import from_dict
    from certdist.threats import ThreatModel
    from certdist.training.checkpoint import model_from_checkpoint
    from certdist.training.loop import load_splits
    from certdist.verification.certify import certify_dataset
    cfg = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    if cfg.eval.split != "validation":
        raise TuneError(f"{run_dir}: not a validation-split trial")
    _, val = load_splits(cfg)
    model, _ = model_from_checkpoint(run_dir / "last.pt")
    s = certify_dataset(model, val.images.float() / 255, val.labels, ThreatModel(cfg.eps),
                        run_dir / f"certify_val_eps{cfg.eps:g}.jsonl", timeout=timeout, limit=limit, progress=False)
    return {"verified": round(100 * s["certified_accuracy"], 2), "verify_n": s["n"]}


def _plot(study, done, front_idx: list[int], objectives: Sequence[str], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    if len(objectives) >= 2:
        xs = [t.values[0] for t in done]
        ys = [t.values[1] for t in done]
        ax.scatter(xs, ys, s=18, c="0.6", label="trials")
        fr = sorted(front_idx, key=lambda i: xs[i])
        ax.plot([xs[i] for i in fr], [ys[i] for i in fr], "o-", c="C3", drawstyle="steps-pre", label="Pareto front")
        labels: dict[tuple, list[str]] = {}  # trials at the same point share one label
        for i in fr:
            labels.setdefault((xs[i], ys[i]), []).append(str(done[i].number))
        for xy, names in labels.items():
            ax.annotate(",".join(names), xy, textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(f"validation {objectives[0]} accuracy (%)")
        ax.set_ylabel(f"validation {objectives[1]} accuracy (%)")
    else:
        ax.plot([t.number for t in done], [t.values[0] for t in done], "o", c="0.6", label="trials")
        ax.plot([done[i].number for i in front_idx], [done[i].values[0] for i in front_idx], "o", c="C3", label="best")
        ax.set_xlabel("trial")
        ax.set_ylabel(f"validation {objectives[0]} accuracy (%)")
    ax.set_title(f"certdist tune: {study.study_name} ({len(done)} finished trials)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


class _CallableModule(types.ModuleType):
    """``certdist.tune`` is both this module and the function: once ``import certdist.tune`` has run, the
    package attribute is the module, so calling it calls :func:`tune`."""

    def __call__(self, *args: Any, **kwargs: Any) -> TuneResult:
        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
