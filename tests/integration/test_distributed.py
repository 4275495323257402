"""Data-parallel training on CPU with the gloo backend: 2 ranks equal 1 process on the full batch."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from certdist.config import load_config
from certdist.training import checkpoint as ckpt
from certdist.training.loop import train

BASE = ["data.dataset=synthetic", "model.arch=mlp", "eps=0.1", "epochs=2", "warmup_epochs=1", "ramp_epochs=1",
        "batch_size=128", "lr=1e-3", "lr_milestones=[]", "progress=false", "eval.pgd_steps=2",
        "data.train_limit=512", "data.test_limit=64", "method=ibp", "reg_weight=0", "num_threads=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    train(load_config(None, BASE + [f"out_dir={out_dir}", "name=ddp", "device=cpu"]))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path, monkeypatch):
    """IBP's loss is a batch mean and the net has no BatchNorm, so averaging the gradients of two
    equal halves reproduces the full-batch gradient: the weights must agree to float precision."""
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    single = train(load_config(None, BASE + [f"out_dir={tmp_path}", "name=single"]))
    a = ckpt.load_checkpoint(tmp_path / "ddp" / "seed0" / "last.pt")["model"]
    b = ckpt.load_checkpoint(single / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "ddp" / "seed0" / "results.json").read_text())["n"] == 64
