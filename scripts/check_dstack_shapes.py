"""Parses JSON answers with dstack's own models (dstack 0.22.5, pydantic 2).

    usage: check_dstack_shapes.py [--lenient] [--requests DIR] PATH...

Each PATH is a JSON file named `<Model>.<anything>.json`, or a directory of them. Models:

    Run, RunList (a list of Run), RunPlan, Fleet, FleetList, Instance, Volume, VolumeList,
    JobSubmissionLogs (the answer to logs/poll), EventList (the answer to /api/events/list),
    Error (an HTTP 400 body)

By default a file must parse strictly (dstack's models forbid unknown fields); `--lenient`
parses as dstack's API client does (`validate_extra_ignore`: unknown fields dropped). An
`Error` body must be one dstack's client turns into its typed error (`detail` with one entry
whose `code` it knows).

With `--requests DIR`, the request bodies dstack's client would send next are written there,
built and dumped exactly as `dstack.api.server` does: `get_plan.<case>.json` (from a plan's or
a run's `run_spec`), `apply.<case>.json` (from a plan) and `poll_logs.<case>.<n>.json` (for
each job submission of a run).

Every file is checked; each failure is printed with the file name and the pydantic error, and
the exit status is then 1 (0 when all parse).
"""

import argparse
import json
import pathlib
import sys
from typing import List

from pydantic import TypeAdapter, ValidationError

from dstack._internal.core.compatibility.logs import get_poll_logs_excludes
from dstack._internal.core.compatibility.runs import (
    get_apply_plan_excludes,
    get_get_plan_excludes,
)
from dstack._internal.core.errors import ServerClientError
from dstack._internal.core.models.common import validate_extra_ignore
from dstack._internal.core.models.events import Event
from dstack._internal.core.models.fleets import Fleet
from dstack._internal.core.models.instances import Instance
from dstack._internal.core.models.logs import JobSubmissionLogs
from dstack._internal.core.models.runs import ApplyRunPlanInput, Run, RunPlan
from dstack._internal.core.models.volumes import Volume
from dstack._internal.server.schemas.logs import PollLogsRequest
from dstack._internal.server.schemas.runs import ApplyRunPlanRequest, GetRunPlanRequest
from dstack.api.server import _server_client_errors

MODELS = {
    "Run": Run,
    "RunList": List[Run],
    "RunPlan": RunPlan,
    "Fleet": Fleet,
    "FleetList": List[Fleet],
    "Instance": Instance,
    "Volume": Volume,
    "VolumeList": List[Volume],
    "JobSubmissionLogs": JobSubmissionLogs,
    "EventList": List[Event],
}


class ShapeError(Exception):
    pass


def parse(model: str, data, lenient: bool):
    if model == "Error":
        return parse_error(data)
    tp = MODELS.get(model)
    if tp is None:
        raise ShapeError(f"unknown model {model!r}; expected one of {sorted(MODELS) + ['Error']}")
    if lenient:
        return validate_extra_ignore(tp, data)
    return TypeAdapter(tp).validate_python(data)


def parse_error(data):
    """As `dstack.api.server.APIClient._request` reads an HTTP 400 answer."""
    detail = data.get("detail") if isinstance(data, dict) else None
    if not isinstance(detail, list) or len(detail) != 1:
        raise ShapeError("`detail` must be a list of one entry for dstack's client to read it")
    kwargs = dict(detail[0])
    code = kwargs.pop("code", None)
    if code not in _server_client_errors:
        raise ShapeError(f"unknown error code {code!r}")
    error = _server_client_errors[code](**kwargs)
    if not isinstance(error, ServerClientError) or error.msg != detail[0].get("msg"):
        raise ShapeError("the client's error does not carry the message")
    return error


def write_requests(model: str, case: str, parsed, out: pathlib.Path):
    """The bodies dstack's API client sends after such an answer (`dstack.api.server._runs`,
    `_logs`)."""
    out.mkdir(parents=True, exist_ok=True)
    if model == "RunPlan":
        body = GetRunPlanRequest(run_spec=parsed.run_spec)
        (out / f"get_plan.{case}.json").write_text(
            body.model_dump_json(exclude=get_get_plan_excludes(body))
        )
        plan_input = validate_extra_ignore(ApplyRunPlanInput, parsed)
        body = ApplyRunPlanRequest(plan=plan_input, force=False)
        (out / f"apply.{case}.json").write_text(
            body.model_dump_json(exclude=get_apply_plan_excludes(plan_input))
        )
    elif model == "Run":
        body = GetRunPlanRequest(run_spec=parsed.run_spec)
        (out / f"get_plan.run-{case}.json").write_text(
            body.model_dump_json(exclude=get_get_plan_excludes(body))
        )
        n = 0
        for job in parsed.jobs:
            for submission in job.job_submissions:
                body = PollLogsRequest(
                    run_name=parsed.run_spec.run_name,
                    job_submission_id=submission.id,
                    limit=1000,
                )
                (out / f"poll_logs.{case}.{n}.json").write_text(
                    body.model_dump_json(exclude=get_poll_logs_excludes(body))
                )
                n += 1


def files(paths):
    for path in map(pathlib.Path, paths):
        if path.is_dir():
            yield from sorted(p for p in path.glob("*.json") if p.is_file())
        else:
            yield path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lenient", action="store_true")
    parser.add_argument("--requests", type=pathlib.Path)
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args()
    checked = failed = 0
    for path in files(args.paths):
        model, _, rest = path.name.partition(".")
        case = rest[: -len(".json")] if rest.endswith(".json") else rest
        try:
            data = json.loads(path.read_text())
            parsed = parse(model, data, args.lenient)
        except (ValidationError, ShapeError, ValueError, TypeError) as e:
            print(f"{path}: {model} does not parse:\n{e}", file=sys.stderr)
            failed += 1
            continue
        if args.requests is not None:
            write_requests(model, case, parsed, args.requests)
        checked += 1
    if failed:
        print(f"dstack shapes: {failed} file(s) do not parse", file=sys.stderr)
        return 1
    if checked == 0:
        print("no files to check", file=sys.stderr)
        return 1
    mode = "leniently (as dstack's client)" if args.lenient else "strictly"
    print(f"dstack shapes: {checked} file(s) parse {mode} with dstack's models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
