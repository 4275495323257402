"""docs/tutorial.py runs end to end: own nn.Sequential and DataLoader, CC-IBP and CC-Dist training,
AutoAttack, certification, bounds and export (about 20 s of CPU)."""
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
