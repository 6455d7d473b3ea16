"""Command line: `lightning-edit run edit|sae|transcoder|generate|calibrate key=value ...` and
`lightning-edit calibrate ...`, also as `lightning run ...` / `lightning calibrate ...`.

Recent `lightning` releases install no `lightning` executable; `lightning-sdk` installs one for its
cloud CLI. Ours handles `run <job>` and `calibrate` and hands every other command to lightning-sdk's
CLI when that package is installed, as lightning 2.3-2.5 did. `lightning-edit` and
`python -m lightning_edit` take the same subcommands, so nothing depends on owning the name.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Sequence

from lightning_edit.config import available_configs, describe, load_config
from lightning_edit.errors import DEBUG_ENV, USER_EXIT, UserError, debug_enabled
from lightning_edit.jobs import JOBS, job_module

SDK_ENTRYPOINT = "lightning_sdk.cli.entrypoint"


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (exit 2), like every other user error."""

    def error(self, message: str):  # noqa: D102
        self.exit(USER_EXIT, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _build_parser(prog: str) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="lightning-edit: train sparse components and edit LLMs through them.",
        epilog="Example: %(prog)s run edit config=microedit.yaml data.limit=100",
    )
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback behind a one-line error (also {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser("run", help="run a job: " + ", ".join(JOBS), description="Run a job.")
    run_sub = run.add_subparsers(dest="job", metavar="JOB", parser_class=_Parser)
    for name in JOBS:
        _job_parser(run_sub, name, job_module(name).SUMMARY)
    _job_parser(sub, "calibrate", f"{job_module('calibrate').SUMMARY} (the same as `run calibrate`)")
    from lightning_edit.world import WORLD_NAMES

    world = sub.add_parser("world", help="build or inspect an embedded world")
    world.add_argument("--name", default="toyworld", choices=WORLD_NAMES,
                       help="the world (default toyworld; toyworld-gpt2 is a GPT-2 world of companies)")
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--force", action="store_true", help="rebuild even when cached")
    return parser


def _job_parser(sub, name: str, summary: str) -> argparse.ArgumentParser:
    """The parser of job `name`: its config keys and defaults, its config files, its examples."""
    module = job_module(name)
    examples = getattr(module, "EXAMPLES", "")
    job = sub.add_parser(
        name,
        help=summary,
        description=f"{module.SUMMARY}\n\nDefault config: configs/{module.DEFAULT_CONFIG}. "
        "Pass config=NAME.yaml to pick another file (from configs/ or a path), then any "
        "number of key=value overrides (nested keys with dots).",
        epilog=(examples + "\n\n" if examples else "") + "Config keys and their defaults:\n\n"
        + describe(module.SCHEMA) + "\nConfig files: " + ", ".join(available_configs()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    job.add_argument("overrides", nargs="*", metavar="key=value", help="config=FILE and overrides")
    job.add_argument("--debug", action="store_true", help="show the traceback behind a one-line error")
    return job


def run_job(name: str, overrides: Sequence[str]) -> int:
    """Load the job's config (defaults < file < overrides) and run it."""
    module = job_module(name)
    cfg = load_config(module.SCHEMA, overrides, default_config=module.DEFAULT_CONFIG)
    return int(module.run(cfg) or 0)


def main(argv: Sequence[str] | None = None, prog: str = "lightning-edit") -> int:
    """The CLI. A `UserError` anywhere (a file, record, field, key, component, folder) is one line
    on stderr and exit code 2; `--debug` or LIGHTNING_EDIT_DEBUG=1 raises it with its traceback.
    Anything else is a bug: its traceback propagates (exit 1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or debug_enabled()
    try:
        return _main(argv, prog)
    except UserError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return USER_EXIT


def _main(argv: list[str], prog: str) -> int:
    parser = _build_parser(prog)
    args = parser.parse_args(argv)
    if args.command == "run":
        if not args.job:
            parser.parse_args(["run", "--help"])
        return run_job(args.job, args.overrides)
    if args.command == "calibrate":
        return run_job("calibrate", args.overrides)
    if args.command == "world":
        from lightning_edit.world import build_world

        from lightning_edit.code.compiler import CompilerMissing

        try:
            world = build_world(args.name, seed=args.seed, force=args.force)
        except CompilerMissing as exc:  # a code world checks its D references with ldc2
            print(f"error: {exc}", file=sys.stderr)
            return 2
        detail = getattr(world, "summary", None) or f"object-token accuracy {world.accuracy['accuracy']:.4f}"
        print(f"{args.name}: {world.root} ({detail})")
        return 0
    parser.print_help()
    return 0


def _sdk_available() -> bool:
    return importlib.util.find_spec("lightning_sdk") is not None


def lightning_main(argv: Sequence[str] | None = None) -> int:
    """The `lightning` executable: our `run` jobs, everything else to lightning-sdk's CLI."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--debug"]:
        return main(argv, prog="lightning") if argv[1:2] in (["run"], ["calibrate"]) else lightning_main(argv[1:])
    ours = (argv[:1] == ["run"] and (len(argv) == 1 or argv[1] in JOBS or argv[1].startswith("-"))) \
        or argv[:1] == ["calibrate"]
    if ours:
        return main(argv, prog="lightning")
    if argv and argv[0] not in ("-h", "--help") and _sdk_available():
        # Same hand-over as lightning 2.3-2.5's entry point: the SDK's CLI with our argv.
        os.execv(sys.executable, [sys.executable, "-m", SDK_ENTRYPOINT, *argv])
    if not argv or argv[0] in ("-h", "--help"):
        main(["--help"], prog="lightning")
        if _sdk_available():
            print("\nOther commands are handed to lightning-sdk's CLI (installed).")
        return 0
    print(
        f"lightning: '{argv[0]}' is not a lightning-edit command. This `lightning` handles "
        f"`lightning run {{{','.join(JOBS)}}}`; other commands belong to lightning-sdk's CLI, "
        "which is not installed (pip install lightning-sdk).",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
