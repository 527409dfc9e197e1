"""Sweeps: one task run over a grid (or a list) of parameters, as a group of runs of which at
most `max_parallel` hold resources at once, with results as a table.

A trial reports metrics by appending JSON objects, one per line, to the file named by
`$DSTACK_METRICS_FILE` (e.g. `{"step": 10, "loss": 0.31}`); `results()` keeps the last value
of each metric.
"""

import importlib
import itertools
import json
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Union

from dstack._client import Run
from dstack._records import RunStatus, html_table
from dstack.errors import ConfigurationError, DstackError, NoCapacityError, WaitTimeoutError

if TYPE_CHECKING:
    from dstack._config import Task
    from dstack._native import RawClient

__all__ = ["Params", "Sweep", "expand"]

Params = Union[Mapping[str, Sequence[Any]], Sequence[Mapping[str, Any]]]

# How often `wait()` redraws its progress at most, and checks its timeout (it hears of every
# status change as the engine makes it, whenever it redraws).
_REDRAW_SECONDS = 0.2

# How many times a broken watch of a sweep is opened again before the error is raised
# (0.2 s apart: the client restarts a killed server meanwhile).
_WATCH_ATTEMPTS = 50


def expand(params: Params) -> List[Dict[str, Any]]:
    """The trials of `params`: every combination of a grid, or the dicts of a list."""
    if isinstance(params, Mapping):
        keys = list(params)
        for key in keys:
            values = params[key]
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise ConfigurationError(
                    f"sweep params: `{key}` must be a list of values, not {type(values).__name__}"
                )
        return [dict(zip(keys, combo)) for combo in itertools.product(*(params[k] for k in keys))]
    trials = [dict(p) for p in params]
    for i, trial in enumerate(trials):
        if not all(isinstance(k, str) for k in trial):
            raise ConfigurationError(f"sweep params[{i}]: parameter names must be strings")
    return trials


def env_value(value: Any) -> str:
    """A parameter as an environment value: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


class Sweep:
    """The runs of one sweep, in trial order."""

    def __init__(
        self,
        name: str,
        params: List[Dict[str, Any]],
        runs: List[Run],
        raw: "RawClient",
        group: str,
    ) -> None:
        self.name = name
        self.params = params
        self.runs = runs
        self._raw = raw
        self._group = group

    @classmethod
    def submit(
        cls,
        raw: "RawClient",
        task: "Task",
        params: Params,
        max_parallel: Optional[int],
        name: Optional[str],
    ) -> "Sweep":
        """Plans `task` once, then submits one run per trial."""
        from dstack._records import configuration_data

        trials = expand(params)
        if not trials:
            raise ConfigurationError("sweep params: no trials (an empty grid or list)")
        if max_parallel is not None and max_parallel < 1:
            raise ConfigurationError("sweep max_parallel: must be at least 1")
        data = configuration_data(task)
        plan = raw.plan(data)
        if not plan["offers"]:
            raise NoCapacityError(plan["no_offers_reason"] or "no offers for the sweep's task")
        base = name or (getattr(task, "name", None) if not isinstance(data, str) else None)
        base = base or f"sweep-{uuid.uuid4().hex[:6]}"
        group = f"{base}-{uuid.uuid4().hex[:8]}"
        size = len(trials)
        submissions = []
        for index, trial in enumerate(trials):
            env = {k: env_value(v) for k, v in trial.items()}
            env["DSTACK_SWEEP_INDEX"] = str(index)
            env["DSTACK_SWEEP_SIZE"] = str(size)
            env["DSTACK_SWEEP_PARAMS"] = json.dumps(trial)
            submissions.append((f"{base}-{index}", env))
        # All trials in one transaction: a sweep is submitted whole or not at all.
        raws = raw.apply_group(data, submissions, group, max_parallel)
        snapshots = {s["run"]["id"]: s for s in raw.snapshots([r.id for r in raws])}
        runs = [Run(r, snapshots.get(r.id), raw.home) for r in raws]
        return cls(base, trials, runs, raw, group)

    def refresh(self) -> "Sweep":
        """Reads every unfinished trial's current state (in one request)."""
        self._read([run for run in self.runs if not run.status.is_finished()])
        return self

    def _read(self, runs: List[Run]) -> None:
        """Reads these trials' current state in one request."""
        if not runs:
            return
        snapshots = {s["run"]["id"]: s for s in self._raw.snapshots([r.id for r in runs])}
        for run in runs:
            snapshot = snapshots.get(run.id)
            if snapshot is not None:
                run._snapshot = snapshot

    def counts(self) -> Dict[str, int]:
        """How many trials are done, failed (or stopped), running, and waiting."""
        counts = {"done": 0, "failed": 0, "running": 0, "waiting": 0}
        for run in self.runs:
            counts[_category(run.status)] += 1
        return counts

    def wait(self, timeout: Optional[float] = None, progress: bool = True) -> "Sweep":
        """Waits until every trial has finished, showing progress (a live line in a
        notebook, on stderr otherwise). Raises `WaitTimeoutError` after `timeout` seconds
        (the trials keep going).

        The engine pushes the group's status changes (one stream for the whole sweep); the
        trials' records are read once, at the end."""
        deadline = None if timeout is None else time.monotonic() + timeout
        by_id = {run.id: run for run in self.runs}
        counts = self.counts()
        show = _Progress(self.name, len(self.runs)) if progress else None
        watch = self._raw.watch_group(self._group)
        try:
            while counts["done"] + counts["failed"] < len(self.runs):
                if show is not None:
                    show.update(counts)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    unfinished = len(self.runs) - counts["done"] - counts["failed"]
                    raise WaitTimeoutError(
                        f"sweep {self.name}: {unfinished} trial(s) unfinished after {timeout}s"
                    )
                step = _REDRAW_SECONDS if left is None else min(_REDRAW_SECONDS, left)
                try:
                    changes = watch.next(step)
                except DstackError:
                    # The server went away (killed, restarted): the next one has the state;
                    # a new watch sends every trial's status again.
                    watch = self._watch_again(deadline)
                    continue
                if changes is None:
                    break  # every trial has finished
                for run_id, status in changes:
                    run = by_id.get(run_id)
                    if run is not None:
                        counts[_category(run.status)] -= 1
                        run._snapshot["run"]["status"] = status
                        counts[_category(run.status)] += 1
            self._read(self.runs)
            if show is not None:
                show.update(self.counts())
            return self
        finally:
            if show is not None:
                show.close()

    def _watch_again(self, deadline: Optional[float]) -> Any:
        """A new watch of the group, once a server answers (the client starts one when
        none runs); the last error after `_WATCH_ATTEMPTS` tries or at the deadline."""
        for attempt in itertools.count(1):
            try:
                return self._raw.watch_group(self._group)
            except DstackError:
                late = deadline is not None and time.monotonic() >= deadline
                if late or attempt >= _WATCH_ATTEMPTS:
                    raise
                time.sleep(0.2)

    def stop(self, abort: bool = False) -> None:
        """Stops every unfinished trial (in one request)."""
        self._read(self.runs)
        unfinished = [run for run in self.runs if not run.status.is_finished()]
        if unfinished:
            self._raw.stop_many([run.id for run in unfinished], abort)
            self._read(unfinished)

    def results(self) -> List[Dict[str, Any]]:
        """One row per trial: `run`, its params, `status`, `exit_status`, `duration` (s), and
        the last value of each metric it reported."""
        rows = []
        self._read(self.runs)
        # One request for every trial's metrics (a trial whose host cannot be reached now
        # has none to show).
        all_metrics = self._raw.metrics_many([run.id for run in self.runs])
        for params, run, metrics in zip(self.params, self.runs, all_metrics):
            row: Dict[str, Any] = {"run": run.name, **params}
            row["status"] = run.status.value
            row["exit_status"] = run.exit_status
            row["duration"] = run.duration
            for record in metrics:
                row.update(record)
            rows.append(row)
        return rows

    def to_pandas(self) -> Any:
        """`results()` as a pandas DataFrame (needs pandas)."""
        pandas = importlib.import_module("pandas")
        return pandas.DataFrame(self.results())

    def best(self, metric: str, mode: str = "min") -> Optional[Dict[str, Any]]:
        """The row of `results()` with the lowest (`mode="min"`) or highest (`"max"`) last
        value of `metric`; `None` when no trial reported it."""
        if mode not in ("min", "max"):
            raise ValueError(f'mode must be "min" or "max", not {mode!r}')
        rows = [r for r in self.results() if isinstance(r.get(metric), (int, float))]
        if not rows:
            return None
        pick = min if mode == "min" else max
        return pick(rows, key=lambda r: r[metric])

    def __len__(self) -> int:
        return len(self.runs)

    def __repr__(self) -> str:
        counts = self.counts()
        return (
            f"<Sweep {self.name}: {len(self.runs)} trials, {counts['done']} done, "
            f"{counts['running']} running, {counts['failed']} failed>"
        )

    def _repr_html_(self) -> str:
        rows = self.results()
        header: List[str] = []
        for row in rows:
            header.extend(k for k in row if k not in header)
        cells = [[_cell(row.get(k)) for k in header] for row in rows]
        counts = self.counts()
        caption = (
            f"sweep {self.name}: {counts['done']} done, {counts['running']} running, "
            f"{counts['waiting']} waiting, {counts['failed']} failed"
        )
        return html_table(header, cells, caption)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class _Text:
    """Text that a notebook shows as it is (a `str` would be shown with quotes)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _category(status: RunStatus) -> str:
    """The column of `Sweep.counts()` a trial in `status` is counted in."""
    if status == RunStatus.DONE:
        return "done"
    if status.is_finished():
        return "failed"
    if status in (RunStatus.RUNNING, RunStatus.TERMINATING):
        return "running"
    return "waiting"


class _Progress:
    """Trials done / running / failed: a display updated in place in a notebook, a line
    rewritten on stderr in a terminal."""

    def __init__(self, name: str, total: int) -> None:
        self._name = name
        self._total = total
        self._last = ""
        self._display: Any = None
        ipython = sys.modules.get("IPython")
        if ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None:
            self._display = importlib.import_module("IPython.display").display(
                _Text(""), display_id=True
            )

    def _text(self, c: Mapping[str, int]) -> str:
        return (
            f"sweep {self._name}: {c['done'] + c['failed']}/{self._total} finished "
            f"({c['done']} done, {c['failed']} failed), {c['running']} running, "
            f"{c['waiting']} waiting"
        )

    def update(self, counts: Mapping[str, int]) -> None:
        text = self._text(counts)
        if text == self._last:
            return
        self._last = text
        if self._display is not None:
            self._display.update(_Text(text))
        elif sys.stderr.isatty():
            sys.stderr.write("\r" + text)
            sys.stderr.flush()
        else:
            sys.stderr.write(text + "\n")

    def close(self) -> None:
        if self._display is None and self._last and sys.stderr.isatty():
            sys.stderr.write("\n")
            sys.stderr.flush()
