"""``ResumableCSVLogger``: Lightning's ``CSVLogger`` in a fixed run directory whose ``metrics.csv`` survives a resume.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` as soon as a new Trainer touches the
log directory, and by default starts a new ``version_N`` directory per run. This logger writes into
one fixed directory (``save_dir/name/version``; by default ``save_dir`` itself) and leaves an
existing ``metrics.csv`` in place, appending to it with its header; :class:`~lightning_moe.callbacks.ExactResume`
then cuts the rows a killed run logged after its last checkpoint (on resume) or removes the
file (on a fresh run), so the file always holds exactly one run, without duplicated steps.

Example::

    logger = ResumableCSVLogger("runs/m3_tiny")    # runs/m3_tiny/metrics.csv, hparams.yaml
"""

from __future__ import annotations

import csv
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from typing_extensions import override

__all__ = ["ResumableCSVLogger"]


class _KeepingExperimentWriter(ExperimentWriter):
    """An ``ExperimentWriter`` that appends to an existing ``metrics.csv`` instead of deleting it."""

    @override
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(next(csv.reader(f), []))


class ResumableCSVLogger(CSVLogger):
    """A ``CSVLogger`` for one fixed run directory whose ``metrics.csv`` continues across resumes.

    Args:
        save_dir: the run directory (or its parent, with ``name``/``version``).
        name: a subfolder of ``save_dir``; ``""`` (default) for none.
        version: a subfolder of ``save_dir/name``; ``""`` (default) for none. An int or ``None``
            gives Lightning's ``version_N`` folders (and no continuation across runs).
        prefix: prefix of every metric key.
        flush_logs_every_n_steps: rows are written at least this often (and at every checkpoint with
            :class:`~lightning_moe.callbacks.ExactResume`).
    """

    def __init__(
        self,
        save_dir: _PATH,
        name: str | None = "",
        version: int | str | None = "",
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__(
            save_dir, name=name, version=version, prefix=prefix, flush_logs_every_n_steps=flush_logs_every_n_steps
        )

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The experiment writer (created on first use; an existing ``metrics.csv`` is kept)."""
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _KeepingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
