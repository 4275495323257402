"""Run configs over several seeds (``certdist sweep``), in order, optionally in parallel.

Run ``k`` of config ``C`` lives in ``<out_dir>/<C.name>/seed<k>``, as every run does. Configs run in
the order given (so a teacher listed first is finished before its students start); the seeds of one config run
``jobs`` at a time as separate processes. Finished runs with the same settings are skipped (other
settings are an error) and interrupted ones resumed, so a sweep can be re-launched after a crash.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Sequence

from certdist.config import differing_keys, load_config, to_dict
from certdist.training.loop import RESUME_IGNORES, TrainingError, run_dir_for


def run_dir(config: str | None, seed: int, overrides: list[str]) -> Path:
    return run_dir_for(load_config(config, overrides + [f"seed={seed}"]))


def _command(config: str | None, seed: int, overrides: list[str]) -> list[str]:
    d = run_dir(config, seed, overrides)
    cmd = [sys.executable, "-m", "certdist", "train", *(["--config", config] if config else []), *overrides,
           f"seed={seed}"]
    if (d / "last.pt").exists():
        cmd.append("--resume")
    return cmd


def _check_same(d: Path, config: str | None, seed: int, overrides: list[str]) -> None:
    """A finished run is only reused for the very same settings."""
    saved = json.loads((d / "results.json").read_text()).get("config", {})
    now = to_dict(load_config(config, overrides + [f"seed={seed}"]))
    diff = differing_keys(saved, now, RESUME_IGNORES)
    if diff:
        raise TrainingError(f"{d} holds a finished run with other settings (keys differ: {diff}); "
                            "change name=... or remove the folder")


def sweep(configs: list[str | None], seeds: list[int], overrides: list[str], jobs: int = 1) -> list[Path]:
    done: list[Path] = []
    for config in configs or [None]:  # no file: the defaults and the overrides
        todo = []
        for s in seeds:
            d = run_dir(config, s, overrides)
            if (d / "results.json").exists():
                _check_same(d, config, s, overrides)
                print(f"[sweep] {d}: finished, skipped")
            else:
                todo.append(s)
            done.append(d)

        parallel = []
        if jobs > 1:  # parallel processes share the cores: oversubscribed OpenMP threads slow down >10x
            parallel = ["progress=false"]
            if not any(o.startswith("num_threads=") for o in overrides):
                parallel.append(f"num_threads={max(1, (os.cpu_count() or 1) // jobs)}")

        def one(seed: int) -> int:
            cmd = _command(config, seed, overrides + parallel)
            print("[sweep] " + " ".join(cmd[2:]), flush=True)
            return subprocess.run(cmd).returncode
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            codes = list(pool.map(one, todo))
        failed = [s for s, c in zip(todo, codes) if c != 0]
        if failed:
            raise TrainingError(f"{config}: seeds {failed} failed; see their output above")
    return done


def _limit_threads(n: int) -> None:
    """A job process's thread count: torch here, OpenMP / MKL in the training processes it starts."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch
    torch.set_num_threads(n)


def run_jobs(fn: Callable[[Any], Any], tasks: Sequence[Any], jobs: int = 1, what: str = "job") -> list[Any]:
    """``fn(task)`` for every task; with ``jobs > 1`` in ``jobs`` worker processes (spawned; each limited to
    cpu_count // jobs threads, since oversubscribed OpenMP threads slow every job down many times over).
    ``fn`` must be a module-level function and the tasks picklable. Returns the results in task order; a
    failed task does not stop the others, and is raised (a TrainingError naming every failure) at the end."""
    if jobs <= 1:
        return [fn(t) for t in tasks]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    results: list[Any] = [None] * len(tasks)
    errors: dict[int, str] = {}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_limit_threads,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(fn, t): k for k, t in enumerate(tasks)}
        for done, fut in enumerate(as_completed(futures), 1):
            k = futures[fut]
            try:
                results[k] = fut.result()
                print(f"[jobs] {done}/{len(tasks)} {what}s done: {results[k]}", flush=True)
            except Exception as e:  # noqa: BLE001 - reported with the others below
                errors[k] = f"{tasks[k]!r}: {type(e).__name__}: {e}"
                print(f"[jobs] {done}/{len(tasks)} {what} FAILED: {errors[k]}", flush=True)
    if errors:
        raise TrainingError(f"{len(errors)} of {len(tasks)} {what}s failed: " + "; ".join(errors[k] for k in sorted(errors)))
    return results
