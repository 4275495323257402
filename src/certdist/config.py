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
from typing import Any, Optional

import yaml

from certdist.threats import check_eps_in_range, parse_eps

METHODS = ("standard", "pgd-at", "ibp", "crown-ibp", "sabr", "mtl-ibp", "cc-ibp", "exp-ibp")


class ConfigError(ValueError):
    """An unknown key or a bad value in a configuration."""


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
    if c.method not in METHODS:
        bad("method", f"unknown method {c.method!r}; valid: {', '.join(METHODS)}")
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
    if d.teacher is not None and c.method in ("standard", "pgd-at"):
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
    return _from_dict(RunConfig, data)


def from_dict(data: dict) -> RunConfig:
    return _from_dict(RunConfig, data)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# help and packaged configs (`certdist train --help`, `certdist config show|list`)

METHOD_HELP = {
    "standard": "cross-entropy on clean inputs",
    "pgd-at": "PGD adversarial training (a teacher)",
    "ibp": "IBP (Gowal et al. 2018)",
    "crown-ibp": "CROWN-IBP (Zhang et al. 2020)",
    "sabr": "SABR (Mueller et al. 2023)",
    "mtl-ibp": "MTL-IBP (De Palma et al. 2024)",
    "cc-ibp": "CC-IBP (De Palma et al. 2024); with distill.teacher=...: CC-Dist",
    "exp-ibp": "Exp-IBP (De Palma et al. 2024)",
}


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
    lines = ["methods (method=...):"] + [f"  {m:<10} {METHOD_HELP.get(m, '')}" for m in METHODS]
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
