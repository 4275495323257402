"""Progress bars only when stderr is a terminal by default (under pytest it is not); progress=False
always silences them and, where the option is three-valued, progress=True always shows them."""
from __future__ import annotations

import io

import pytest
import torch

import certdist
from certdist.data import sources

from conftest import random_net, self_labelled_points


class _Response(io.BytesIO):
    headers = {"Content-Length": str(3 << 20)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def fake_url(monkeypatch):
    monkeypatch.setattr(sources.urllib.request, "urlopen", lambda *a, **k: _Response(b"x" * (3 << 20)))


def test_download_bar_only_on_a_terminal_by_default(tmp_path, fake_url, capfd):
    sources.download("https://example.invalid/f.gz", tmp_path / "f.gz")
    assert "f.gz" not in capfd.readouterr().err
    sources.download("https://example.invalid/f.gz", tmp_path / "f.gz", progress=True)
    assert "f.gz" in capfd.readouterr().err
    sources.download("https://example.invalid/f.gz", tmp_path / "f.gz", progress=False)
    assert "f.gz" not in capfd.readouterr().err


def test_training_bars_only_on_a_terminal_with_progress_true(tmp_path, capfd):
    net = random_net("mlp", 0)
    x, y = self_labelled_points(net, 16)
    common = dict(method="standard", eps=0.01, epochs=1, out_dir=str(tmp_path), num_threads=1)
    certdist.fit(net, [(x, y)], test_loader=(x, y), name="default", **common)  # progress=True, the default
    err = capfd.readouterr().err
    assert "epoch 1/1" not in err and "evaluate" not in err
    certdist.fit(random_net("mlp", 0), [(x, y)], test_loader=(x, y), name="off", progress=False, **common)
    err = capfd.readouterr().err
    assert "epoch 1/1" not in err and "evaluate" not in err
