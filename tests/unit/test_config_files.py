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


def test_small_cc_dist_configs_ship_the_validated_variant():
    """configs/small/*_cc-dist.yaml use the distillation settings of the variant chosen on the validation
    split of their dataset (certdist.reproduce.CHOSEN); the paper configs keep the paper's feature box."""
    from certdist.reproduce import CHOSEN
    for ds in ("mnist", "fashion-mnist"):
        chosen = load_config(ROOT / "small" / f"{ds}_cc-ibp.yaml",
                             [o for o in CHOSEN[ds].overrides if not o.startswith("name=")])
        d = load_config(ROOT / "small" / f"{ds}_cc-dist.yaml").distill
        assert {k: v for k, v in vars(d).items() if k != "teacher"} == \
            {k: v for k, v in vars(chosen.distill).items() if k != "teacher"}
    assert load_config(ROOT / "paper" / "mnist_0.1_cc-dist.yaml").distill.loss == "box"
