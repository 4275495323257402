"""The command line's plumbing: every argument has a help text, a closed pipe ends quietly, --device."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from certdist.cli import build_parser, main


def _walk(parser: argparse.ArgumentParser, prog: str):
    """(where, action) for every argument of ``parser`` and of all its subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {a.dest for a in action._choices_actions if a.help}
            for name, sub in action.choices.items():
                if name not in helped:
                    yield f"{prog} {name}", None  # a subcommand without help
                yield from _walk(sub, f"{prog} {name}")
        else:
            yield prog, action


def test_every_argument_of_every_verb_has_help():
    missing = []
    for where, action in _walk(build_parser(), "certdist"):
        if action is None:
            missing.append(f"{where} (the subcommand)")
        elif not action.help:  # argparse.SUPPRESS is a (deliberately hidden) help
            missing.append(f"{where} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "arguments without help: " + ", ".join(missing)


def test_the_walk_sees_every_verb_and_flag():
    seen = {(w, "/".join(a.option_strings) or a.dest) for w, a in _walk(build_parser(), "certdist") if a}
    assert {("certdist evaluate", "--device"), ("certdist certify", "--device"), ("certdist config show", "overrides"),
            ("certdist data fetch", "name"), ("certdist export", "--limit")} <= seen


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("argv", [["config", "list"], ["config", "show"], ["--help"], ["reproduce", "--list"]])
def test_a_closed_pipe_ends_quietly(argv):
    """``certdist config list | head``: the reader is gone before the command writes."""
    r, w = os.pipe()
    os.close(r)  # no reader: every write to w fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "certdist", *argv], stdout=w, stderr=subprocess.PIPE,
                              env=_env(), timeout=120)
    finally:
        os.close(w)
    err = proc.stderr.decode()
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    assert proc.returncode == (0 if argv == ["--help"] else 141)  # argparse itself ignores a failed help write


def test_main_returns_141_on_a_closed_pipe_in_process(monkeypatch):
    class Closed:
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["config", "list"]) == 141


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("verb", ["evaluate", "certify"])
def test_device_cuda_without_cuda_is_a_clear_error(verb, tmp_path, capsys):
    # checked before the checkpoint is read: none is needed
    assert main([verb, "--checkpoint", str(tmp_path / "none.pt"), "--device", "cuda"]) == 2
    assert f"error: {verb}: CUDA is not available; use device='cpu'" in capsys.readouterr().err


def test_device_choices():
    p = build_parser()
    assert p.parse_args(["evaluate", "--checkpoint", "c.pt"]).device == "cpu"
    assert p.parse_args(["certify", "--checkpoint", "c.pt"]).device == "cpu"
    with pytest.raises(SystemExit):
        p.parse_args(["evaluate", "--checkpoint", "c.pt", "--device", "tpu"])
