"""Checkpoints: weights, optimiser, config, RNG states, metrics and versions, written atomically.

Loaded with ``torch.load(weights_only=True)``: only tensors and plain Python containers are stored.
"""
from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

import certdist
from certdist.models import MODELS, CertifiableNet, InputSpec, as_certifiable, build_model
from certdist.models.describe import DescriptionError, build_from_description, describe


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


def model_meta(model: CertifiableNet, module: torch.nn.Module | None = None) -> dict[str, Any]:
    """The architecture and input spec of ``model``, and, for a network not built by name from the model
    registry (a user's own, trained with ``fit``), the declarative ``description`` of ``module`` (the module
    whose state dict is saved; default ``model``) from which :func:`load_model` rebuilds it. A module that
    cannot be described gets ``description: None`` and the reason in ``description_error``."""
    spec = getattr(model, "input_spec", None)
    arch = getattr(model, "arch", type(model).__name__)
    meta: dict[str, Any] = {"arch": arch, "input_spec": None if spec is None else
                            {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.__dict__.items()}}
    if spec is None or arch not in MODELS:
        try:
            meta["description"] = describe(model if module is None else module)
        except DescriptionError as e:
            meta["description"], meta["description_error"] = None, str(e)
    return meta


def warn_if_not_describable(module: torch.nn.Module) -> None:
    """Warn (before training starts) when ``module`` cannot be described: its checkpoints will then hold
    the weights only, and ``certdist evaluate / certify / export`` and ``fit(teacher=path)`` will refuse them."""
    try:
        describe(module)
    except DescriptionError as e:
        warnings.warn(f"{e}. The checkpoints of this run will hold the weights only: `certdist evaluate / certify / "
                      "export --checkpoint` and fit(teacher=path) cannot rebuild the network from them",
                      stacklevel=3)


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
    """Rebuild the model a checkpoint was trained with, load its weights, return it in eval mode with the
    checkpoint's payload: a registry model by its name and input spec, any other (a user's own network
    trained with ``certdist.fit``) from the architecture description saved with it (see
    :mod:`certdist.models.describe`). A model without an input spec is a :class:`CertifiableNet` view
    (``arch`` ``"sequential"`` for an ``nn.Sequential``, ``input_spec`` None).

    An ONNX file (``.onnx`` / ``.onnx.gz``) is read by :func:`onnx_model` (fitted to ``expect_spec``'s images
    and classes when given); its payload is ``{"model_meta": {"arch": "onnx", ...}, "config": {}, "onnx": path}``."""
    if is_onnx_path(path):
        if expect_arch is not None and expect_arch != "onnx":
            raise CheckpointError(f"{path} is an ONNX model, expected a {expect_arch!r} checkpoint")
        shape = None if expect_spec is None else (expect_spec.channels, expect_spec.size, expect_spec.size)
        model = onnx_model(path, shape, None if expect_spec is None else expect_spec.num_classes)
        return model, {"model_meta": {"arch": "onnx", "input_spec": None, "description": None}, "config": {},
                       "onnx": str(path)}
    payload = load_checkpoint(path)
    meta = payload["model_meta"]
    spec = None if meta.get("input_spec") is None else InputSpec(
        **{k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["input_spec"].items()})
    if expect_arch is not None and meta["arch"] != expect_arch:
        raise CheckpointError(f"{path} holds a {meta['arch']!r} model, expected {expect_arch!r}")
    if expect_spec is not None and spec != expect_spec:
        raise CheckpointError(f"{path} was trained on inputs {spec}, expected {expect_spec}")
    if spec is not None and meta["arch"] in MODELS:
        try:
            module: torch.nn.Module = build_model(meta["arch"], spec, init="default")
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
    elif meta.get("description") is not None:
        try:
            module = build_from_description(meta["description"])
        except DescriptionError as e:
            raise CheckpointError(f"{path}: cannot rebuild the network from its architecture description: {e}") from e
    else:
        why = meta.get("description_error") or ("it was written by an older certdist that saved no architecture "
                                                "description")
        raise CheckpointError(f"{path} holds only the weights of a user-defined {meta.get('arch')!r} network: {why}. "
                              "Build the same nn.Module and load them with certdist.training.checkpoint.load_weights("
                              "model, load_checkpoint(path)['model'])")
    load_weights(module, payload["model"], source=str(path))
    try:
        model = as_certifiable(module)
    except TypeError as e:
        raise CheckpointError(f"{path}: {e}") from e
    module.eval()
    return model.eval(), payload


def load_model(path: str | os.PathLike, input_shape: Sequence[int] | None = None,
               num_classes: int | None = None) -> CertifiableNet:
    """The eval-mode network of any certdist checkpoint (``certdist train`` or ``certdist.fit``), weights loaded,
    or of an ONNX file (``.onnx`` / ``.onnx.gz``, read by :func:`certdist.load_onnx`): the one loader behind
    ``certdist evaluate / certify / export --checkpoint`` and ``fit(teacher=path)`` / ``distill.teacher``.

    ``input_shape`` (``(C, H, W)``) and ``num_classes``: the images and classes the ONNX network is to take
    (an ONNX file records no dataset); see :func:`onnx_model`. A checkpoint records its own input and
    ignores them."""
    if is_onnx_path(path):
        return onnx_model(path, input_shape, num_classes)
    return model_from_checkpoint(path)[0]


# ---------------------------------------------------------------------------------------------------
# ONNX files: someone else's network, read by certdist.load_onnx and fitted to a dataset's images.

ONNX_SUFFIXES = (".onnx", ".onnx.gz")


def is_onnx_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an ONNX file (``.onnx`` or ``.onnx.gz``, any case) rather than a checkpoint."""
    return str(path).lower().endswith(ONNX_SUFFIXES)


def onnx_model(path: str | os.PathLike, input_shape: Sequence[int] | None = None,
               num_classes: int | None = None) -> CertifiableNet:
    """The ONNX network at ``path`` as an eval-mode :class:`CertifiableNet` (``arch`` ``"onnx"``,
    ``input_spec`` None; ``onnx_input`` and ``onnx_path`` as set by :func:`certdist.load_onnx`).

    With ``input_shape`` ``(C, H, W)`` the network is made to take images ``[N, C, H, W]`` exactly:

    - the ONNX input is read as the image in C-order ``C x H x W`` (any size-1 dimensions dropped), as
      ``H x W x C`` (NHWC, when C > 1 and that is the file's shape), or flat (``C*H*W`` values in
      C-order of ``C x H x W``); a leading ``Transpose`` / ``Reshape`` of the file's input is already
      absorbed by ``load_onnx`` (``onnx_input``);
    - a model that then takes the image's pixels in their order but flat (``[N, C*H*W]``) gets an
      ``nn.Flatten`` in front (exact); a flat input normalised per feature (held as ``[C*H*W, 1, 1]``)
      gets its ``Normalize`` moved onto the image when the values are the same for every pixel of a
      channel (exact: the same float32 operations), followed by the model's own ``Flatten``;
    - anything else (another number of values, pixels in another order) raises :class:`CheckpointError`
      naming both shapes.

    ``num_classes``: the network must have this many outputs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ONNX model not found: {path}")
    from certdist.interop.onnx_import import OnnxImportError, load_onnx
    try:
        seq = load_onnx(path)
    except OnnxImportError as e:
        raise CheckpointError(f"{path}: {e}") from e
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001 - a file onnx cannot parse
        raise CheckpointError(f"cannot read ONNX model {path}: {type(e).__name__}: {e}") from e
    info = seq.onnx_input
    layers = list(seq)
    if input_shape is not None:
        layers = _fit_onnx_input(layers, info, tuple(int(d) for d in input_shape), path)
    if num_classes is not None and layers[-1].out_features != num_classes:
        raise CheckpointError(f"the ONNX model {path} has {layers[-1].out_features} outputs, the dataset "
                              f"{num_classes} classes")
    model = CertifiableNet(torch.nn.Sequential(*layers[:-1]), layers[-1], "onnx", None).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.onnx_input, model.onnx_path = info, str(path)
    if input_shape is not None:
        from certdist.models.support import check_supported
        try:
            check_supported(model, tuple(input_shape))
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
    return model


def _fit_onnx_input(layers: list[torch.nn.Module], info: Any, image: tuple[int, ...], path: Path
                    ) -> list[torch.nn.Module]:
    """``layers`` (of ``load_onnx``) made to take images of per-sample shape ``image`` = (C, H, W); see
    :func:`onnx_model`."""
    import numpy as np

    from certdist.models.layers import Normalize
    if len(image) != 3:
        raise CheckpointError(f"input_shape must be (C, H, W), got {image}")
    c, h, w = image
    n = c * h * w
    file_shape = tuple(info.shape[1:])
    model_shape = tuple(info.model_shape)
    what = (f"the ONNX model {path} takes inputs of shape {list(info.shape)} (model input {list(model_shape)}), "
            f"the dataset has {c}x{h}x{w} images")
    squeeze = lambda s: tuple(d for d in s if d != 1)  # noqa: E731
    pixels = np.arange(n)
    if squeeze(file_shape) == squeeze(image) or (len(squeeze(file_shape)) == 1 and int(np.prod(file_shape)) == n):
        onnx_order = pixels  # C x H x W, or flat in its C-order
    elif c > 1 and squeeze(file_shape) == squeeze((h, w, c)):
        onnx_order = pixels.reshape(c, h, w).transpose(1, 2, 0).ravel()  # NHWC: the file's j-th value is pixel [j]
    else:
        raise CheckpointError(f"{what}: {int(np.prod(file_shape))} values"
                              + (f" vs {n}" if int(np.prod(file_shape)) != n else " in a layout other than CxHxW, "
                                 "HxWxC or flat") + " (pass the --dataset the model was trained on)")
    order = onnx_order if info.index is None else onnx_order[np.asarray(info.index)]
    if not np.array_equal(order, pixels):
        raise CheckpointError(f"{what}: the model reads the pixels in another order than C-order CxHxW, which no "
                              "exact layer in front of it expresses")
    if model_shape == image:
        return layers
    if model_shape == (n,):
        return [torch.nn.Flatten(), *layers]
    if model_shape == (n, 1, 1):  # a flat input normalised per feature: Normalize ... Normalize, Flatten
        k = 0
        moved: list[torch.nn.Module] = []
        while k < len(layers) and type(layers[k]) is Normalize:
            mean = layers[k].mean.reshape(c, h * w)
            std = layers[k].std.reshape(c, h * w)
            if not (bool((mean == mean[:, :1]).all()) and bool((std == std[:, :1]).all())):
                raise CheckpointError(f"{what}: its input normalisation differs between the pixels of a channel; "
                                      "only one mean and std per channel can be moved onto the images")
            norm = Normalize([0.0] * c, [1.0] * c)
            with torch.no_grad():
                norm.mean.copy_(mean[:, 0].reshape(1, c, 1, 1))
                norm.std.copy_(std[:, 0].reshape(1, c, 1, 1))
            moved.append(norm)
            k += 1
        if moved and k < len(layers) and type(layers[k]) is torch.nn.Flatten:
            return [*moved, *layers[k:]]
    raise CheckpointError(f"{what}: certdist inserts only a Flatten (or moves a per-channel normalisation) in "
                          "front of a model, and neither makes this one take the images exactly")


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
