"""Checkpoints: weights, optimiser, config, RNG states, metrics and versions, written atomically.

Loaded with ``torch.load(weights_only=True)``: only tensors and plain Python containers are stored.
"""
from __future__ import annotations

import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

import certdist
from certdist.models import CertifiableNet, InputSpec, build_model


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing, corrupt, or of another architecture."""


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, Any]:
    return {"certdist": certdist.__version__, "torch": str(torch.__version__), "python": platform.python_version(),
            "git_commit": git_commit()}


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2]}
    np_state = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(np_state[1].astype("int64")), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_meta(model: CertifiableNet) -> dict[str, Any]:
    """The architecture and input spec; ``input_spec`` is None for a user's own network (``fit``), whose
    weights are then loaded back with :func:`load_weights` into the same ``nn.Module``."""
    spec = getattr(model, "input_spec", None)
    return {"arch": getattr(model, "arch", type(model).__name__),
            "input_spec": None if spec is None else {k: (list(v) if isinstance(v, tuple) else v)
                                                     for k, v in spec.__dict__.items()}}


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    for key in ("model", "model_meta"):
        if key not in payload:
            raise CheckpointError(f"{path} is not a certdist checkpoint (missing {key!r})")
    return payload


def model_from_checkpoint(path: str | os.PathLike, expect_arch: str | None = None,
                          expect_spec: InputSpec | None = None) -> tuple[CertifiableNet, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained with, load its weights, return it in eval mode."""
    payload = load_checkpoint(path)
    meta = payload["model_meta"]
    if meta.get("input_spec") is None:
        raise CheckpointError(f"{path} holds the weights of a user-defined {meta.get('arch')!r} network (trained "
                              "with certdist.fit): build the same nn.Module and load them with "
                              "certdist.training.checkpoint.load_weights(model, load_checkpoint(path)['model'])")
    spec = InputSpec(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["input_spec"].items()})
    if expect_arch is not None and meta["arch"] != expect_arch:
        raise CheckpointError(f"{path} holds a {meta['arch']!r} model, expected {expect_arch!r}")
    if expect_spec is not None and spec != expect_spec:
        raise CheckpointError(f"{path} was trained on inputs {spec}, expected {expect_spec}")
    try:
        model = build_model(meta["arch"], spec, init="default")
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    load_weights(model, payload["model"], source=str(path))
    return model.eval(), payload


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or extra or wrong:
        detail = []
        if missing:
            detail.append(f"missing {missing[:5]}")
        if extra:
            detail.append(f"unexpected {extra[:5]}")
        if wrong:
            detail.append("shape mismatch " + ", ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                                         for k in wrong[:5]))
        arch = getattr(model, "arch", type(model).__name__)
        raise CheckpointError(f"{source} does not fit architecture {arch!r}: " + "; ".join(detail))
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{source}: parameter {k} holds NaN or inf values")
    model.load_state_dict(state)
