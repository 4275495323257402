"""Frozen, typed run configuration: defaults < YAML file < ``key=value`` command-line overrides.

Every run saves its resolved config (``config.yaml`` and inside each checkpoint), so any number
can be traced back to the exact settings that produced it.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from certdist.threats import check_eps_in_range, parse_eps
from certdist.training.schedules import scale_schedule


class ConfigError(ValueError):
    """An unknown key or a bad value in a configuration."""


# ---------------------------------------------------------------------------------------------
# training methods: one registry (as timm's models) that the config, its help and the objective read


@dataclass(frozen=True)
class Method:
    """A training method: its name, one line of help, what the per-batch objective needs, and its recipe.

    ``defaults``: the method's recipe as nested config values. They sit between the dataclass defaults
    below and what a YAML file, a ``key=value`` override or a :func:`certdist.fit` option sets, so a run
    that names only the method gets the method's recipe, and explicit values always win (key by key:
    ``attack={"steps": 3}`` keeps the recipe's ``attack.step_size``). Keys the recipe leaves out take the
    :class:`RunConfig` defaults, the shared 10-epoch recipe of the certified methods (1 warm-up epoch,
    5 ramp epochs, lr x0.2 at epochs 8 and 9, the expressive losses' one-step training attack of 10 x eps).
    The schedule (``warmup_epochs``, ``ramp_epochs``, ``lr_milestones``) is defined for the recipe's
    ``epochs``; a run with other ``epochs`` gets it scaled (:func:`scale_schedule`) unless it sets it."""
    name: str
    help: str
    certified: bool = False      # trains against bounds (IBP / CROWN-IBP): may distil from a teacher
    attack: bool = False         # needs the training attack's point (the attack.* settings)
    alpha: bool = False          # mixes the attack point's and the bound's losses with ``alpha``
    uses_eps: bool = True        # trains at eps > 0 (after warmup_epochs, ramped over ramp_epochs)
    defaults: Mapping[str, Any] = field(default_factory=dict)


METHOD_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (its name must be new); returns it."""
    if method.name in METHOD_REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    METHOD_REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; a ConfigError listing the known ones otherwise."""
    try:
        return METHOD_REGISTRY[name]
    except KeyError:
        raise ConfigError(f"method: unknown method {name!r}; valid: {', '.join(METHOD_REGISTRY)}") from None


# no bounds, no eps ramp, PyTorch's init (configs/small/*_standard.yaml and *_pgd-at-teacher.yaml)
_UNCERTIFIED = {"warmup_epochs": 0, "ramp_epochs": 0, "reg_weight": 0.0, "model": {"init": "default"}}
register_method(Method("standard", "cross-entropy on clean inputs", uses_eps=False, defaults=_UNCERTIFIED))
register_method(Method("pgd-at", "PGD adversarial training (Madry et al. 2018; a teacher): 10 steps of eps/4",
                       attack=True, defaults={**_UNCERTIFIED, "attack": {"steps": 10, "step_size": 0.25}}))
register_method(Method("ibp", "IBP (Gowal et al. 2018)", certified=True))
register_method(Method("crown-ibp", "CROWN-IBP (Zhang et al. 2020)", certified=True))
register_method(Method("sabr", "SABR (Mueller et al. 2023)", certified=True, attack=True))
register_method(Method("mtl-ibp", "MTL-IBP (De Palma et al. 2024)", certified=True, attack=True, alpha=True))
register_method(Method("cc-ibp", "CC-IBP (De Palma et al. 2024); with distill.teacher=...: CC-Dist",
                       certified=True, attack=True, alpha=True))
register_method(Method("exp-ibp", "Exp-IBP (De Palma et al. 2024)", certified=True, attack=True, alpha=True))

METHODS = tuple(METHOD_REGISTRY)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "mnist"
    data_dir: Optional[str] = None       # None: $CERTDIST_DATA or ./data
    train_limit: Optional[int] = None    # use only the first N training examples (quick runs)
    test_limit: Optional[int] = None
    augment: Optional[bool] = None       # None: the dataset's default (crop + flip for CIFAR-like data)
    validation: Optional[int] = None     # hold out the LAST N training images (fixed) as a validation split


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "dm_small"
    init: str = "ibp"                    # "ibp" (Shi et al. 2021) or "default" (PyTorch)


@dataclass(frozen=True)
class AttackConfig:
    """The attack that makes ``x_adv`` during training (PGD-AT, SABR and the expressive losses)."""
    steps: int = 1
    step_size: float = 10.0              # relative to the (attack) eps: step = step_size * eps
    eps_factor: float = 1.0              # attack box = eps_factor * current training eps
    random_start: bool = True
    restarts: int = 1
    train_mode: bool = False             # attack the train-mode network (BatchNorm batch statistics)


@dataclass(frozen=True)
class DistillConfig:
    """CC-Dist: distillation from a frozen teacher (``teacher`` = a checkpoint path).

    The defaults are the variant chosen on the MNIST validation split (issue 11, docs/results.md):
    soft-label logit distillation, T = 4, beta = 0.1. The paper's form is ``loss: box`` (features, raw).
    """
    teacher: Optional[str] = None
    beta: Optional[float] = None         # None: 0.1 for loss kl, else 5 / feature_dim (a third-party scaling)
    alpha: Optional[float] = None        # None: the certified loss's alpha
    level: Optional[str] = None          # "features" (the paper) or "logits" (AD-CERT-like);
                                         # None: logits for loss kl, else features
    teacher_input: str = "clean"         # "clean" (the paper) or "adversarial"
    student: str = "adversarial"         # kl: the student's logits at the attack point, or "certified": its
                                         # CC-IBP pseudo-logits -[(1-a) zd(x_adv) + a zd_IBP] (a: distill alpha)
    projection: bool = False             # learn a linear map student features -> teacher features
    cache: bool = True                   # cache clean teacher features when augmentation allows
    loss: str = "kl"                     # "box" (the paper: worst case over the convex-combination box),
                                         # "point" (distance at the adversarial point), "kl" (soft labels, logits)
    features: str = "raw"                # "raw", "standardized" or "normalized" (scale-free; see losses.distillation)
    temperature: float = 4.0             # of the "kl" loss
    beta_schedule: str = "constant"      # "constant"; "decay": full until the eps ramp ends, then linearly to 0;
                                         # "late": 0 until the eps ramp ends, then full

    def __post_init__(self) -> None:
        if self.level is None:
            object.__setattr__(self, "level", "logits" if self.loss == "kl" else "features")


@dataclass(frozen=True)
class EvalConfig:
    pgd_steps: int = 40
    pgd_restarts: int = 1
    pgd_step_size: float = 0.035         # relative to eps, as in the expressive-losses code
    attack: str = "pgd"                  # "pgd", "apgd" (APGD-CE + APGD-DLR) or "autoattack" (standard; torchattacks)
    batch_size: int = 500
    limit: Optional[int] = None          # evaluate on the first N test points only
    split: str = "test"                  # "test", or "validation" (the data.validation hold-out)


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    method: str = "ibp"
    eps: float = 0.1                     # test eps, pixel units
    train_eps_mul: float = 1.0           # train with eps * train_eps_mul
    seed: int = 0
    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "adam"
    lr: float = 5e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_milestones: tuple[int, ...] = (8, 9)
    lr_decay: float = 0.2
    grad_clip: float = 10.0
    warmup_epochs: int = 1               # standard training at eps = 0
    ramp_epochs: int = 5                 # smooth eps ramp (Shi et al. 2021) after the warm-up
    alpha: float = 0.1                   # coefficient of CC-IBP / MTL-IBP / Exp-IBP
    sabr_lambda: float = 0.4             # SABR small-box radius factor
    crown_ibp_beta_start: float = 1.0    # CROWN-IBP weight of the CROWN bound, decays to the end value
    crown_ibp_beta_end: float = 0.0
    reg_weight: float = 0.5              # Shi et al. warm-up regularisers (0 disables)
    reg_tol: float = 0.5
    l1: float = 0.0                      # L1 penalty on weights
    attack: AttackConfig = field(default_factory=AttackConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out_dir: str = "runs"
    logger: str = "csv"                  # "csv" or "tensorboard" (needs the tensorboard package)
    device: str = "auto"                 # "auto", "cpu", "cuda", "cuda:1", ...
    num_threads: Optional[int] = None
    progress: bool = True
    nan_policy: str = "stop"             # stop training on a non-finite loss

    def __post_init__(self) -> None:
        validate(self)

    @property
    def train_eps(self) -> float:
        return self.eps * self.train_eps_mul


def validate(c: RunConfig) -> None:
    def bad(key: str, msg: str) -> None:
        raise ConfigError(f"{key}: {msg}")
    if c.method == "cc-dist":
        bad("method", "CC-Dist is CC-IBP with a frozen teacher: use method=cc-ibp distill.teacher=<teacher "
                      "checkpoint, e.g. runs/.../last.pt of a pgd-at run> (see configs/small/mnist_cc-dist.yaml)")
    if c.method not in METHOD_REGISTRY:
        bad("method", f"unknown method {c.method!r}; valid: {', '.join(METHOD_REGISTRY)}")
    method = METHOD_REGISTRY[c.method]
    if not c.eps >= 0:
        bad("eps", f"must be >= 0, got {c.eps}")
    for k, v in (("eps", c.eps), ("eps * train_eps_mul", c.train_eps)):
        try:
            check_eps_in_range(v)  # every dataset here has images in [0, 1]
        except ValueError as e:
            bad(k, str(e))
    if not c.train_eps_mul > 0:
        bad("train_eps_mul", f"must be > 0, got {c.train_eps_mul}")
    for k in ("epochs", "batch_size"):
        if getattr(c, k) < 1:
            bad(k, f"must be >= 1, got {getattr(c, k)}")
    for k in ("warmup_epochs", "ramp_epochs"):
        if getattr(c, k) < 0:
            bad(k, f"must be >= 0, got {getattr(c, k)}")
    _check_schedule(c, method, bad)
    if not c.lr > 0:
        bad("lr", f"must be > 0, got {c.lr}")
    if c.optimizer not in ("adam", "sgd"):
        bad("optimizer", f"unknown optimizer {c.optimizer!r}; valid: adam, sgd")
    if not 0.0 <= c.alpha <= 1.0:
        bad("alpha", f"must lie in [0, 1], got {c.alpha}")
    if not 0.0 < c.sabr_lambda <= 1.0:
        bad("sabr_lambda", f"must lie in (0, 1], got {c.sabr_lambda}")
    if c.grad_clip < 0 or c.l1 < 0 or c.reg_weight < 0:
        bad("grad_clip/l1/reg_weight", "must be >= 0")
    if c.logger not in ("csv", "tensorboard"):
        bad("logger", f"unknown logger {c.logger!r}; valid: csv, tensorboard")
    if c.attack.steps < 0 or c.attack.restarts < 1 or c.attack.eps_factor <= 0:
        bad("attack", "need steps >= 0, restarts >= 1, eps_factor > 0")
    d = c.distill
    if d.level not in ("features", "logits"):
        bad("distill.level", f"unknown level {d.level!r}; valid: features, logits")
    if d.teacher_input not in ("clean", "adversarial"):
        bad("distill.teacher_input", f"unknown value {d.teacher_input!r}; valid: clean, adversarial")
    if d.student not in ("adversarial", "certified"):
        bad("distill.student", f"unknown value {d.student!r}; valid: adversarial, certified")
    if d.student == "certified" and d.loss != "kl":
        bad("distill.student", "certified distils the worst-case logits: it needs distill.loss=kl")
    if d.loss not in ("box", "point", "kl"):
        bad("distill.loss", f"unknown loss {d.loss!r}; valid: box, point, kl")
    if d.features not in ("raw", "standardized", "normalized"):
        bad("distill.features", f"unknown value {d.features!r}; valid: raw, standardized, normalized")
    if d.loss == "kl" and (d.level != "logits" or d.features != "raw"):
        bad("distill.loss", "kl distils soft labels: set distill.level=logits and distill.features=raw")
    if not d.temperature > 0:
        bad("distill.temperature", f"must be > 0, got {d.temperature}")
    if d.beta_schedule not in ("constant", "decay", "late"):
        bad("distill.beta_schedule", f"unknown schedule {d.beta_schedule!r}; valid: constant, decay, late")
    if d.beta is not None and d.beta < 0:
        bad("distill.beta", f"must be >= 0, got {d.beta}")
    if d.alpha is not None and not 0.0 <= d.alpha <= 1.0:
        bad("distill.alpha", f"must lie in [0, 1], got {d.alpha}")
    if d.teacher is not None and not method.certified:
        bad("distill.teacher", f"distillation needs a certified method, got method={c.method!r}")
    e = c.eval
    if e.batch_size < 1 or e.pgd_steps < 0 or e.pgd_restarts < 1 or not e.pgd_step_size > 0:
        bad("eval", "need batch_size >= 1, pgd_steps >= 0, pgd_restarts >= 1, pgd_step_size > 0")
    if e.attack not in ("pgd", "apgd", "autoattack"):
        bad("eval.attack", f"unknown attack {e.attack!r}; valid: pgd, apgd, autoattack")
    if e.split not in ("test", "validation"):
        bad("eval.split", f"unknown split {e.split!r}; valid: test, validation")
    if e.split == "validation" and c.data.validation is None:
        bad("eval.split", "validation needs a held-out split: set data.validation (e.g. 5000)")
    if e.limit is not None and e.limit < 1:
        bad("eval.limit", f"must be >= 1 (or null for the whole test set), got {e.limit}")
    if not c.lr_decay > 0:
        bad("lr_decay", f"must be > 0, got {c.lr_decay}")
    if not c.attack.step_size > 0:
        bad("attack.step_size", f"must be > 0, got {c.attack.step_size}")
    if c.seed < 0:
        bad("seed", f"must be >= 0, got {c.seed}")
    for k in ("train_limit", "test_limit", "validation"):
        v = getattr(c.data, k)
        if v is not None and v < 1:
            bad(f"data.{k}", f"must be >= 1 (or null for the whole split), got {v}")
    from certdist.data import DATASETS
    from certdist.models import MODELS
    if c.data.dataset not in DATASETS:
        bad("data.dataset", f"unknown dataset {c.data.dataset!r}; valid: {', '.join(sorted(DATASETS))}")
    if c.model.arch not in MODELS:
        bad("model.arch", f"unknown model {c.model.arch!r}; valid: {', '.join(sorted(MODELS))}")
    if c.model.init not in ("ibp", "default"):
        bad("model.init", f"unknown init {c.model.init!r}; valid: ibp, default")


_SCALE_HINT = ("or leave warmup_epochs, ramp_epochs and lr_milestones out to get the method's schedule scaled to "
               "epochs")


def _check_schedule(c: RunConfig, method: Method, bad) -> None:
    """Refuse a schedule that does not fit in ``epochs``: an eps ramp that would end after the last epoch
    (the run would train at a fraction of eps and report eps) and lr milestones that never take effect."""
    if method.uses_eps and c.train_eps > 0:
        if c.warmup_epochs + c.ramp_epochs > c.epochs:
            bad("warmup_epochs + ramp_epochs",
                f"the eps ramp ends after epoch {c.warmup_epochs} + {c.ramp_epochs} = "
                f"{c.warmup_epochs + c.ramp_epochs}, "
                f"past the last epoch (epochs={c.epochs}): training would stop at a fraction of eps "
                f"{c.train_eps:g}; shorten the ramp or raise epochs, {_SCALE_HINT}")
        if c.warmup_epochs >= c.epochs:
            bad("warmup_epochs", f"{c.warmup_epochs} >= epochs ({c.epochs}): method {c.method} would never train at "
                                 f"eps > 0; lower warmup_epochs or raise epochs, {_SCALE_HINT}")
    if any(m < 0 for m in c.lr_milestones):
        bad("lr_milestones", f"must be >= 0 (0-indexed epochs), got {list(c.lr_milestones)}")
    late = [m for m in c.lr_milestones if m >= c.epochs]
    if late:
        bad("lr_milestones", f"{', '.join(map(str, late))} >= epochs ({c.epochs}) would never take effect (0-indexed "
                             f"epochs: the last is {c.epochs - 1}); drop them or raise epochs, {_SCALE_HINT}")


SCHEDULE_KEYS = ("warmup_epochs", "ramp_epochs", "lr_milestones")


def method_defaults(name: str, epochs: int | None = None) -> dict:
    """The recipe of method ``name`` as nested config values (the :class:`RunConfig` defaults it does not
    change included for the schedule: ``epochs``, ``warmup_epochs``, ``ramp_epochs``, ``lr_milestones``);
    with ``epochs``, its schedule scaled to that many epochs (:func:`scale_schedule`)."""
    m = get_method(name)
    base = RunConfig.__dataclass_fields__
    rec = {k: base[k].default for k in ("epochs", *SCHEDULE_KEYS)}
    rec = _merge(rec, dict(m.defaults))
    rec["lr_milestones"] = list(rec["lr_milestones"])
    if epochs is not None and epochs >= 1 and epochs != rec["epochs"]:
        w, r, ms = scale_schedule(rec["warmup_epochs"], rec["ramp_epochs"], rec["lr_milestones"], rec["epochs"], epochs)
        rec.update(epochs=epochs, warmup_epochs=w, ramp_epochs=r, lr_milestones=list(ms))
    return rec


def with_method_defaults(data: dict) -> dict:
    """``data`` (nested config values, as from YAML + overrides or :func:`certdist.fit`) over the recipe of
    its method: what ``data`` sets wins, key by key; the recipe's schedule is scaled to ``data``'s
    ``epochs`` when ``data`` sets them. An unknown method is left to :func:`validate`."""
    name = data.get("method", RunConfig.__dataclass_fields__["method"].default)
    if not isinstance(name, str) or name not in METHOD_REGISTRY:
        return data
    epochs = _coerce("epochs", data["epochs"], int) if "epochs" in data else None
    return _merge(method_defaults(name, epochs), data)


# ---------------------------------------------------------------------------------------------
# building a config from nested dicts with type checking


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(key: str, value: Any, tp: Any) -> Any:
    base, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: may not be null")
    if dataclasses.is_dataclass(base):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {', '.join(f.name for f in fields(base))}")
        return _from_dict(base, value, prefix=f"{key}.")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if base is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string; "8/255": the field's eps notation
            try:
                value = parse_eps(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if typing.get_origin(base) is tuple:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (elem, _), = [(typing.get_args(base)[0], None)]
        return tuple(_coerce(key, v, elem) for v in value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; valid keys{' under ' + prefix[:-1] if prefix else ''}: "
                          f"{', '.join(sorted(names))}")
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from e


# settings that do not change what a run computes
RUNTIME_KEYS = frozenset({"progress", "device", "num_threads", "logger"})


def differing_keys(saved: dict, now: dict, ignore: frozenset[str] = frozenset()) -> list[str]:
    """Top-level keys whose values differ between two config dicts, runtime settings and ``ignore`` aside.
    The ``distill`` settings of two runs without a teacher do not count (they change nothing)."""
    skip = RUNTIME_KEYS | ignore
    if not (saved.get("distill") or {}).get("teacher") and not (now.get("distill") or {}).get("teacher"):
        skip = skip | {"distill"}
    return sorted(k for k in set(saved) | set(now) if k not in skip and saved.get(k) != now.get(k))


def to_dict(cfg: Any) -> dict:
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


def _set_path(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
        d = nxt
    d[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        _set_path(out, k.strip(), yaml.safe_load(v) if v.strip() else None)
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    data: dict = {}
    if path is not None:
        p = resolve_config_path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        data = loaded
    if overrides:
        data = _merge(data, parse_overrides(overrides))
    return from_dict(data)


def from_dict(data: dict) -> RunConfig:
    """The config of nested ``data`` over the recipe of its method (:func:`with_method_defaults`)."""
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping of config keys")
    return _from_dict(RunConfig, with_method_defaults(data))


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# help and packaged configs (`certdist train --help`, `certdist config show|list`)

METHOD_HELP = {name: m.help for name, m in METHOD_REGISTRY.items()}


def _flat(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        out += _flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else [(prefix + k, v)]
    return out


def config_keys(cls: type = None, prefix: str = "") -> list[tuple[str, Any]]:  # type: ignore[assignment]
    """Every config key (dotted) with its default, in declaration order."""
    cls = cls or RunConfig
    out: list[tuple[str, Any]] = []
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            out += config_keys(type(default), f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, list(default) if isinstance(default, tuple) else default))
    return out


def config_help() -> str:
    """The methods and every key with its default, for ``certdist train --help``."""
    lines = ["methods (method=...) and their recipes (below explicit values; the schedule scales with epochs):"]
    for name, m in METHOD_REGISTRY.items():
        recipe = " ".join(f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                          for k, v in _flat(method_defaults(name)))
        lines += [f"  {name:<10} {m.help}", f"  {'':<10}   {recipe}"]
    lines += ["", "config keys (YAML or key=value overrides; eps may be written 8/255) and defaults:"]
    lines += [f"  {k:<26} {yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
              for k, v in config_keys()]
    lines += ["", "packaged configs (--config small/mnist_cc-ibp.yaml works from any folder): certdist config list"]
    return "\n".join(lines)


def packaged_configs_dir() -> Path:
    """The YAML configs shipped inside the package (``certdist/configs``; in a checkout: ``configs/``)."""
    return Path(__file__).resolve().parent / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """``path`` if it exists, else the packaged config of that name (``small/mnist_cc-ibp.yaml`` or
    ``configs/small/mnist_cc-ibp.yaml``), so the README's commands work after ``pip install .`` anywhere."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    rel = Path(*p.parts[1:]) if p.parts and p.parts[0] == "configs" else p
    packaged = packaged_configs_dir() / rel
    return packaged if packaged.is_file() else p
