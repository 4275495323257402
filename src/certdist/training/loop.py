"""The one training loop for every method (standard, PGD-AT, IBP, CROWN-IBP, SABR, the expressive
losses, with or without a teacher).

A run lives in ``out_dir/name/seed<seed>``: ``config.yaml`` (the resolved config), ``last.pt`` (a checkpoint
after every epoch, written atomically), ``metrics.csv`` and, once finished, ``results.json``.
"""
from __future__ import annotations

import copy
import json
import math
import random
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from certdist import data as D
from certdist.config import RunConfig, differing_keys, get_method, to_dict
from certdist.evaluation import evaluate
from certdist.models import CertifiableNet, InputSpec, as_certifiable, build_model
from certdist.threats import ThreatModel
from certdist.training import checkpoint as ckpt
from certdist.training.distributed import Dist, setup as setup_distributed
from certdist.training.logging import MetricLogger
from certdist.training.objective import StepContext, Teacher, compute_loss
from certdist.losses.distillation import scaling_statistics
from certdist.training.schedules import distill_weight, linear_decay, lr_at, smooth_eps


# a run may be resumed (or reused by a sweep) with other runtime and evaluation settings
RESUME_IGNORES = frozenset({"eval"})


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, a run that would be overwritten, a bad teacher)."""


class ScheduleWarning(UserWarning):
    """The eps schedule ends below the training eps the run asks for (its last step trains at less)."""


def resolve_device(name: str, dd: Dist | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dd is not None and dd.enabled:
        return torch.device("cuda", dd.local_rank)
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def input_spec(info) -> InputSpec:
    return InputSpec(info.channels, info.size, info.num_classes, tuple(info.mean), tuple(info.std))


def step_context(cfg: RunConfig, step: int, steps_per_epoch: int) -> StepContext:
    start = cfg.warmup_epochs * steps_per_epoch
    ramp = cfg.ramp_epochs * steps_per_epoch
    final = cfg.train_eps
    eps = smooth_eps(step, final, start, ramp) if get_method(cfg.method).uses_eps else 0.0
    in_ramp = start <= step < start + ramp
    reg_scale = (1.0 - eps / final) if (in_ramp and final > 0) else 0.0
    total = cfg.epochs * steps_per_epoch
    beta = linear_decay(step, cfg.crown_ibp_beta_start, cfg.crown_ibp_beta_end, start, total)
    dist_scale = distill_weight(step, cfg.distill.beta_schedule, start + ramp, total)
    return StepContext(eps=eps, eps_final=final, reg_scale=reg_scale, crown_beta=beta, dist_scale=dist_scale)


def load_teacher(cfg: RunConfig, student: CertifiableNet, device: torch.device, n_train: int,
                 cache_ok: bool, train_data: "D.TensorData | None" = None) -> Teacher:
    path = Path(cfg.distill.teacher)
    if not path.is_file():
        raise TrainingError(f"teacher checkpoint not found: {path}")
    if ckpt.is_onnx_path(path):  # someone else's network, fitted to the student's images and classes
        spec = student.input_spec or input_spec(D.dataset_info(cfg.data.dataset))
        try:
            model = ckpt.load_model(path, input_shape=(spec.channels, spec.size, spec.size),
                                    num_classes=spec.num_classes)
        except ckpt.CheckpointError as e:
            raise TrainingError(f"teacher: {e}") from e
        batches = _indexed_batches(train_data, cfg.eval.batch_size, device) if train_data is not None else None
        return make_teacher(cfg, model, student, device, n_train, cache_ok, batches)
    model, payload = ckpt.model_from_checkpoint(path)
    t_data = payload.get("config", {}).get("data", {}).get("dataset")
    if t_data is not None and t_data != cfg.data.dataset:
        raise TrainingError(f"teacher {path} was trained on {t_data!r}, the student on {cfg.data.dataset!r}")
    if model.input_spec is not None and model.input_spec != student.input_spec:  # None: a fit() network
        raise TrainingError(f"teacher {path} expects inputs {model.input_spec}, the student {student.input_spec}")
    batches = _indexed_batches(train_data, cfg.eval.batch_size, device) if train_data is not None else None
    return make_teacher(cfg, model, student, device, n_train, cache_ok, batches)


def make_teacher(cfg: RunConfig, model: nn.Module, student: CertifiableNet, device: torch.device, n_train: int,
                 cache_ok: bool, train_batches: "Iterable[tuple[torch.Tensor | None, torch.Tensor]] | None" = None
                 ) -> Teacher:
    """A frozen eval-mode copy of ``model`` (a CertifiableNet or an nn.Sequential) as the teacher of
    ``student``, with the projection and the feature cache the config asks for. ``train_batches``
    (``(indices or None, images)`` over the training set) are needed for scale-free targets
    (``distill.features`` other than raw): the teacher's statistics are taken over them."""
    model = copy.deepcopy(as_certifiable(model)).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    projection = None
    if cfg.distill.level == "features" and model.feature_dim != student.feature_dim:
        if not cfg.distill.projection:
            raise TrainingError(
                f"teacher features have {model.feature_dim} dimensions, the student's {student.feature_dim}: "
                "set distill.projection=true to learn a linear projection, or use a teacher of the same width")
    if cfg.distill.projection and cfg.distill.level == "features":
        projection = nn.Linear(student.feature_dim, model.feature_dim, bias=True).to(device)
    t = Teacher(model=model, projection=projection)
    dim = model.feature_dim if cfg.distill.level == "features" else model.num_classes
    if cfg.distill.cache and cache_ok and cfg.distill.teacher_input == "clean":
        t.cache = torch.zeros(n_train, dim, device=device)
        t.cached = torch.zeros(n_train, dtype=torch.bool, device=device)
    if cfg.distill.features != "raw" and cfg.distill.loss != "kl":
        if train_batches is None:
            raise TrainingError(f"distill.features={cfg.distill.features} needs the training data for the "
                                "teacher's feature statistics")
        t.shift, t.scale = teacher_statistics(t, train_batches, cfg.distill.level, cfg.distill.features)
    return t


@torch.no_grad()
def teacher_statistics(teacher: Teacher, batches: "Iterable[tuple[torch.Tensor | None, torch.Tensor]]", level: str,
                       scaling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The shift and scale of the teacher's clean features (or logits) over the training batches
    ``(indices or None, images)``, for scale-free targets; fills the teacher's cache on the way when it
    has one and the batches carry indices."""
    outs = [teacher.targets(x, idx, level) for idx, x in batches]
    return scaling_statistics(torch.cat(outs), scaling)


def _indexed_batches(data: "D.TensorData", batch_size: int, device: torch.device):
    for s in range(0, len(data), batch_size):
        yield (torch.arange(s, min(s + batch_size, len(data)), device=device),
               data.images[s:s + batch_size].float().div_(255).to(device))


def _batch_iter(train: "D.TensorData", cfg: RunConfig, epoch: int, augment: bool, device: torch.device,
                dd: Dist = Dist()):
    """Batches of ``cfg.batch_size`` (global) in a seeded permutation; each rank takes its share."""
    g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    n = train.labels.shape[0]
    perm = torch.randperm(n, generator=g)
    pad = train.info.crop_padding
    for s in range(0, n, cfg.batch_size):
        idx = perm[s:s + cfg.batch_size]
        if idx.numel() < 2 * dd.world and n > 1:  # a batch of one breaks BatchNorm; skip the remainder
            continue
        idx = dd.share(idx)
        x = train.images[idx].float().div_(255)
        if augment:
            x = D.random_hflip(D.random_crop(x, pad, g), g)
        yield idx.to(device), x.to(device), train.labels[idx].to(device)


def load_splits(cfg: RunConfig) -> tuple["D.TensorData", "D.TensorData"]:
    """The training data and the evaluation split (``eval.split``).

    With ``data.validation = N`` the last N training images are held out (never trained on) and
    ``data.train_limit`` applies to the rest; ``eval.split = "validation"`` evaluates on them
    (``data.test_limit`` does not apply there, ``eval.limit`` does).
    """
    d = cfg.data
    if d.validation is None:
        train_data = D.load(d.dataset, "train", data_dir=d.data_dir, limit=d.train_limit)
        val_data = None
    else:
        train_data, val_data = D.holdout(D.load(d.dataset, "train", data_dir=d.data_dir), d.validation)
        if d.train_limit is not None:
            train_data = D.TensorData(train_data.images[:d.train_limit], train_data.labels[:d.train_limit],
                                      train_data.info)
    if cfg.eval.split == "validation":
        return train_data, val_data
    return train_data, D.load(d.dataset, "test", data_dir=d.data_dir, limit=d.test_limit)


def make_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def run_dir_for(cfg: RunConfig) -> Path:
    """``<out_dir>/<name>/seed<seed>``: the seeds of one setting sit side by side."""
    return Path(cfg.out_dir) / cfg.name / f"seed{cfg.seed}"


def check_runtime(cfg: RunConfig) -> None:
    """Fail before any work on runtime settings this machine cannot honour."""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device={cfg.device} but torch {torch.__version__} finds no CUDA device; "
                            "use device=cpu (or device=auto)")
    if cfg.logger == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise TrainingError("logger=tensorboard needs the tensorboard package (pip install tensorboard); "
                                "or use logger=csv") from None


def prepare_run_dir(cfg: RunConfig, dd: Dist, resume: bool, overwrite: bool) -> Path:
    """The run folder, checked: an existing run needs resume or overwrite (its files are then removed)."""
    run_dir = run_dir_for(cfg)
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        if not overwrite:
            raise TrainingError(f"{run_dir} already holds a run; pass resume=True (CLI: --resume) to continue it, "
                                "overwrite=True (CLI: --overwrite) to replace it, or choose another name")
        dd.barrier()  # every rank has seen the old run before rank 0 removes it
        if dd.is_main:
            for f in ("last.pt", "metrics.csv", "results.json", "config.yaml"):
                (run_dir / f).unlink(missing_ok=True)
    if resume and not (run_dir / "last.pt").exists():
        raise TrainingError(f"resume=True (CLI: --resume): no checkpoint at {run_dir / 'last.pt'}")
    dd.barrier()
    if dd.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False,
          on_epoch: Callable[[dict], None] | None = None) -> Path:
    """Train (or resume) the run described by ``cfg`` (dataset and model from the config); returns the
    run folder. :func:`certdist.fit` runs the same loop on a given model and DataLoader. ``on_epoch(row)``:
    called with each epoch's metrics row once its checkpoint is saved (rank 0; ``certdist tune`` prunes there)."""
    check_runtime(cfg)
    dd = setup_distributed(cfg.device)
    run_dir = prepare_run_dir(cfg, dd, resume, overwrite)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device, dd)
    seed_everything(cfg.seed)  # the same initial weights on every rank

    info = D.dataset_info(cfg.data.dataset)
    train_data, test_data = load_splits(cfg)
    augment = info.augment if cfg.data.augment is None else cfg.data.augment
    model = build_model(cfg.model.arch, input_spec(info), init=cfg.model.init).to(device)
    teacher = None
    if cfg.distill.teacher:
        teacher = load_teacher(cfg, model, device, train_data.labels.shape[0], cache_ok=not augment,
                               train_data=train_data)
    n = train_data.labels.shape[0]
    steps_per_epoch = sum(1 for s in range(0, n, cfg.batch_size) if min(cfg.batch_size, n - s) >= 2 * dd.world or n == 1)
    run_loop(cfg, run_dir, model, model, teacher,
             lambda epoch: _batch_iter(train_data, cfg, epoch, augment, device, dd), steps_per_epoch,
             (test_data.images, test_data.labels), to_dict(cfg),
             {"split": cfg.eval.split, "dataset": cfg.data.dataset, "arch": cfg.model.arch, "teacher": cfg.distill.teacher},
             device, dd, resume, on_epoch)
    return run_dir


def run_loop(cfg: RunConfig, run_dir: Path, model: CertifiableNet, module: nn.Module, teacher: Teacher | None,
             batches: Callable[[int], Iterable], steps_per_epoch: int,
             test: tuple[torch.Tensor, torch.Tensor] | None, cfg_record: dict, info: dict,
             device: torch.device, dd: Dist = Dist(), resume: bool = False,
             on_epoch: Callable[[dict], None] | None = None) -> dict | None:
    """The epochs of one run, shared by ``certdist train`` and :func:`certdist.fit`: schedules, the
    per-batch objective, checkpoints (``last.pt`` after every epoch; resume), metrics, and the final
    evaluation into ``results.json`` (returned; None on ranks other than 0).

    ``model``: the network the objective bounds (features + head); ``module``: the network whose
    ``state_dict`` is checkpointed (the user's own module for ``fit``, else ``model``). ``batches(epoch)``
    yields ``(index or None, x, y)``; ``test``: images and labels of the test split (None: no test
    metrics); ``cfg_record``: the config as saved and compared on resume."""
    last = run_dir / "last.pt"
    params = list(model.parameters()) + (list(teacher.projection.parameters()) if teacher and teacher.projection else [])
    opt = make_optimizer(cfg, params)
    if dd.enabled:  # distinct attack randomness per rank from here on
        seed_everything(cfg.seed + 1000 * dd.rank)
    dd.barrier()
    logger = MetricLogger(run_dir, tensorboard=cfg.logger == "tensorboard" and dd.is_main)
    start_epoch = 0
    if resume:
        payload = ckpt.load_checkpoint(last)
        if payload.get("finished"):
            raise TrainingError(f"{run_dir} is finished; nothing to resume (results in {run_dir / 'results.json'})")
        diff = differing_keys(payload["config"], cfg_record, RESUME_IGNORES)
        if diff:
            raise TrainingError(f"resume=True (CLI: --resume) with a different config than the checkpoint's "
                                f"(keys differ: {diff})")
        ckpt.load_weights(module, payload["model"], source=str(last))
        opt.load_state_dict(payload["optimizer"])
        if teacher and teacher.projection is not None:
            teacher.projection.load_state_dict(payload["projection"])
        ckpt.set_rng_state(payload["rng"])
        start_epoch = payload["epoch"] + 1
        if dd.enabled and not dd.is_main:  # rank 0's state was saved; the others re-derive theirs
            seed_everything(cfg.seed + 1000 * dd.rank + start_epoch)
        logger.truncate(start_epoch)
    elif dd.is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg_record, sort_keys=False))

    test_threat = ThreatModel(cfg.eps)
    eps_target = cfg.train_eps if get_method(cfg.method).uses_eps else 0.0  # standard training: eps 0
    eps_end = final_train_eps(cfg, steps_per_epoch)
    if eps_end < eps_target and dd.is_main:
        warnings.warn(schedule_message(cfg, eps_end), ScheduleWarning, stacklevel=2)
    for epoch in range(start_epoch, cfg.epochs):
        lr = lr_at(epoch, cfg.lr, cfg.lr_milestones, cfg.lr_decay)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        t0 = time.time()
        bar = tqdm(batches(epoch), total=steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=None if cfg.progress and dd.is_main else True)  # None: only on a terminal
        for i, (idx, x, y) in enumerate(bar):
            ctx = step_context(cfg, epoch * steps_per_epoch + i, steps_per_epoch)
            loss, stats = compute_loss(cfg, model, x, y, ctx, teacher, idx)
            if dd.broadcast_flag(not math.isfinite(stats["loss"]), device):
                raise TrainingError(
                    f"non-finite loss ({stats['loss']}) at epoch {epoch + 1}, step {i} (eps {ctx.eps:.4g}); "
                    f"training stopped, the last good checkpoint is kept at {last if last.exists() else '(none yet)'}. "
                    "Try a lower lr or a stronger grad_clip.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            dd.average_gradients(params)
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            for k, v in stats.items():  # a stat is averaged over the steps that report it
                if math.isfinite(v):
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
            bar.set_postfix({k: f"{v / counts[k]:.3f}" for k, v in sums.items()} | {"eps": f"{ctx.eps:.3f}"})
        row = {"epoch": epoch + 1, "lr": lr, "eps": ctx.eps, "time_s": round(time.time() - t0, 2)}
        row |= {f"train_{k}": round(v / counts[k], 5) for k, v in sums.items()}  # rank 0's share
        if dd.is_main:
            if test is not None:
                row |= _quick_eval(model, test[0], test[1], test_threat, device, cfg.eval.split)
            logger.log(row)
            tqdm.write(f"[{cfg.name}] " + " ".join(f"{k}={v}" for k, v in row.items()))
            collapsed = collapse_message(logger.rows, cfg, getattr(model, "num_classes", None))
            if collapsed:
                warnings.warn(collapsed, CollapseWarning, stacklevel=2)
            _save(last, cfg_record, model, module, opt, teacher, epoch, logger.rows, finished=False)
            if on_epoch is not None:
                on_epoch(row)
        dd.barrier()

    if not dd.is_main:
        dd.barrier()  # wait for rank 0's final evaluation
        return None

    results: dict = {}
    if test is not None:
        lim = cfg.eval.limit
        results = evaluate(model, test[0][:lim], test[1][:lim], test_threat, cfg.eval.pgd_steps,
                           cfg.eval.pgd_restarts, cfg.eval.pgd_step_size, cfg.eval.batch_size, device,
                           progress=None if cfg.progress else False, attack_name=cfg.eval.attack)
    results |= info | {"method": cfg.method, "seed": cfg.seed, "config": cfg_record, "versions": ckpt.versions(),
                       "train_time_s": round(sum(float(r["time_s"]) for r in logger.rows), 2)}
    # the training eps the run asked for and the one its last step trained at (below: ScheduleWarning)
    results |= {"eps": cfg.eps, "train_eps": eps_target,
                "train_eps_reached": float(logger.rows[-1]["eps"]) if logger.rows else eps_end}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    payload = ckpt.load_checkpoint(last)
    payload["finished"] = True
    payload["results"] = {k: v for k, v in results.items() if isinstance(v, (int, float, str))}
    ckpt.save_checkpoint(last, payload)
    dd.barrier()
    return results


def final_train_eps(cfg: RunConfig, steps_per_epoch: int) -> float:
    """The training eps of the run's last step (the schedule's value at step ``epochs * steps_per_epoch - 1``)."""
    return step_context(cfg, cfg.epochs * steps_per_epoch - 1, steps_per_epoch).eps


def schedule_message(cfg: RunConfig, eps_end: float) -> str:
    return (f"[{cfg.name}] the eps schedule ends at training eps {eps_end:.4g}, {100 * eps_end / cfg.train_eps:.1f} % "
            f"of the {cfg.train_eps:g} asked for: the ramp (warmup_epochs={cfg.warmup_epochs}, "
            f"ramp_epochs={cfg.ramp_epochs}) takes the run's last epoch (epochs={cfg.epochs}), so no step trains at "
            "the full eps; raise epochs or shorten the ramp. results.json records train_eps_reached.")


class CollapseWarning(UserWarning):
    """Training accuracy fell to chance level after the warm-up: the network has collapsed."""


def _chance_accuracy(row: dict, cfg: RunConfig, num_classes: int) -> float | None:
    """The epoch's training accuracy (clean or at the attack point, the higher) when it is past the
    warm-up and at most 1.25 / num_classes; else None."""
    accs = [float(row[k]) for k in ("train_clean_acc", "train_acc", "train_adv_acc") if row.get(k) not in (None, "")]
    if not accs or row["epoch"] <= cfg.warmup_epochs or max(accs) > 1.25 / num_classes:
        return None
    return max(accs)


def collapse_message(rows: list[dict], cfg: RunConfig, num_classes: int | None) -> str | None:
    """A warning when training has collapsed, else None: the last two epochs past the warm-up both end
    with training accuracy at chance level. Certified accuracy alone (IBP after the warm-up) is not
    judged: it is legitimately that low early in training at a large eps, and one slow epoch (a short
    run's only one included) is not a collapse. PGD-AT and certified training at a large eps without an eps
    ramp collapse this way (PGD-AT at MNIST eps 0.3 on DM-small, from the first step: 9.6 %)."""
    if not rows or not num_classes:
        return None
    acc = _chance_accuracy(rows[-1], cfg, num_classes)
    if acc is None or len(rows) < 2 or _chance_accuracy(rows[-2], cfg, num_classes) is None:
        return None
    hint = ("ramp eps up from 0 (ramp_epochs, now 0)" if cfg.ramp_epochs == 0
            else f"a longer eps ramp (ramp_epochs, now {cfg.ramp_epochs})")
    return (f"[{cfg.name}] epoch {rows[-1]['epoch']}: training accuracy {100 * acc:.1f} % is at chance level "
            f"({num_classes} classes): the network has collapsed. At eps {cfg.eps:g} try {hint}, "
            f"warm-up epochs (warmup_epochs, now {cfg.warmup_epochs}) or a lower lr (now {cfg.lr:g}).")


def _quick_eval(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, threat: ThreatModel, device,
                split: str, n: int = 1000) -> dict:
    """Clean and IBP-certified accuracy on the first ``n`` points of the evaluation split (eval mode), every
    epoch, as columns named after the split: ``test_clean`` / ``test_ibp_cert`` or ``val_clean`` /
    ``val_ibp_cert`` (``eval.split=validation``)."""
    r = evaluate(model, images[:n], labels[:n], threat, batch_size=n, device=device, progress=False, attack=False)
    prefix = "val" if split == "validation" else "test"
    return {f"{prefix}_clean": round(r["clean_acc"], 2), f"{prefix}_ibp_cert": round(r["ibp_cert_acc"], 2)}


def _save(path: Path, cfg_record: dict, model, module, opt, teacher, epoch: int, rows: list, finished: bool) -> None:
    payload = {
        "model": module.state_dict(), "model_meta": ckpt.model_meta(model, module), "optimizer": opt.state_dict(),
        "config": cfg_record, "epoch": epoch, "rng": ckpt.rng_state(), "metrics": rows,
        "versions": ckpt.versions(), "finished": finished,
    }
    if teacher is not None and teacher.projection is not None:
        payload["projection"] = teacher.projection.state_dict()
    ckpt.save_checkpoint(path, payload)
