"""certify / merge / export through the command line on a briefly trained synthetic-data net."""
import json

import onnx

from certdist.cli import main
from certdist.interop import parse_vnnlib

BASE = ["data.dataset=synthetic", "model.arch=mlp", "eps=0.05", "epochs=2", "warmup_epochs=1", "ramp_epochs=1",
        "lr_milestones=[]", "progress=false", "eval.pgd_steps=3", "data.train_limit=512", "data.test_limit=50",
        "method=ibp", "lr=2e-3"]


def test_certify_shards_merge_export(tmp_path, capsys):
    assert main(["train", *BASE, f"out_dir={tmp_path}", "name=n"]) == 0
    ck = str(tmp_path / "n" / "seed0" / "last.pt")
    full = tmp_path / "full.jsonl"
    assert main(["certify", "--checkpoint", ck, "--limit", "12", "--timeout", "3", "--out", str(full),
                 "--attack-steps", "20", "--restarts", "2"]) == 0
    recs = [json.loads(line) for line in full.read_text().splitlines()]
    assert len(recs) == 12 and all(r["status"] in ("misclassified", "falsified", "verified", "unknown") for r in recs)
    shards = []
    for i in range(2):
        out = tmp_path / f"s{i}.jsonl"
        assert main(["certify", "--checkpoint", ck, "--limit", "12", "--timeout", "3", "--shard", f"{i}/2",
                     "--out", str(out), "--attack-steps", "20", "--restarts", "2"]) == 0
        shards.append(str(out))
    capsys.readouterr()
    assert main(["merge", *shards]) == 0
    merged = capsys.readouterr().out
    assert "verified" in merged
    import pytest
    with pytest.raises(SystemExit, match="0 <= i < n"):
        main(["certify", "--checkpoint", ck, "--shard", "3/2"])
    with pytest.raises(SystemExit, match="dataset 'mnist' has 1x28x28 images"):
        main(["certify", "--checkpoint", ck, "--dataset", "mnist"])
    with pytest.raises(SystemExit, match="no such result file"):
        main(["merge", str(tmp_path / "missing.jsonl")])
    assert main(["certify", "--checkpoint", ck, "--timeout", "0", "--limit", "2", "--out", str(tmp_path / "t.jsonl")]) == 2
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", ck, "--eps", "0.05", "--out", str(out), "--limit", "3"]) == 0
    model = onnx.load(str(next(out.rglob("*.onnx"))))
    onnx.checker.check_model(model)
    props = sorted(out.rglob("*.vnnlib"))
    assert len(props) == 3
    prop = parse_vnnlib(props[0])
    assert len(prop.lower) == 64 and len(prop.disjuncts) == 3  # 8x8 inputs, 4 classes: 3 ways to lose
