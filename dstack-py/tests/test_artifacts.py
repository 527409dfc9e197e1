"""Artifacts and tags from Python: `client.tags.add/list/delete` (files uploaded as `:TAG`),
and `run.artifacts` / `run.download_artifacts()` of a run that saves artifacts (a workflow's,
run with `dstack run`)."""

import os
import subprocess
from pathlib import Path

import pytest

from dstack import _binaries
from dstack.api import Client
from dstack.errors import DstackError


def test_uploaded_files_are_tagged_listed_and_deleted(client: Client, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "rows.csv").write_text("a,b\n")
    tag = client.tags.add("pydata", artifacts=[data])
    assert (tag["workflow"], tag["name"]) == (None, "pydata")
    assert [f["path"] for f in tag["manifest"]["files"]] == ["data/sub/rows.csv"]
    assert any(t["name"] == "pydata" for t in client.tags.list())
    with pytest.raises(DstackError, match="exists"):
        client.tags.add("pydata", artifacts=[data])
    with pytest.raises(ValueError):
        client.tags.add("both", run="x", artifacts=[data])
    client.tags.delete("pydata")
    assert not any(t["name"] == "pydata" for t in client.tags.list())


def test_a_workflows_artifacts_are_listed_and_downloaded(client: Client, home: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / ".dstack").mkdir(parents=True)
    (project / ".dstack" / "workflows.yaml").write_text(
        "workflows:\n  - name: out\n    provider: bash\n    artifacts: [out]\n"
        "    commands: ['mkdir -p out', 'echo saved > out/a.txt']\n"
    )
    dstack = _binaries.server()
    assert dstack is not None
    env = {**os.environ, "DSTACK_HOME": str(home)}
    done = subprocess.run(
        [str(dstack), "run", "-y", "-n", "py-artifacts", "out"],
        cwd=project, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    run = client.runs.get("py-artifacts")
    assert run is not None
    assert [f["path"] for f in run.artifacts] == ["out/a.txt"]
    written = run.download_artifacts(output_dir=tmp_path / "got")
    assert written == ["out/a.txt"]
    assert (tmp_path / "got" / "out" / "a.txt").read_text() == "saved\n"
