"""Metric loggers: a CSV file (always) and TensorBoard (when requested and installed)."""
from __future__ import annotations

import csv
from pathlib import Path


class MetricLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = False) -> None:
        self.path = run_dir / "metrics.csv"
        self.rows: list[dict] = []
        if self.path.exists():
            with self.path.open() as f:
                self.rows = list(csv.DictReader(f))
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise RuntimeError("logger=tensorboard needs the tensorboard package: pip install tensorboard") from e
            self.tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, row: dict) -> None:
        self.rows.append({k: v for k, v in row.items()})
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        tmp.replace(self.path)
        if self.tb is not None:
            step = int(row.get("epoch", len(self.rows)))
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def truncate(self, epochs_done: int) -> None:
        """On resume: drop rows of epochs after the checkpoint (they will be re-run)."""
        self.rows = [r for r in self.rows if int(float(r.get("epoch", 0))) <= epochs_done]  # 1-based epochs
