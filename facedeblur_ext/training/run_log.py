"""Training logs: CSV files (always) and TensorBoard (when the package is installed)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

__all__ = ["CSVLog", "RunLog"]


class CSVLog:
    """A CSV file of rows keyed by ``step``; a new column rewrites the file with a wider header.

    On resume, rows past the resumed step are dropped so the log matches the weights.
    """

    def __init__(self, path, resume_step: int | None = None):
        self.path = Path(path)
        self.rows: list[dict] = []
        self.columns: list[str] = []
        if resume_step is not None and self.path.exists():
            with self.path.open(newline="") as fh:
                reader = csv.DictReader(fh)
                self.columns = list(reader.fieldnames or [])
                self.rows = [r for r in reader if int(float(r.get("step", 0))) <= resume_step]
            self._rewrite()
        elif self.path.exists():
            self.path.unlink()

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new or not self.path.exists():
            self.columns += new
            self._rewrite()
            return
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore").writerow(row)


class RunLog:
    """``train.csv`` and ``val.csv`` in the run folder, mirrored to TensorBoard if available."""

    def __init__(self, folder, resume_step: int | None = None, tensorboard: bool = True):
        folder = Path(folder)
        self.train = CSVLog(folder / "train.csv", resume_step)
        self.val = CSVLog(folder / "val.csv", resume_step)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(folder / "tensorboard"),
                                            purge_step=resume_step)

    def _mirror(self, prefix: str, row: dict) -> None:
        if self.writer is None:
            return
        step = int(row["step"])
        for key, value in row.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def log_train(self, row: dict) -> None:
        self.train.write(row)
        self._mirror("train", row)

    def log_val(self, row: dict) -> None:
        self.val.write(row)
        self._mirror("val", row)

    def log_image(self, tag: str, image_chw, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image_chw, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
