"""The user-facing artefacts run: docs/tutorial.py (own nn.Sequential and DataLoader, CC-IBP and CC-Dist training,
AutoAttack, certification, bounds, export), the examples of docs/api.md, and the built wheel."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tutorial_runs(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "tutorial.py"), "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for line in ("teacher  clean", "cc-ibp   clean", "cc-dist  clean", "autoattack", "crown      mean lower bound",
                 "exported 10 VNN-LIB properties", "tutorial done"):
        assert line in out, out
    for run in ("teacher", "cc-ibp", "cc-dist"):
        assert (tmp_path / run / "seed0" / "last.pt").is_file() and (tmp_path / run / "seed0" / "results.json").is_file()
    assert (tmp_path / "export" / "onnx" / "model.onnx").is_file()


@pytest.mark.slow
def test_api_doc_examples_run(tmp_path):
    """Every example of docs/api.md, in order, as one script (about 15 s of CPU)."""
    import re
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S)
    assert len(blocks) >= 14
    script = tmp_path / "examples.py"
    script.write_text("\n".join(blocks))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "net.onnx").is_file() and (tmp_path / "bench" / "instances.csv").is_file()
    assert (tmp_path / "runs" / "cc-dist" / "seed0" / "last.pt").is_file()


@pytest.mark.slow
def test_built_wheel_ships_the_yaml_configs(tmp_path):
    """`pip wheel .` (a copy of the source tree, installed setuptools, no network) holds every config."""
    import shutil
    import zipfile
    src = tmp_path / "src_tree"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "configs", src / "configs")
    shutil.copytree(ROOT / "src", src / "src", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "wheel"), "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel, = (tmp_path / "wheel").glob("certdist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")}
    assert configs and {f"certdist/{c}" for c in configs} <= names
    assert "certdist/tables/reproduce.yaml" in names  # the reproduce tables (certdist reproduce --list)
