"""The ``attnpatch`` command: ``attnpatch run -- CMD ...`` and ``attnpatch status``."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("attnpatch run: give a command, e.g. `attnpatch run -- python train.py`", file=sys.stderr)
        return 2
    env = dict(os.environ, ATTNPATCH=args.targets)
    try:
        os.execvpe(command[0], command, env)
    except FileNotFoundError:
        print(f"attnpatch run: command not found: {command[0]}", file=sys.stderr)
        return 127


def _status(args: argparse.Namespace) -> int:
    import attnpatch

    if args.apply:
        attnpatch.apply()
    report = attnpatch.status()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for name, entry in report.items():
        print(f"{name:14s} {entry['state']}")
        for point in entry["points"]:
            note = f"  ({point['note']})" if point["note"] else ""
            print(f"    {point['state']:10s} {point['target']}{note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnpatch", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run a command with ATTNPATCH set (activates in every child process)")
    run.add_argument("--targets", default="1", help="value for ATTNPATCH: 1 (all) or a comma list, e.g. sdpa,mha")
    run.add_argument("command", nargs=argparse.REMAINDER)
    run.set_defaults(func=_run)
    st = sub.add_parser("status", help="show which targets are installed, deferred or skipped, and why")
    st.add_argument("--json", action="store_true")
    st.add_argument("--apply", action="store_true", help="apply() first (import torch to see its targets)")
    st.set_defaults(func=_status)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
