"""Result files of the certification pipeline: one JSON record per point, read back, resumed only into a
file of the same run (the fingerprints: model, data, verdict-relevant settings, :data:`VERIFIER_VERSION`),
summarised (:func:`summarize`, :func:`format_summary`) and merged across shards (:func:`merge`)."""
from __future__ import annotations

import hashlib
import json
import os
import statistics
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from certdist.threats import ThreatModel
from certdist.verification.settings import STATUSES, CertifyConfig

# ---------------------------------------------------------------------------------------------------
# Fingerprints: which model, data and settings a record's verdict is about.

# Bump on every change of the bound code or of the stages' policy that can change a verdict (a rule, a
# tolerance, a stage added or reordered): resuming a file of another version then refuses instead of
# mixing old and new verdicts. 2026.11.2: APGD stage, chain-BaB warm starts; .3: versioned;
# .4: float32 tolerance from CROWN's activation ranges once the CROWN stage ran; .5: the CROWN stage's
# intermediate bounds are "best" (CROWN where IBP leaves neurons unstable, intersected with IBP).
# 2026.12.1: the effort-budget schedule (quick attack, IBP + CROWN, full attack, alpha-CROWN, complete
# stage with a domain / node budget). .2: CROWN sums nn.Linear's bias over the positions of a non-flat
# input; dense BaB never drops a domain as empty on bounds crossed by rounding. .3: the float32 tolerance
# of each margin row carries the rounding errors back through the network (rounding.fp32_margin_tolerance;
# never looser than .2's forward recursion).
VERIFIER_VERSION = "2026.12.3"
FINGERPRINT_KEYS = ("model_hash", "data_hash", "settings", "verifier")


def _hash_tensors(h, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.flatten().view(torch.uint8).numpy().tobytes())


def model_hash(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the architecture (``repr``) and every parameter and buffer."""
    h = hashlib.sha256(repr(model).encode())
    _hash_tensors(h, model.state_dict().items())
    return h.hexdigest()[:16]


def fingerprint(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, threat: ThreatModel,
                cfg: CertifyConfig) -> dict[str, Any]:
    """What every record carries so that a resume never mixes verdicts of different runs."""
    h = hashlib.sha256()
    _hash_tensors(h, [("images", images), ("labels", labels)])
    settings = {"norm": threat.norm, "data_min": threat.data_min, "data_max": threat.data_max,
                **cfg.verdict_settings()}
    return {"model_hash": model_hash(model), "data_hash": h.hexdigest()[:16], "settings": settings,
            "verifier": VERIFIER_VERSION}


def resumed_indices(out: Path, threat: ThreatModel, fp: dict[str, Any]) -> set[int]:
    _drop_partial_line(out)
    done = read_records(out)
    other = {r.get("eps") for r in done} - {threat.eps}
    if other:
        raise ValueError(f"{out} holds results for eps {sorted(other, key=str)}, not {threat.eps}; "
                         "use another output file")
    fix = "certify into another output file (--out) or delete this one"
    for r in done:
        missing = [k for k in FINGERPRINT_KEYS if k not in r]
        if missing:
            raise ValueError(f"{out}: point {r['index']} has no {'/'.join(missing)} fingerprint (written by an "
                             f"older certdist), so its verdict cannot be matched to this run; {fix}")
        for key, what in (("verifier", "of verifier version {}, this is {} (the bounds or stages changed since)"),
                          ("model_hash", "of another model (state hash {}, this model: {}), e.g. of an earlier or "
                                         "retrained checkpoint"),
                          ("data_hash", "on other data (hash {}, these images: {})")):
            if r[key] != fp[key]:
                raise ValueError(f"{out} holds verdicts {what.format(r[key], fp[key])}; {fix}")
        if r["settings"] != fp["settings"]:
            diff = sorted(set(r["settings"]) | set(fp["settings"]))
            diff = [f"{k}: {r['settings'].get(k)!r} there, {fp['settings'].get(k)!r} now" for k in diff
                    if r["settings"].get(k) != fp["settings"].get(k)]
            raise ValueError(f"{out} holds verdicts made with other settings ({'; '.join(diff)}); {fix}")
    return {r["index"] for r in done}


# ---------------------------------------------------------------------------------------------------
# Files: reading, resuming, merging, summaries.

def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines result file (a truncated last line, from a killed run, is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    lines = path.read_text().split("\n")
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) - 1:  # the partial last line of a killed run
                break
            raise ValueError(f"{path}: line {n + 1} is not valid JSON") from None
    return out


def _drop_partial_line(path: Path) -> None:
    """Cut a trailing line without newline (a record being written when the run was killed)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Counts per status and per (status, stage), accuracies and times over ``records``; per stage, the
    effort spent (attack steps, bound passes, domains, ...) and seconds, summed over the points; and
    ``capped``: the points that reached the wall-clock cap (the only verdicts that can depend on the
    machine's speed or load)."""
    records = list(records)
    n = len(records)
    counts = {s: 0 for s in STATUSES}
    stages: dict[str, dict[str, int]] = {s: {} for s in STATUSES}
    effort: dict[str, dict[str, int]] = {}
    seconds: dict[str, float] = {}
    capped = 0
    for r in records:
        counts[r["status"]] += 1
        stages[r["status"]][r["stage"]] = stages[r["status"]].get(r["stage"], 0) + 1
        for stage, work in r.get("effort", {}).items():
            mine = effort.setdefault(stage, {})
            for k, v in work.items():
                mine[k] = mine.get(k, 0) + v
        for stage, t in r.get("stage_time_s", {}).items():
            seconds[stage] = seconds.get(stage, 0.0) + t
        capped += bool(r.get("capped"))
    times = [r["time_s"] for r in records]
    frac = (lambda k: k / n) if n else (lambda k: float("nan"))
    eps = sorted({r.get("eps") for r in records}, key=str)
    return {
        "n": n, "eps": eps[0] if len(eps) == 1 else eps, "counts": counts, "stages": stages,
        "effort": effort, "stage_seconds": {k: round(v, 3) for k, v in seconds.items()}, "capped": capped,
        "clean_accuracy": frac(n - counts["misclassified"]),
        "attack_accuracy": frac(n - counts["misclassified"] - counts["falsified"]),
        "certified_accuracy": frac(counts["verified"]),
        "ibp_certified_accuracy": frac(stages["verified"].get("ibp", 0)),
        "time_median_s": statistics.median(times) if times else float("nan"),
        "time_max_s": max(times) if times else float("nan"),
    }


STAGE_ORDER = ("clean", "attack-quick", "ibp", "crown", "attack", "apgd", "alpha-crown", "milp", "bab", "chain-bab")


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of a :func:`summarize` result: verdicts per status and stage, then per stage the
    points that ended there unknown, the work and the seconds spent."""
    lines = [f"points: {summary['n']}   eps: {summary['eps']}", "", f"{'status':<14}{'stage':<13}{'count':>7}"]
    for status in STATUSES:
        lines.append(f"{status:<14}{'(all)':<13}{summary['counts'][status]:>7}")
        for stage, k in sorted(summary["stages"][status].items()):
            lines.append(f"{'':<14}{stage:<13}{k:>7}")
    effort, secs = summary.get("effort", {}), summary.get("stage_seconds", {})
    if effort or secs:
        order = [s for s in STAGE_ORDER if s in effort or s in secs] + sorted((set(effort) | set(secs)) - set(STAGE_ORDER))
        lines += ["", f"{'stage':<13}{'unknown':>8}{'seconds':>10}  work"]
        for stage in order:
            work = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(effort.get(stage, {}).items()))
            lines.append(f"{stage:<13}{summary['stages']['unknown'].get(stage, 0):>8}{secs.get(stage, 0.0):>10.1f}  {work}")
    pct = lambda v: f"{100 * v:6.2f}%"  # noqa: E731
    lines += ["", f"clean accuracy            {pct(summary['clean_accuracy'])}",
              f"attack accuracy           {pct(summary['attack_accuracy'])}",
              f"certified (IBP only)      {pct(summary['ibp_certified_accuracy'])}",
              f"certified (pipeline)      {pct(summary['certified_accuracy'])}",
              f"time per point: median {summary['time_median_s']:.3f} s, max {summary['time_max_s']:.3f} s"]
    if summary.get("capped"):
        lines.append(f"wall-clock cap reached on {summary['capped']} point(s): their verdicts can depend on the "
                     "machine's speed and load (raise --timeout, or lower the effort budget)")
    return "\n".join(lines)


def merge(paths: Iterable[str | os.PathLike]) -> dict[str, Any]:
    """Summary of several shard files; ValueError on a point present twice, on differing eps or on
    records of different models, data or settings."""
    seen: dict[int, str] = {}
    records = []
    for path in paths:
        for r in read_records(path):
            if r["index"] in seen:
                raise ValueError(f"point {r['index']} appears twice: in {seen[r['index']]} and in {path}")
            seen[r["index"]] = str(path)
            records.append(r)
    eps = {r.get("eps") for r in records}
    if len(eps) > 1:
        raise ValueError(f"cannot merge results for different eps: {sorted(eps, key=str)}")
    for key in FINGERPRINT_KEYS:
        if len({json.dumps(r.get(key), sort_keys=True) for r in records}) > 1:
            raise ValueError(f"cannot merge results of different runs: the records differ in {key!r}")
    return summarize(sorted(records, key=lambda r: r["index"]))


__all__ = ["FINGERPRINT_KEYS", "STAGE_ORDER", "VERIFIER_VERSION", "fingerprint", "format_summary", "merge",
           "model_hash", "read_records", "summarize"]
