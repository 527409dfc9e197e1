"""Compares our `dstack --help` and each verb's `--help` with dstack 0.22.5's CLI.

Run with the Python of a venv holding dstack==0.22.5 (scripts/check-cli-help.sh makes one):
    python scripts/check_cli_help.py PATH_TO_OUR_DSTACK README.md

dstack's own argparse parser is built (as its `main()` builds it, with every configuration
type's `dstack apply` flags added), and every verb, subcommand and option string of it must be
in our help of that verb, or be listed in the README table "CLI flags not supported yet"
(`| verb | flag | why |`; flag `(verb)` for a whole verb we lack, verb `*` for every verb). A listed flag that we do have
is an error too (the table must not lie). Exits 1 with every problem listed.
"""

import argparse
import re
import subprocess
import sys

from dstack._internal.cli.main import (  # the commands dstack's main() registers
    ApplyCommand,
    AttachCommand,
    CompletionCommand,
    DeleteCommand,
    EventCommand,
    ExportCommand,
    FleetCommand,
    GatewayCommand,
    ImportCommand,
    InitCommand,
    LoginCommand,
    LogsCommand,
    MetricsCommand,
    OfferCommand,
    PresetCommand,
    ProjectCommand,
    PsCommand,
    RunCommand,
    SecretCommand,
    ServerCommand,
    StopCommand,
    VolumeCommand,
)
from dstack._internal.cli.services.configurators import get_apply_configurator_class
from dstack._internal.core.models.configurations import ApplyConfigurationType

COMMANDS = [
    ApplyCommand, AttachCommand, DeleteCommand, EventCommand, ExportCommand, FleetCommand,
    ImportCommand, GatewayCommand, InitCommand, OfferCommand, LoginCommand, LogsCommand,
    MetricsCommand, PresetCommand, ProjectCommand, PsCommand, RunCommand, SecretCommand,
    ServerCommand, StopCommand, VolumeCommand, CompletionCommand,
]

# Options every verb of ours has under another spelling, or that need no counterpart.
EVERYWHERE = {"-h", "--help"}


def dstack_verbs():
    """{"verb" or "verb sub": set of option strings} of dstack's parser."""
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    for command in COMMANDS:
        command.register(subparsers)
    found = {}

    def walk(name, p):
        options = set()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    walk(f"{name} {sub}", subparser)
            else:
                options.update(action.option_strings)
        found[name] = options

    for name, p in subparsers.choices.items():
        walk(name, p)
    # `dstack apply --help TYPE` adds each configuration type's flags.
    apply = subparsers.choices["apply"]
    for kind in ApplyConfigurationType:
        copy = argparse.ArgumentParser(add_help=False, conflict_handler="resolve")
        get_apply_configurator_class(kind).register_args(copy)
        for action in copy._actions:
            found["apply"].update(action.option_strings)
    del apply
    return found


def unsupported(readme):
    """{(verb, flag): why} from the README table "CLI flags not supported yet"."""
    text = open(readme, encoding="utf-8").read()
    start = text.find("### CLI flags not supported yet")
    if start < 0:
        return {}
    rows = {}
    for line in text[start:].splitlines()[1:]:
        if line.startswith("#"):
            break
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or set(cells[0]) <= {"-", " "} or cells[0] == "Verb":
            continue
        for flag in cells[1].replace("`", "").split(","):
            rows[(cells[0], flag.strip())] = cells[2]
    return rows


def our_help(ours, verb):
    out = subprocess.run(
        [ours, *verb.split(), "--help"], capture_output=True, text=True, check=False
    )
    return out.returncode, out.stdout + out.stderr


def has_flag(help_text, flag):
    return re.search(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])", help_text) is not None


def main():
    ours, readme = sys.argv[1], sys.argv[2]
    theirs = dstack_verbs()
    rows = unsupported(readme)

    class Listed:
        """Lookups in the table: `*` stands for every verb; a whole verb covers its subcommands."""

        def __contains__(self, key):
            verb, flag = key
            top = verb.split()[0]
            return key in rows or ("*", flag) in rows or (
                flag == "(verb)" and (top, "(verb)") in rows
            )

        def __len__(self):
            return len(rows)

    listed = Listed()
    problems = []
    checked = 0
    for verb in sorted(theirs):
        code, help_text = our_help(ours, verb)
        if code != 0:
            if (verb, "(verb)") not in listed:
                problems.append(f"dstack {verb}: missing, and not in the README table")
            continue
        if (verb, "(verb)") in listed:
            problems.append(f"dstack {verb}: exists, but the README table lists it")
        for flag in sorted(theirs[verb] - EVERYWHERE):
            checked += 1
            present = has_flag(help_text, flag)
            if not present and (verb, flag) not in listed:
                problems.append(f"dstack {verb} {flag}: missing, and not in the README table")
            if present and (verb, flag) in listed:
                problems.append(f"dstack {verb} {flag}: present, but the README table lists it")
    for problem in problems:
        print(problem)
    print(
        f"{len(theirs)} verbs and {checked} flags of dstack 0.22.5 compared, "
        f"{len(listed)} listed as not supported yet, {len(problems)} problems"
    )
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
