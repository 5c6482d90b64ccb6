"""The ``attnpatch`` command: ``attnpatch run -- CMD ...``, ``attnpatch status``, ``attnpatch doctor``."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import textwrap


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


# What each state in status() means, printed under the table.
STATE_MEANINGS = {
    "installed": "patched now",
    "deferred": "its module is not imported yet; it is patched the moment it is",
    "skipped": "cannot be patched here (the note says why, e.g. not in this library version)",
    "displaced": "another library wrapped it over attnpatch; left alone as a pass-through",
    "off": "not active in this process (see `attnpatch status --apply`, ATTNPATCH=1)",
}


def _import_patched_modules() -> None:
    """Import what the targets patch (torch, transformers and the modules of their
    deferred points), so that each point resolves to installed or skipped."""
    from attnpatch import _patching

    for library in ("torch", "transformers"):
        try:
            importlib.import_module(library)
        except ImportError:
            pass
    for points in list(_patching._points.values()):
        for point in points:
            if point.state == "deferred":
                try:
                    importlib.import_module(point.module)
                except Exception:  # noqa: BLE001 - not in this version: it stays deferred
                    pass


# What a family's counts are called in the table, by point state.
FAMILY_WORDS = {"installed": "patched", "skipped": "skipped"}


def _print_point(point: dict) -> None:
    note = point["note"] or ("module not imported yet" if point["state"] == "deferred" else "")
    print(f"      {point['state']:10s} {point['target']}" + (f"  ({note})" if note else ""))


def _status(args: argparse.Namespace) -> int:
    import attnpatch

    if args.apply:
        attnpatch.apply()
        _import_patched_modules()
    report = attnpatch.status()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    value = os.environ.get("ATTNPATCH")
    source = "apply() by --apply" if args.apply else f"ATTNPATCH={value}" if value else "ATTNPATCH unset"
    print(f"attnpatch {attnpatch.__version__}, this process ({source}):")
    seen = set()
    for name, entry in report.items():
        seen.add(entry["state"].split()[0])
        opt_in = "" if entry.get("default", True) else "  (opt-in: not part of ATTNPATCH=1; turn on by name)"
        print(f"  {name:14s} {entry['state']}{opt_in}")
        for point in entry["points"]:
            if "found_by" in point:
                continue
            seen.add(point["state"])
            _print_point(point)
        for family in entry.get("families", ()):
            found = [p for p in entry["points"] if p.get("found_by") == family["family"]]
            counts = ", ".join(f"{family.get(state, 0)} {word}" for state, word in FAMILY_WORDS.items())
            print(f"      {family['family']}: {family['found']} found on import, {counts}")
            installed = [p["target"].split(".")[-3] for p in found if p["state"] == "installed"]
            if installed:
                seen.add("installed")
                print(
                    textwrap.fill(
                        "patched: " + ", ".join(installed), 88, initial_indent=" " * 8, subsequent_indent=" " * 10
                    )
                )
            for point in found:
                if point["state"] != "installed":
                    seen.add(point["state"])
                    _print_point(point)
    print()
    for state, meaning in STATE_MEANINGS.items():
        if state in seen:
            print(f"  {state}: {meaning}")
    return 0


def _doctor(argv: list[str]) -> int:
    from attnpatch import doctor  # imports torch: only when asked for

    return doctor.main(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnpatch", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run a command with ATTNPATCH set (activates in every child process)")
    run.add_argument("--targets", default="1", help="value for ATTNPATCH: 1 (all) or a comma list, e.g. sdpa,mha")
    run.add_argument("command", nargs=argparse.REMAINDER)
    run.set_defaults(func=_run)
    st = sub.add_parser("status", help="show which targets are installed, deferred or skipped, and why")
    st.add_argument("--json", action="store_true")
    st.add_argument(
        "--apply",
        action="store_true",
        help="apply() first and import torch and transformers, to show what attnpatch patches here",
    )
    st.set_defaults(func=_status)
    doc = sub.add_parser("doctor", help="run the known reproductions here, without then with attnpatch", add_help=False)
    doc.set_defaults(func=_doctor)
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "doctor":
        return _doctor(rest)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
