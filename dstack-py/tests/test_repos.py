"""Repos from Python: a run given a repo starts its jobs in a copy of it, uploaded as the
configuration's own `repos`/`files` (so on every backend) — of the directory itself, of a
clone of a URL at a commit (real git, a local repository served by `file://`), or of a
virtual repo's files."""

import asyncio
import subprocess
from pathlib import Path
from typing import List, Set

import pytest

from dstack.api import AsyncClient, Client, LocalRepo, RemoteRepo, RunStatus, Task, VirtualRepo
from dstack.errors import ClientError, NotSupportedError

PWD_AND_FILE = Task(commands=["pwd", "cat hello.txt"])


def output(client: Client, task: Task, **kwargs: object) -> List[str]:
    run = client.runs.apply_configuration(task, **kwargs).wait(timeout=60)  # type: ignore[arg-type]
    text = b"".join(run.logs()).decode()
    assert run.status == RunStatus.DONE, text
    return text.splitlines()


def git(*args: str, cwd: Path) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    done = subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True)
    return done.stdout.strip()


@pytest.fixture()
def origin(tmp_path: Path) -> Path:
    """A git repository with two commits of `hello.txt` on branch `main` and one on `other`."""
    repo = tmp_path / "origin"
    repo.mkdir()
    git("init", "--quiet", "--initial-branch=main", cwd=repo)
    (repo / "hello.txt").write_text("first\n")
    git("add", "hello.txt", cwd=repo)
    git("commit", "--quiet", "-m", "first", cwd=repo)
    git("checkout", "--quiet", "-b", "other", cwd=repo)
    (repo / "hello.txt").write_text("other\n")
    git("commit", "--quiet", "-am", "other", cwd=repo)
    git("checkout", "--quiet", "main", cwd=repo)
    (repo / "hello.txt").write_text("second\n")
    git("commit", "--quiet", "-am", "second", cwd=repo)
    return repo


def test_a_repo_from_a_directory_runs_its_jobs_in_a_copy_of_it(client: Client, origin: Path) -> None:
    (origin / "hello.txt").write_text("uncommitted\n")
    pwd, text = output(client, PWD_AND_FILE, repo=RemoteRepo.from_dir(origin))
    assert text == "uncommitted" and pwd != str(origin)
    # client.repos.load gives the same; a relative working_dir is taken from the copy.
    (origin / "sub").mkdir()
    (origin / "sub" / "hello.txt").write_text("in sub\n")
    repo = client.repos.load(origin)
    task = Task(commands=["pwd", "cat hello.txt"], working_dir="sub")
    lines = output(client, task, repo=repo)
    assert lines[0].endswith("/sub") and lines[1] == "in sub"
    assert output(client, PWD_AND_FILE, repo=LocalRepo.from_dir(origin))[1] == "uncommitted"
    # A directory that is not a git repo goes in as files.
    plain = origin.parent / "plain"
    plain.mkdir()
    (plain / "hello.txt").write_text("plain\n")
    assert output(client, PWD_AND_FILE, repo=LocalRepo.from_dir(plain))[1] == "plain"


def test_a_repo_from_a_url_is_cloned_once_per_commit(client: Client, origin: Path) -> None:
    url = f"file://{origin}"
    first = git("rev-list", "--max-parents=0", "HEAD", cwd=origin)
    root = Path(client.home) / "repos"

    def prepared() -> Set[Path]:
        return set(root.iterdir()) if root.is_dir() else set()

    before = prepared()
    assert output(client, PWD_AND_FILE, repo=RemoteRepo.from_url(url))[1] == "second"
    (clone,) = prepared() - before
    assert output(client, PWD_AND_FILE, repo=RemoteRepo.from_url(url, repo_hash=first))[1] == "first"
    assert output(client, PWD_AND_FILE, repo=RemoteRepo.from_url(url, repo_branch="other"))[1] == "other"
    # The same commit again: the same clone, as it is now.
    (clone / "hello.txt").write_text("touched\n")
    count = len(prepared())
    assert output(client, PWD_AND_FILE, repo=RemoteRepo.from_url(url))[1] == "touched"
    assert len(prepared()) == count
    # A new commit on the branch: a clone of its own.
    (origin / "hello.txt").write_text("third\n")
    git("commit", "--quiet", "-am", "third", cwd=origin)
    assert output(client, PWD_AND_FILE, repo=RemoteRepo.from_url(url))[1] == "third"
    assert len(prepared()) == count + 1
    # init prepares a repo ahead of its runs; a plan carries its repo to apply_plan.
    pinned = RemoteRepo.from_url(url, repo_hash=first)
    client.repos.init(pinned)
    assert client.repos.is_initialized(pinned)
    plan = client.runs.get_run_plan(PWD_AND_FILE, repo=pinned)
    run = client.runs.apply_plan(plan).wait(timeout=60)
    assert b"".join(run.logs()).decode().splitlines()[1] == "first"


def test_repo_errors_name_what_is_wrong(client: Client, origin: Path, tmp_path: Path) -> None:
    with pytest.raises(ClientError, match="has no branch nope"):
        client.runs.apply_configuration(PWD_AND_FILE, repo=RemoteRepo.from_url(f"file://{origin}", "nope"))
    with pytest.raises(ClientError, match="git ls-remote failed: .*does not appear to be a git repository"):
        client.runs.apply_configuration(PWD_AND_FILE, repo=RemoteRepo.from_url(f"file://{tmp_path}/none"))
    with pytest.raises(ClientError, match="does not exist"):
        RemoteRepo.from_dir(tmp_path / "missing")
    with pytest.raises(ClientError, match="invalid repo URL"):
        RemoteRepo.from_url("--upload-pack=touch /tmp/x")
    with pytest.raises(ClientError, match="relative path"):
        VirtualRepo().add_file("../outside", b"x")
    with pytest.raises(NotSupportedError, match="git's own credentials"):
        client.repos.init(RemoteRepo.from_url(f"file://{origin}"), oauth_token="t0ken")
    with pytest.raises(ClientError, match="give one of them"):
        client.runs.apply_configuration(Task(repos=["."], commands=["true"]), repo=VirtualRepo())
    with pytest.raises(NotSupportedError, match="repo= takes a RemoteRepo"):
        client.runs.apply_configuration(PWD_AND_FILE, repo=object())  # type: ignore[arg-type]


def test_a_virtual_repo_runs_in_a_copy_of_its_files(client: Client) -> None:
    repo = VirtualRepo()
    repo.add_file("hello.txt", b"virtual\n")
    repo.add_file("pkg/data.txt", "nested\n")
    repo.add_file_from_package("dstack", "py.typed")
    task = Task(commands=["pwd", "cat hello.txt", "cat pkg/data.txt", "test -f py.typed && echo typed"])
    lines = output(client, task, repo=repo)
    assert lines[1:] == ["virtual", "nested", "typed"]
    assert not client.repos.is_initialized(VirtualRepo("other"))
    # The same content: the same directory.
    same = VirtualRepo()
    same.add_file("pkg/data.txt", b"nested\n")
    same.add_file("hello.txt", b"virtual\n")
    same.add_file_from_package("dstack", "py.typed")
    written = sorted((Path(client.home) / "repos").iterdir())
    assert output(client, task, repo=same)[1:] == lines[1:]
    assert sorted((Path(client.home) / "repos").iterdir()) == written


def test_the_async_client_takes_repos(home: Path, origin: Path) -> None:
    async def main() -> List[str]:
        client = AsyncClient.from_config(home=home)
        repo = RemoteRepo.from_url(f"file://{origin}")
        run = await client.runs.apply_configuration(PWD_AND_FILE, repo=repo)
        await run.wait(timeout=60)
        return b"".join([chunk async for chunk in run.logs()]).decode().splitlines()

    assert asyncio.run(main())[1] == "second"


def test_the_repos_and_files_of_a_configuration_are_uploaded_for_the_job(
    client: Client, origin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Relative paths are taken from the directory the run is applied from.
    monkeypatch.chdir(origin)
    (origin / "hello.txt").write_text("uncommitted\n")
    (tmp_path / "extra.txt").write_text("extra\n")
    task = Task(
        repos=["."],
        files=[f"{tmp_path / 'extra.txt'}:inputs/extra.txt"],
        commands=["cat hello.txt inputs/extra.txt", f'test "$PWD" != "{origin}" && echo a-copy'],
    )
    assert output(client, task) == ["uncommitted", "extra", "a-copy"]
    # The job had a copy: the repo on disk is as it was.
    assert not (origin / "inputs").exists()
