"""Runs from Python on the local backend: dstack's documentation script, plan/apply, logs,
waiting, stopping, exit codes and the errors users meet."""

import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from dstack.api import GPU, Client, DevEnvironment, Resources, RunStatus, Task
from dstack.errors import (
    ClientError,
    ConfigurationError,
    NotSupportedError,
    ResourceExistsError,
    WaitTimeoutError,
)

# dstack's documentation script, as examples/quickstart.py holds it.
DOC_SCRIPT = (Path(__file__).resolve().parents[2] / "examples" / "quickstart.py").read_text()


def test_documentation_script_runs_unchanged(home: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", DOC_SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout == "b'hello\\n'\n"
    # A second time: the finished run's name is free again.
    again = subprocess.run([sys.executable, "-c", DOC_SCRIPT], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr


def test_plan_then_apply(client: Client) -> None:
    task = Task(commands=["echo planned"], resources=Resources(gpu=GPU(count=0)))
    plan = client.runs.get_run_plan(task)
    assert plan.offers and plan.offers[0]["backend"] == "local"
    assert plan.job_plans[0].total_offers == len(plan.offers)
    assert "<table>" in plan._repr_html_()
    run = client.runs.apply_plan(plan).wait(timeout=60)
    assert run.status == RunStatus.DONE
    assert b"".join(run.logs()) == b"planned\n"


def test_exit_status_and_failure(client: Client) -> None:
    run = client.runs.apply_configuration(Task(commands=["echo out; exit 3"])).wait(timeout=60)
    assert run.status == RunStatus.FAILED
    assert run.exit_status == 3
    assert run.termination_reason is not None
    assert run.duration is not None and run.duration >= 0


def test_attached_logs_follow_until_the_run_ends(client: Client) -> None:
    task = Task(commands=["for i in 1 2 3; do echo line $i; sleep 0.1; done"])
    run = client.runs.apply_configuration(task)
    assert run.attach() is True
    chunks = list(run.logs())
    run.detach()
    assert b"".join(chunks) == b"line 1\nline 2\nline 3\n"
    assert run.refresh().status == RunStatus.DONE


def test_detached_logs_return_what_exists(client: Client) -> None:
    run = client.runs.apply_configuration(Task(commands=["echo early; sleep 30"]))
    run.attach()
    run.detach()
    deadline = time.monotonic() + 10
    while b"early" not in b"".join(run.logs()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    run.stop(abort=True)
    assert run.wait(timeout=30).status == RunStatus.TERMINATED


def test_wait_timeout_leaves_the_run_running(client: Client) -> None:
    run = client.runs.apply_configuration(Task(commands=["sleep 30"]))
    with pytest.raises(WaitTimeoutError):
        run.wait(timeout=0.3)
    assert run.refresh().status in (RunStatus.PROVISIONING, RunStatus.RUNNING)
    run.stop()
    assert run.wait(timeout=30).status == RunStatus.TERMINATED


def test_get_and_list(client: Client) -> None:
    run = client.runs.apply_configuration(Task(commands=["sleep 30"]), name="listed-run")
    try:
        got = client.runs.get("listed-run")
        assert got is not None and got.id == run.id
        assert "listed-run" in [r.name for r in client.runs.list()]
        assert client.runs.get("no-such-run") is None
        with pytest.raises(ResourceExistsError, match="listed-run"):
            client.runs.apply_configuration(Task(commands=["true"]), name="listed-run")
    finally:
        run.stop(abort=True)
    run.wait(timeout=30)
    # Unfinished runs only, or (as dstack) the latest run when none is unfinished.
    listed = client.runs.list()
    latest = client.runs.list(all=True, limit=1)
    assert all(not r.status.is_finished() for r in listed) or [r.name for r in listed] == [latest[0].name]
    assert "listed-run" in [r.name for r in client.runs.list(all=True)]


def test_a_scheduled_run_waits_for_its_next_start(client: Client) -> None:
    run = client.runs.apply_configuration(Task(commands=["echo yearly"], schedule={"cron": ["0 0 1 1 *"]}))
    try:
        assert run.status == RunStatus.PENDING
        start = run.next_triggered_at
        assert start is not None and start > datetime.now(timezone.utc)
        assert (start.month, start.day, start.hour, start.minute) == (1, 1, 0, 0)
        assert run.jobs == []
    finally:
        run.stop()
    assert run.wait(timeout=30).status == RunStatus.TERMINATED
    with pytest.raises(ConfigurationError, match=r"schedule\.cron: invalid cron expression '0 25 \* \* \*'"):
        Task(commands=["true"], schedule={"cron": "0 25 * * *"})


def test_env_override_and_yaml_text(client: Client) -> None:
    yaml = "type: task\ncommands: ['echo $GREETING']\nenv: [GREETING=hi]\n"
    run = client.runs.apply_configuration(yaml, env={"GREETING": "hello"}).wait(timeout=60)
    assert b"".join(run.logs()) == b"hello\n"


def test_dstack_environment_reaches_the_job(client: Client) -> None:
    run = client.runs.apply_configuration(
        Task(commands=["echo $DSTACK_RUN_NAME $DSTACK_NODES_NUM"]), name="env-run"
    ).wait(timeout=60)
    assert b"".join(run.logs()) == b"env-run 1\n"


def test_metrics_are_read_from_the_metrics_file(client: Client) -> None:
    task = Task(
        commands=[
            'echo \'{"step": 1, "loss": 0.5}\' >> "$DSTACK_METRICS_FILE"',
            "echo not-json >> \"$DSTACK_METRICS_FILE\"",
            'echo \'{"step": 2, "loss": 0.25}\' >> "$DSTACK_METRICS_FILE"',
        ]
    )
    run = client.runs.apply_configuration(task).wait(timeout=60)
    assert run.status == RunStatus.DONE
    assert run.metrics == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]


def test_errors_users_meet(client: Client) -> None:
    with pytest.raises(NotSupportedError, match="container runtime not available"):
        client.runs.apply_configuration(Task(image="ubuntu", commands=["true"]))
    with pytest.raises(NotSupportedError, match="repo="):
        client.runs.apply_configuration(Task(commands=["true"]), repo=object())
    with pytest.raises(ClientError, match="server_url and user_token go together"):
        Client.from_config(server_url="http://localhost:3000")
    with pytest.raises(ConfigurationError, match=r"<string>:1:1: \(root\)"):
        client.runs.apply_configuration("[not a mapping]")
    with pytest.raises(TypeError, match="expected a configuration"):
        client.runs.apply_configuration(42)  # type: ignore[arg-type]


def test_a_client_of_the_server_by_url_and_token(client: Client) -> None:
    run = client.runs.apply_configuration(Task(name="by-url", commands=["echo via-url"]))
    run.wait(timeout=60)
    config = Path(client.home, "config.yml").read_text()
    url = re.search(r'url: "([^"]+)"', config).group(1)  # type: ignore[union-attr]
    token = re.search(r'token: "([^"]+)"', config).group(1)  # type: ignore[union-attr]
    remote = Client.from_config(server_url=url, user_token=token, home=client.home + "-elsewhere")
    found = remote.runs.get("by-url")
    assert found is not None and found.status == RunStatus.DONE
    with pytest.raises(ClientError, match="project elsewhere"):
        Client.from_config(project_name="elsewhere", home=client.home)
    assert Client.from_config(project_name="main", home=client.home).runs.get("by-url") is not None
    wrong = Client.from_config(server_url=url, user_token="not-the-token")
    with pytest.raises(ClientError, match="token"):
        wrong.runs.list()


def test_a_run_that_can_never_fit_fails_with_no_offers(client: Client) -> None:
    task = Task(commands=["true"], resources=Resources(gpu=GPU(count=64)))
    plan = client.runs.get_run_plan(task)
    assert plan.offers == [] and plan.no_offers_reason
    run = client.runs.apply_configuration(task).wait(timeout=30)
    assert run.status == RunStatus.FAILED
    assert "no offers" in (run.jobs[-1]["termination_message"] or "")


def test_fleets_and_volumes(client: Client) -> None:
    fleets = client.fleets.list()
    local = client.fleets.get("local")
    assert local is not None and local in fleets
    assert local["instances"][0]["backend"] == "local"
    assert client.volumes.list() == []
    # A network volume needs its cloud backend in $DSTACK_HOME/config.yml.
    from dstack.api import Volume

    volume = Volume(name="data", backend="aws", region="us-east-1", size="10GB")
    with pytest.raises(NotSupportedError, match="backend aws is not configured"):
        client.volumes.apply_configuration(volume)
    assert client.volumes.get("data") is None


def test_html_rendering(client: Client) -> None:
    run = client.runs.apply_configuration(Task(commands=["true"])).wait(timeout=60)
    html = run._repr_html_()
    assert run.name in html and "done" in html


def test_ide_link_of_a_dev_environment(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A local job starts in the directory the run is applied from: the link opens it.
    monkeypatch.chdir(tmp_path)
    dev = DevEnvironment(ide="vscode", init=["echo ready"], resources={"cpu": "1..", "memory": "0.1GB.."})
    run = client.runs.apply_configuration(dev, name="ide-dev")
    try:
        assert run.attach() is True
        run.detach()
        assert run.ide_link == f"vscode://vscode-remote/ssh-remote+ide-dev{tmp_path.resolve()}"
        # Runs without an IDE have no link.
        task = client.runs.apply_configuration(
            Task(commands=["sleep 30"], resources={"cpu": "1..", "memory": "0.1GB.."})
        )
        task.attach()
        task.detach()
        assert task.ide_link is None
        task.stop(abort=True)
    finally:
        run.stop(abort=True)
    assert run.wait(timeout=30).status == RunStatus.TERMINATED
    # Nor has a dev environment that no longer runs.
    assert run.ide_link is None
