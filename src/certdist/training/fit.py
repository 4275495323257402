"""``fit``: the training loop of ``certdist train`` (:func:`certdist.training.loop.run_loop`) on a model
and a DataLoader of one's own."""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from certdist.config import from_dict, to_dict
from certdist.models import as_certifiable, check_float32
from certdist.models.support import check_supported
from certdist.training import checkpoint as ckpt
from certdist.training.distributed import Dist
from certdist.training.loop import (TrainingError, check_runtime, make_teacher, prepare_run_dir, resolve_device,
                                    run_loop, seed_everything)


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained ``model`` (the object passed in, trained in place), the
    run folder (``config.yaml``, ``last.pt``, ``metrics.csv``, ``results.json``), the final results
    (test metrics when a ``test_loader`` was given) and the per-epoch metrics."""
    model: nn.Module
    run_dir: Path
    results: dict
    metrics: list[dict]
    train_eps_reached: float | None = None   # the training eps of the last step (results["train_eps"]: asked for)


def as_unit_batch(x: torch.Tensor, where: str = "data") -> torch.Tensor:
    """Images as floats in [0, 1]: uint8 is divided by 255; floats must already lie in [0, 1] (the
    normalisation belongs inside the model, e.g. :class:`certdist.models.Normalize`)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: expected batches (x, y) of tensors, got x of type {type(x).__name__}")
    if x.dtype == torch.uint8:
        return x.float().div_(255)
    if not x.is_floating_point():
        raise TypeError(f"{where}: images must be uint8 or floats in [0, 1], got {x.dtype}")
    if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
        raise ValueError(f"{where}: images must lie in [0, 1] (eps is in pixel units), got values in "
                         f"[{float(x.min()):.3g}, {float(x.max()):.3g}]; put the normalisation inside the "
                         "model (certdist.models.Normalize) instead of the data pipeline")
    return x.float()


def _pair(batch: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(f"{where}: each batch must be a pair (images, labels), got {type(batch).__name__}")
    return batch[0], batch[1]


def loader_tensors(data: Any, limit: int | None = None, where: str = "loader") -> tuple[torch.Tensor, torch.Tensor]:
    """All (or the first ``limit``) images (floats in [0, 1]) and labels of a DataLoader, of any
    iterable of ``(images, labels)`` batches, or of a pair of tensors ``(images, labels)``."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        batches: Iterable = [data]
    else:
        batches = data
    xs, ys, n = [], [], 0
    for batch in batches:
        x, y = _pair(batch, where)
        xs.append(as_unit_batch(x, where))
        ys.append(torch.as_tensor(y).long())
        n += ys[-1].shape[0]
        if limit is not None and n >= limit:
            break
    if not xs:
        raise ValueError(f"{where}: no data (an empty loader)")
    images, labels = torch.cat(xs), torch.cat(ys)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels")
    return (images, labels) if limit is None else (images[:limit], labels[:limit])


def _loader_batches(loader: Iterable, device: torch.device):
    for batch in loader:
        x, y = _pair(batch, "train_loader")
        yield None, as_unit_batch(x, "train_loader").to(device), torch.as_tensor(y).long().to(device)


def _image_shape(loader: Iterable) -> tuple[int, ...]:
    """The per-sample shape of the loader's images (its first batch, drawn without touching the RNG)."""
    with torch.random.fork_rng(devices=[]):
        for batch in (loader[:1] if isinstance(loader, (list, tuple)) else loader):
            x, _ = _pair(batch, "train_loader")
            return tuple(x.shape[1:])
    raise ValueError("train_loader yields no batches")


def loader_batch_size(loader: Iterable) -> tuple[int | None, bool]:
    """The batch size of ``loader`` and whether the loader declares it: a DataLoader's ``batch_size`` (or its
    batch sampler's), else the size of its first batch (None when it yields nothing)."""
    for owner in (loader, getattr(loader, "batch_sampler", None)):
        bs = getattr(owner, "batch_size", None)
        if isinstance(bs, int) and bs >= 1:
            return bs, True
    for batch in (loader[:1] if isinstance(loader, (list, tuple)) else loader):
        x, _ = _pair(batch, "train_loader")
        return int(len(x)), False
    return None, False


def fit(model: nn.Module, train_loader: Iterable, method: str = "cc-ibp", eps: float | str = 0.1,
        teacher: nn.Module | str | os.PathLike | None = None, epochs: int | None = None,
        test_loader: Iterable | None = None, resume: bool = False, overwrite: bool = False,
        **options: Any) -> FitResult:
    """Train ``model`` (a :class:`~certdist.models.CertifiableNet` or an ``nn.Sequential`` ending in an
    ``nn.Linear``; inputs in [0, 1]) on ``train_loader`` (batches ``(images, labels)``, images uint8 or
    floats in [0, 1]) with the loop of ``certdist train``.

    ``method``: any of :data:`certdist.config.METHODS`; it brings its recipe (``certdist config show``
    lists them): PGD-AT a 10-step attack of eps/4 from the first step, the certified methods a warm-up
    epoch, an eps ramp and the expressive losses' one-step attack; options set explicitly always win.
    ``epochs``: None for the method's 10; other values scale the recipe's warm-up, ramp and lr milestones
    unless they are given (an explicit ramp that does not fit in ``epochs`` is refused).
    ``eps``: the test eps (a number or ``"8/255"``);
    ``teacher``: a frozen teacher for distillation (CC-Dist with ``method="cc-ibp"``), an ``nn.Module``,
    a teacher checkpoint path or an ONNX file (``.onnx`` / ``.onnx.gz``, read by :func:`certdist.load_onnx` and
    fitted to the loader's images; its features are the input of its last Linear). ``options``: any other key
    of :class:`certdist.config.RunConfig` (schedules, regularisers, ``lr``, ``seed``, ``name``, ``out_dir``,
    ``device``, ``progress``, ...), sections as dicts, e.g. ``attack={"steps": 1}``, ``distill={"beta": 0.01}``,
    ``eval={"attack": "autoattack"}``.
    A checkpoint is written to ``<out_dir>/<name>/seed<seed>/last.pt`` after every epoch; ``resume=True``
    continues it exactly (with the same model and loader), ``overwrite=True`` replaces an old run.
    ``test_loader``: evaluated after every epoch (clean, IBP) and at the end (with ``eval.attack``).
    The batch size is the loader's (recorded as ``batch_size``: a DataLoader's, else the first batch's); a
    ``batch_size`` option that differs from a DataLoader's is refused. The result records the training eps
    asked for and reached (``results["train_eps"]``,
    ``train_eps_reached``); a schedule whose last step trains below it warns (ScheduleWarning).
    """
    for key in ("data", "model"):
        if key in options:
            raise TypeError(f"fit() takes the model and the data themselves; the config section {key!r} "
                            "applies to `certdist train` only")
    options = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in options.items()}  # out_dir=Path(...)
    bs, declared = loader_batch_size(train_loader)
    if "batch_size" in options and declared and options["batch_size"] != bs:
        raise ValueError(f"batch_size={options['batch_size']!r} but train_loader yields batches of {bs}: fit() trains "
                         f"on the loader's batches; build the DataLoader with batch_size={options['batch_size']!r} "
                         "or leave batch_size out")
    data: dict[str, Any] = {"method": method, "eps": eps, **options}
    if epochs is not None:
        data["epochs"] = epochs
    if bs is not None:
        data["batch_size"] = bs  # recorded as trained
    if teacher is not None:
        distill = dict(data.get("distill") or {})
        path_like = isinstance(teacher, (str, os.PathLike))
        distill["teacher"] = str(teacher) if path_like else f"<in-memory {type(teacher).__name__}>"
        data["distill"] = distill
    cfg = from_dict(data)
    check_runtime(cfg)
    check_supported(model)  # the layer-support contract: the model's errors before a run folder is made
    if isinstance(teacher, nn.Module):
        check_supported(teacher)
    net = as_certifiable(model)
    check_float32(net, "fit")
    ckpt.warn_if_not_describable(model)  # the checkpoint saves the architecture's description with the weights
    if isinstance(teacher, (str, os.PathLike)):  # loaded (and checked) before a run folder is made
        if not Path(teacher).is_file():
            raise TrainingError(f"teacher checkpoint not found: {teacher}")
        if ckpt.is_onnx_path(teacher):  # an ONNX network, fitted to the loader's images and the classes
            teacher = ckpt.load_model(teacher, input_shape=_image_shape(train_loader), num_classes=net.num_classes)
        else:
            teacher, _ = ckpt.model_from_checkpoint(teacher)
        check_supported(teacher)
    dd = Dist()
    run_dir = prepare_run_dir(cfg, dd, resume, overwrite)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    net = net.to(device)
    t = None
    if teacher is not None:
        t = make_teacher(cfg, teacher, net, device, 0, cache_ok=False,
                         train_batches=((None, x) for _, x, _ in _loader_batches(train_loader, device)))
    try:
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError("train_loader must have a length (the eps schedule is defined in steps): use a DataLoader "
                        "over a map-style dataset, or a list of batches") from None
    if steps_per_epoch < 1:
        raise ValueError("train_loader yields no batches")
    test = loader_tensors(test_loader, where="test_loader") if test_loader is not None else None
    record = {k: v for k, v in to_dict(cfg).items() if k not in ("data", "model")}
    info = {"dataset": type(getattr(train_loader, "dataset", train_loader)).__name__, "arch": net.arch,
            "teacher": cfg.distill.teacher}
    results = run_loop(cfg, run_dir, net, model, t, lambda epoch: _loader_batches(train_loader, device),
                       steps_per_epoch, test, record, info, device, dd, resume)
    with (run_dir / "metrics.csv").open() as f:
        metrics = list(csv.DictReader(f))
    reached = (results or {}).get("train_eps_reached")
    if reached is None and metrics:
        reached = float(metrics[-1]["eps"])
    return FitResult(model=model, run_dir=run_dir, results=results or {}, metrics=metrics, train_eps_reached=reached)

