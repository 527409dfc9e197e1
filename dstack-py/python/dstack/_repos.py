"""Repos: the code a run works on (`RemoteRepo`, `LocalRepo`, `VirtualRepo`) and
`client.repos`.

dstack uploads a run's repo to the host and starts its jobs in the checkout. Here the repo is
prepared on this machine, then given to the run as its configuration's own `repos` (a git work
tree) or `files` (any other directory), which are uploaded to every host (see
`dstack_core::archive`): each job starts in a copy of it (a relative `working_dir` is taken
from there). The directory prepared is

- the directory itself, for a repo loaded from one (uncommitted changes included, as dstack's
  upload includes them);
- a clone under `$DSTACK_HOME/repos/`, for a repo given by URL: one per commit, never changed
  once made, so runs of the same commit share it and a later commit gets its own;
- the files of a virtual repo written under `$DSTACK_HOME/repos/`, one directory per distinct
  content.

"""

import hashlib
import importlib.resources
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any, Dict, NoReturn, Optional, Union

from dstack.errors import ClientError, NotSupportedError

__all__ = ["LocalRepo", "RemoteRepo", "Repo", "RepoCollection", "VirtualRepo"]


def _digest(*parts: Optional[str]) -> str:
    """A short stable id of `parts`."""
    h = hashlib.sha256()
    for part in parts:
        h.update((part or "").encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _directory(repo_dir: Union[str, "os.PathLike[str]"]) -> str:
    """`repo_dir` as an absolute path; it must be a directory."""
    path = Path(repo_dir).expanduser().absolute()
    if not path.is_dir():
        raise ClientError(f"repo directory {path} does not exist or is not a directory")
    return str(path)


class RemoteRepo:
    """A git repository: a clone on this machine (`RemoteRepo.from_dir`) or a URL
    (`RemoteRepo.from_url`, optionally at `repo_branch` and `repo_hash`)."""

    def __init__(
        self,
        *,
        repo_id: Optional[str] = None,
        local_repo_dir: Union[str, "os.PathLike[str]", None] = None,
        repo_url: Optional[str] = None,
        repo_branch: Optional[str] = None,
        repo_hash: Optional[str] = None,
    ) -> None:
        if local_repo_dir is None and repo_url is None:
            raise ClientError("a RemoteRepo needs local_repo_dir or repo_url")
        for what, value in (("URL", repo_url), ("branch", repo_branch), ("hash", repo_hash)):
            if value is not None and (not value or value.startswith("-")):
                raise ClientError(f"invalid repo {what} {value!r}")
        self.local_repo_dir = None if local_repo_dir is None else _directory(local_repo_dir)
        self.repo_url = repo_url
        self.repo_branch = repo_branch
        self.repo_hash = repo_hash
        self.repo_id = repo_id or _digest(repo_url or self.local_repo_dir)

    @staticmethod
    def from_dir(repo_dir: Union[str, "os.PathLike[str]"]) -> "RemoteRepo":
        """The repository whose clone is `repo_dir` (jobs run in it as it is)."""
        return RemoteRepo(local_repo_dir=repo_dir)

    @staticmethod
    def from_url(
        repo_url: str, repo_branch: Optional[str] = None, repo_hash: Optional[str] = None
    ) -> "RemoteRepo":
        """The repository at `repo_url`: its `repo_branch` (default: the default branch) at
        `repo_hash` (default: the branch's latest commit when a run is applied)."""
        return RemoteRepo(repo_url=repo_url, repo_branch=repo_branch, repo_hash=repo_hash)

    def __repr__(self) -> str:
        where = self.local_repo_dir or self.repo_url
        return f"RemoteRepo({where!r}, branch={self.repo_branch!r}, hash={self.repo_hash!r})"


class LocalRepo:
    """A directory on this machine that is not a git repository."""

    def __init__(
        self, *, repo_id: Optional[str] = None, repo_dir: Union[str, "os.PathLike[str]"]
    ) -> None:
        self.repo_dir = _directory(repo_dir)
        self.repo_id = repo_id or _digest(self.repo_dir)

    @staticmethod
    def from_dir(repo_dir: Union[str, "os.PathLike[str]"]) -> "LocalRepo":
        """The directory `repo_dir`."""
        return LocalRepo(repo_dir=repo_dir)

    def __repr__(self) -> str:
        return f"LocalRepo({self.repo_dir!r})"


class VirtualRepo:
    """Files given in code (`add_file`, `add_file_from_package`): jobs start in a directory
    holding them."""

    def __init__(self, repo_id: str = "none") -> None:
        self.repo_id = repo_id
        self.files: Dict[str, bytes] = {}

    def add_file(self, path: str, content: Union[bytes, str]) -> None:
        """Adds a file at `path` (relative, within the repo)."""
        parts = PurePosixPath(path).parts
        if not parts or PurePosixPath(path).is_absolute() or ".." in parts:
            raise ClientError(f"invalid path {path!r}: use a relative path within the repo")
        self.files[str(PurePosixPath(*parts))] = content.encode() if isinstance(content, str) else content

    def add_file_from_package(self, package: Union[ModuleType, str], path: str) -> None:
        """Adds the file `path` of Python package `package`, at the same path."""
        self.add_file(path, importlib.resources.files(package).joinpath(path).read_bytes())

    def __repr__(self) -> str:
        return f"VirtualRepo({self.repo_id!r}, files={sorted(self.files)!r})"


Repo = Union[RemoteRepo, LocalRepo, VirtualRepo]


def with_repo(configuration: Union[Dict[str, Any], str], directory: str) -> Dict[str, Any]:
    """`configuration` (plain data; YAML text is read first) with the repo prepared in
    `directory` added as its own: a git work tree as `repos` (its files, uncommitted changes
    included), any other directory (a `LocalRepo`, a `VirtualRepo`'s files) as `files`
    unpacked into the working directory. Either is uploaded and reaches jobs on every backend,
    in containers too; a configuration that names a repo of its own is refused."""
    from dstack._native import validate

    data: Dict[str, Any] = validate(configuration) if isinstance(configuration, str) else dict(configuration)
    if data.get("repos"):
        raise ClientError("the configuration has `repos` and repo= names another: give one of them")
    if (Path(directory) / ".git").exists():
        data["repos"] = [{"local_path": directory}]
    else:
        data["files"] = [{"local_path": directory, "path": "."}, *(data.get("files") or [])]
    return data


def _git(*args: str, cwd: Optional[str] = None, identity_file: Optional[str] = None) -> str:
    """Runs git (arguments passed as they are, never through a shell), with `identity_file` as
    its SSH key if given; its output."""
    if shutil.which("git") is None:
        raise NotSupportedError("git is needed for repos given by URL, and it is not on PATH")
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    if identity_file is not None:
        # git runs this through a shell: the path is quoted.
        env["GIT_SSH_COMMAND"] = f"ssh -i {shlex.quote(identity_file)} -o IdentitiesOnly=yes"
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise ClientError(f"git {args[0]} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _commit_of(repo: RemoteRepo, identity_file: Optional[str]) -> str:
    """The commit a URL repo names now: its hash, or its branch's (or default branch's) head."""
    if repo.repo_hash:
        return repo.repo_hash
    ref = f"refs/heads/{repo.repo_branch}" if repo.repo_branch else "HEAD"
    for line in _git("ls-remote", str(repo.repo_url), ref, identity_file=identity_file).splitlines():
        commit, _, name = line.partition("\t")
        if name == ref:
            return commit
    missing = f"branch {repo.repo_branch}" if repo.repo_branch else "HEAD"
    raise ClientError(f"{repo.repo_url} has no {missing}")


def _no_credentials(oauth_token: Optional[str], creds: object) -> None:
    """Refuses credentials given in code: git's own are used (never a token in a URL or on a
    command line, where other processes could read it)."""
    if oauth_token is not None or creds is not None:
        raise NotSupportedError(
            "oauth_token= and creds= are not supported: git's own credentials are used "
            "(a credential helper for HTTPS, ~/.ssh or git_identity_file= for SSH)"
        )


class RepoCollection:
    """`client.repos`: prepares repos for runs (`init`), loads them from directories (`load`)."""

    def __init__(self, home: Union[str, "os.PathLike[str]"]) -> None:
        self._root = Path(home) / "repos"

    def init(
        self,
        repo: Repo,
        git_identity_file: Optional[str] = None,
        oauth_token: Optional[str] = None,
        creds: object = None,
    ) -> None:
        """Makes `repo` ready for runs: clones a URL repo, writes a virtual repo's files.
        Credentials are git's own (its credential helpers, `~/.ssh`); `git_identity_file` is
        used for SSH URLs."""
        _no_credentials(oauth_token, creds)
        self.directory(repo, git_identity_file)

    def load(
        self,
        repo_dir: Union[str, "os.PathLike[str]"],
        local: bool = False,
        init: bool = False,
        git_identity_file: Optional[str] = None,
        oauth_token: Optional[str] = None,
    ) -> Union[RemoteRepo, LocalRepo]:
        """The repo in `repo_dir`: a `LocalRepo` if `local`, else a `RemoteRepo`."""
        _no_credentials(oauth_token, None)
        repo: Union[RemoteRepo, LocalRepo] = (
            LocalRepo.from_dir(repo_dir) if local else RemoteRepo.from_dir(repo_dir)
        )
        if init:
            self.init(repo, git_identity_file)
        return repo

    def is_initialized(self, repo: Repo, by_user: bool = False) -> bool:
        """Whether runs of `repo` need no more preparation (a URL repo with a hash is cloned, a
        virtual repo's files are written). `by_user` asks whether it was prepared with the
        user's own credentials: the only ones used here (git's), so the answer is the same."""
        if isinstance(repo, LocalRepo) or (isinstance(repo, RemoteRepo) and repo.local_repo_dir):
            return True
        if isinstance(repo, VirtualRepo):
            return self._virtual_dir(repo).is_dir()
        return repo.repo_hash is not None and self._clone_dir(repo, repo.repo_hash).is_dir()

    def get(self, repo_id: str, *, with_creds: bool = False) -> NoReturn:
        """dstack's repo record by id is not supported yet: repos are prepared on this
        machine, not recorded by the server (`is_initialized(repo)` says whether one is
        ready)."""
        raise NotSupportedError(
            f"client.repos.get({repo_id!r}) is not supported yet: repos are prepared on this "
            "machine, not recorded by the server; use client.repos.is_initialized(repo)"
        )

    def directory(self, repo: object, git_identity_file: Optional[str] = None) -> str:
        """Where jobs of this machine run for `repo`, prepared (see the module's doc)."""
        if isinstance(repo, LocalRepo):
            return repo.repo_dir
        if isinstance(repo, RemoteRepo):
            if repo.local_repo_dir is not None:
                return repo.local_repo_dir
            return str(self._clone(repo, git_identity_file))
        if isinstance(repo, VirtualRepo):
            return str(self._write(repo))
        raise NotSupportedError(
            f"repo= takes a RemoteRepo, LocalRepo or VirtualRepo (from dstack.api), not {type(repo).__name__}"
        )

    def _clone_dir(self, repo: RemoteRepo, commit: str) -> Path:
        return self._root / f"git-{_digest(repo.repo_url)}-{commit}"

    def _virtual_dir(self, repo: VirtualRepo) -> Path:
        parts = [repo.repo_id]
        for path in sorted(repo.files):
            parts += [path, hashlib.sha256(repo.files[path]).hexdigest()]
        return self._root / f"virtual-{_digest(*parts)}"

    def _clone(self, repo: RemoteRepo, git_identity_file: Optional[str]) -> Path:
        commit = _commit_of(repo, git_identity_file)
        target = self._clone_dir(repo, commit)
        if target.is_dir():
            return target
        self._root.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=".clone-", dir=self._root)
        try:
            url = str(repo.repo_url)
            _git("clone", "--quiet", "--no-checkout", "--", url, scratch, identity_file=git_identity_file)
            _git("checkout", "--quiet", "--detach", commit, cwd=scratch)
            self._publish(Path(scratch), target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return target

    def _write(self, repo: VirtualRepo) -> Path:
        target = self._virtual_dir(repo)
        if target.is_dir():
            return target
        self._root.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=".files-", dir=self._root)
        try:
            for path, content in repo.files.items():
                file = Path(scratch) / path
                file.parent.mkdir(parents=True, exist_ok=True)
                file.write_bytes(content)
            self._publish(Path(scratch), target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return target

    @staticmethod
    def _publish(scratch: Path, target: Path) -> None:
        """Moves a prepared directory into place at once; another process that got there
        first wins (the content is the same)."""
        try:
            scratch.rename(target)
        except OSError:
            if not target.is_dir():
                raise
