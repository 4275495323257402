"""Every shipped config parses and names a known dataset, model and method."""
from pathlib import Path

import pytest

from certdist.config import load_config
from certdist.data import DATASETS
from certdist.models import MODELS

ROOT = Path(__file__).resolve().parents[2] / "configs"
FILES = sorted(ROOT.rglob("*.yaml"))


def test_configs_exist():
    assert len(FILES) >= 40


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_config_parses(path):
    c = load_config(path)
    assert c.data.dataset in DATASETS and c.model.arch in MODELS
    assert c.name == path.stem
    if "cc-dist" in path.stem:
        assert c.distill.teacher and c.distill.teacher.endswith("pgd-at-teacher/seed0/last.pt")
