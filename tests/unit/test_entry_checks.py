"""Up-front checks at the public entry points: labels (integer class indices [N] in [0, K)), the device
(a clear error when CUDA is missing), and progress bars only on a terminal by default."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import certdist
from certdist.evaluation import evaluate as evaluate_tensors
from certdist.specs import check_labels, margin_matrix
from certdist.threats import ThreatModel

from conftest import random_net, self_labelled_points

LABELS = r"labels must be integer class indices of shape \[N\]"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


@pytest.fixture(scope="module")
def setup():
    net = random_net("mlp", 0).eval()
    x, y = self_labelled_points(net, 8)
    return net, x, y


def bad_labels(y: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    return {"float": y.float(), "one-hot": F.one_hot(y, k), "one-hot-float": F.one_hot(y, k).float(),
            "out-of-range": torch.full_like(y, k), "negative": torch.full_like(y, -1), "bool": y > 0}


def test_check_labels_messages():
    check_labels(torch.tensor([0, 3, 1]), 4)
    check_labels(torch.tensor([0, 3], dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match=LABELS + r" in \[0, 4\), got dtype torch.float32"):
        check_labels(torch.tensor([0.0, 1.0]), 4)
    with pytest.raises(ValueError, match=r"one-hot labels\? pass y.argmax\(1\)"):
        check_labels(torch.eye(4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"got range \[0, 4\]"):
        check_labels(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match="got 2 labels for 3 inputs"):
        check_labels(torch.tensor([0, 1]), 4, n=3)
    with pytest.raises(TypeError, match=LABELS):
        check_labels([0, 1], 4)


@pytest.mark.parametrize("kind", ["float", "one-hot", "one-hot-float", "out-of-range", "negative", "bool"])
def test_bound_functions_refuse_bad_labels(setup, kind):
    net, x, y = setup
    yb = bad_labels(y, net.num_classes)[kind]
    with pytest.raises(ValueError, match=LABELS):
        margin_matrix(yb, net.num_classes)
    for fn in (certdist.crown, certdist.crown_ibp, certdist.alpha_crown):
        with pytest.raises(ValueError, match=LABELS):
            fn(net, x, ThreatModel(0.01), y=yb)


@pytest.mark.parametrize("kind", ["float", "one-hot", "one-hot-float", "out-of-range", "bool"])
def test_evaluate_refuses_bad_labels(setup, kind):
    net, x, y = setup
    yb = bad_labels(y, net.num_classes)[kind]
    with pytest.raises(ValueError, match=LABELS):
        evaluate_tensors(net, x, yb, ThreatModel(0.01), pgd_steps=1, progress=False)
    with pytest.raises(ValueError, match=LABELS):
        certdist.evaluate(net, (x, yb), 0.01, steps=1)
    batches = [(x[:4], yb[:4]), (x[4:], yb[4:])]  # an iterable of batches, as a DataLoader
    with pytest.raises(ValueError, match=LABELS):
        certdist.evaluate(net, batches, 0.01, steps=1)


def test_evaluate_refuses_a_label_count_mismatch(setup):
    net, x, y = setup
    with pytest.raises(ValueError, match="got 7 labels for 8 inputs"):
        evaluate_tensors(net, x, y[:7], ThreatModel(0.01), pgd_steps=1, progress=False)


@pytest.mark.parametrize("kind", ["float", "one-hot", "out-of-range"])
def test_certify_refuses_bad_labels(setup, tmp_path, kind):
    net, x, y = setup
    yb = bad_labels(y, net.num_classes)[kind]
    with pytest.raises(ValueError, match=LABELS):
        certdist.certify(net, (x, yb), 0.01, timeout=1)
    with pytest.raises(ValueError, match=LABELS):
        certdist.certify(net, [(x, yb)], 0.01, out=tmp_path / "c.jsonl", timeout=1)
    assert not (tmp_path / "c.jsonl").exists()


@NO_CUDA
def test_cuda_without_cuda_is_a_clear_error(setup):
    net, x, y = setup
    msg = r"CUDA is not available; use device='cpu'"
    with pytest.raises(ValueError, match=msg):
        evaluate_tensors(net, x, y, ThreatModel(0.01), device="cuda", progress=False)
    with pytest.raises(ValueError, match=msg):
        certdist.evaluate(net, (x, y), 0.01, device="cuda")
    with pytest.raises(ValueError, match=msg):
        certdist.certify(net, (x, y), 0.01, device="cuda")


def test_certify_refuses_cuda_with_a_reason(setup, monkeypatch):
    net, x, y = setup
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with a GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="certify: device 'cuda' is not supported: certify runs on the CPU only"):
        certdist.certify(net, (x, y), 0.01, device="cuda")


def test_device_cpu_and_unknown_devices(setup):
    net, x, y = setup
    res = certdist.evaluate(net, (x, y), 0.01, steps=1, device=torch.device("cpu"))
    assert res["clean_acc"] == 100.0
    assert certdist.certify(net, (x, y), 0.01, timeout=5, device="cpu")["n"] == 8
    with pytest.raises(ValueError, match="unknown device 'tpu0'"):
        certdist.evaluate(net, (x, y), 0.01, device="tpu0")
    with pytest.raises(ValueError, match="device 'meta' is not supported"):
        certdist.evaluate(net, (x, y), 0.01, device="meta")


def test_evaluate_progress_bar_only_on_a_terminal_by_default(setup, capfd):
    net, x, y = setup  # under pytest stderr is not a terminal
    evaluate_tensors(net, x, y, ThreatModel(0.01), attack=False)
    assert "evaluate" not in capfd.readouterr().err
    evaluate_tensors(net, x, y, ThreatModel(0.01), attack=False, progress=True)  # explicit: always shown
    assert "evaluate" in capfd.readouterr().err
    evaluate_tensors(net, x, y, ThreatModel(0.01), attack=False, progress=False)
    assert "evaluate" not in capfd.readouterr().err
