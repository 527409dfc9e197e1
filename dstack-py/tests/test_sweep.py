"""Sweeps: a grid or list of parameters, one run per trial, at most `max_parallel` at once,
metrics and results."""

import json
import time
from pathlib import Path

import pytest

from dstack.api import Client, Task
from dstack.errors import ConfigurationError, NoCapacityError, ResourceExistsError
from dstack._sweep import expand
from dstack.api import GPU, Resources, RunStatus, Sweep

METRIC = (
    'python3 -c "import json, os; lr=float(os.environ[\'lr\']); bs=int(os.environ[\'bs\']); '
    "print(json.dumps({'step': 1, 'loss': 1.0}));"
    "print(json.dumps({'step': 2, 'loss': abs(lr - 0.01) * 100 + bs / 1000}))\" "
    '>> "$DSTACK_METRICS_FILE"'
)


# Small enough that several trials fit on this machine at once.
SMALL = Resources(cpu="1..", memory="0.1GB..")


def max_overlap(sweep: Sweep) -> int:
    """The most trials whose jobs ran at the same instant."""
    spans = [(r.jobs[-1]["started_at_ms"], r.jobs[-1]["finished_at_ms"]) for r in sweep.runs]
    return max(sum(1 for s, f in spans if s <= start < f) for start, _ in spans)


def test_max_parallel_holds_back_trials_that_would_fit(client: Client) -> None:
    task = Task(commands=["sleep 0.3"], resources=SMALL)
    sweep = client.runs.sweep(task, {"i": [1, 2, 3]}, max_parallel=1, name="serial")
    sweep.wait(timeout=60, progress=False)
    assert max_overlap(sweep) == 1
    unlimited = client.runs.sweep(task, {"i": [1, 2]}, name="parallel")
    unlimited.wait(timeout=60, progress=False)
    assert max_overlap(unlimited) == 2


def test_grid_and_list_expansion() -> None:
    assert expand({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
    assert expand([{"a": 1}, {"a": 2, "b": 3}]) == [{"a": 1}, {"a": 2, "b": 3}]
    with pytest.raises(ConfigurationError, match="`a` must be a list"):
        expand({"a": "xyz"})


def test_fifty_trial_sweep_with_metrics(client: Client) -> None:
    lrs = [0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0005, 0.0002, 0.0001]
    params = {"lr": lrs, "bs": [16, 32, 64, 128, 256]}
    task = Task(
        commands=["echo $DSTACK_SWEEP_INDEX/$DSTACK_SWEEP_SIZE lr=$lr", METRIC],
        resources=SMALL,
    )
    sweep = client.runs.sweep(task, params, max_parallel=4, name="grid")
    assert len(sweep) == 50
    sweep.wait(timeout=300, progress=False)
    rows = sweep.results()
    assert len(rows) == 50
    assert {r["status"] for r in rows} == {"done"}
    assert all(r["exit_status"] == 0 and r["step"] == 2 for r in rows)
    assert [r["run"] for r in rows] == [f"grid-{i}" for i in range(50)]
    for i, row in enumerate(rows):
        assert (row["lr"], row["bs"]) == (lrs[i // 5], [16, 32, 64, 128, 256][i % 5])
        expected = abs(row["lr"] - 0.01) * 100 + row["bs"] / 1000
        assert row["loss"] == pytest.approx(expected)
    run = sweep.runs[7]
    assert b"".join(run.logs()) == f"7/50 lr={lrs[1]}\n".encode()
    best = sweep.best("loss")
    assert best is not None and (best["lr"], best["bs"]) == (0.01, 16)
    worst = sweep.best("loss", mode="max")
    assert worst is not None and (worst["lr"], worst["bs"]) == (0.1, 256)
    assert max_overlap(sweep) <= 4
    frame = sweep.to_pandas()
    assert list(frame.shape) == [50, len(rows[0])]
    assert "grid" in sweep._repr_html_()


def test_trial_env_carries_its_params(client: Client) -> None:
    task = Task(commands=['echo "$name|$n|$flag|$DSTACK_SWEEP_PARAMS"'])
    sweep = client.runs.sweep(task, [{"name": "a b", "n": 2, "flag": True}], name="envs")
    sweep.wait(timeout=60, progress=False)
    out = b"".join(sweep.runs[0].logs()).decode().strip()
    name, n, flag, params = out.split("|")
    assert (name, n, flag) == ("a b", "2", "true")
    assert json.loads(params) == {"name": "a b", "n": 2, "flag": True}


def test_sweep_that_cannot_run_submits_nothing(client: Client) -> None:
    task = Task(commands=["true"], resources=Resources(gpu=GPU(count=64)))
    before = len(client.runs.list(all=True))
    with pytest.raises(NoCapacityError):
        client.runs.sweep(task, {"x": [1, 2]}, name="nofit")
    assert len(client.runs.list(all=True)) == before


def test_a_sweep_is_submitted_whole_or_not_at_all(client: Client) -> None:
    # A trial's name is taken by an active run: no trial of the sweep is submitted.
    blocker = client.runs.apply_configuration(
        Task(name="clash-2", commands=["sleep 30"], resources=SMALL)
    )
    try:
        before = len(client.runs.list(all=True))
        with pytest.raises(ResourceExistsError, match="clash-2"):
            client.runs.sweep(Task(commands=["true"]), {"x": [1, 2, 3, 4]}, name="clash")
        assert len(client.runs.list(all=True)) == before
        assert client.runs.get("clash-0") is None
    finally:
        blocker.stop(abort=True)


def test_sweep_progress_is_shown(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = client.runs.sweep(Task(commands=["true"]), {"x": [1, 2, 3]}, max_parallel=1)
    sweep.wait(timeout=60)
    err = capsys.readouterr().err
    assert "3/3 finished (3 done, 0 failed)" in err


def submit_seconds_per_trial(client: Client, task: Task, n: int) -> float:
    """Seconds per trial to submit a sweep of `n` trials (then stopped, in one request)."""
    start = time.perf_counter()
    sweep = client.runs.sweep(task, {"i": list(range(n))}, max_parallel=1)
    seconds = time.perf_counter() - start
    sweep.stop(abort=True)
    return seconds / n


def test_submitting_is_linear_in_the_number_of_trials(client: Client) -> None:
    # A ratio within one run, not an absolute time: the cost per trial of 2,000 trials is that
    # of 200, give or take (a quadratic cost, as in issue 28, made it 10x).
    task = Task(commands=["sleep 60"], resources=SMALL)
    submit_seconds_per_trial(client, task, 20)  # the server, the agent, the caches
    small = submit_seconds_per_trial(client, task, 200)
    large = submit_seconds_per_trial(client, task, 2000)
    assert large < 3 * small, f"{large * 1e3:.2f} ms per trial of 2000, {small * 1e3:.2f} of 200"


def test_stopping_a_sweep_stops_every_trial(client: Client) -> None:
    task = Task(commands=["sleep 60"], resources=SMALL)
    sweep = client.runs.sweep(task, {"i": list(range(6))}, max_parallel=2)
    sweep.stop(abort=True)
    assert all(run.status != RunStatus.RUNNING for run in sweep.runs)
    sweep.wait(timeout=30, progress=False)
    assert {run.status for run in sweep.runs} <= {RunStatus.TERMINATED, RunStatus.FAILED}
