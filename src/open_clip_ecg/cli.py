"""`open-clip-ecg <command>`: the command line, and its one error handler.

Each command lives in the module that does the work; that module exposes
``add_arguments(parser)`` and ``run(args) -> int``. A command that hands flags it does not define
to another program (``train`` -> open_clip_train) says so with
``parser.set_defaults(forwarded_args=[])``: the flags its parser does not know arrive there, in
order. Modules are imported only when their command runs.

User errors are reported here and nowhere else: a ``ValueError`` (with its subclasses, such as
:class:`~open_clip_ecg.data.shard_format.ShardFormatError`) or a ``FileNotFoundError`` raised by a
command becomes the one line ``open-clip-ecg <command>: error: <message>`` on stderr and exit
status 2, as argparse reports a bad flag. Messages name the file, record or value at fault, so
no traceback is printed. A full disk (``ENOSPC``, ``EDQUOT``) is reported the same way, for every
command: the writers are atomic and resumable, so freeing space and re-running completes the job.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import sys
from typing import List, NamedTuple, Optional

from . import __version__


class Command(NamedTuple):
    module: str  # exposes add_arguments(parser) and run(args) -> int
    help: str  # one line for `open-clip-ecg --help`


SUBCOMMANDS = {
    "quickstart": Command("open_clip_ecg.quickstart", "all steps in minutes: ECGs -> shards -> training -> report"),
    "synth": Command("open_clip_ecg.data.synthetic", "write synthetic 12-lead WFDB records + a CSV index"),
    "shards": Command("open_clip_ecg.data.shards", "ECG collection (PTB-XL, CinC, MIMIC-IV-ECG, CSV) -> shards"),
    "text-cache": Command("open_clip_ecg.text_cache", "embed each distinct report once with a local LLM"),
    "train": Command("open_clip_ecg.train", "train with open_clip's loop (its flags + --ecg-*)"),
    "evaluate": Command("open_clip_ecg.evaluate", "zero-shot multi-label evaluation with a per-label report"),
    "classify": Command("open_clip_ecg.classify", "zero-shot findings for your ECG files (WFDB, .npy, CSV index)"),
    "embed": Command("open_clip_ecg.embed", "write the ECG embeddings of shards to .npy"),
    "train-supervised": Command("open_clip_ecg.baselines", "supervised BCE baseline on the same ECG tower"),
    "probe": Command("open_clip_ecg.probe", "linear probe on frozen ECG embeddings"),
    "export": Command("open_clip_ecg.export", "checkpoint -> open_clip folder (local-dir:, hf-hub:)"),
}

DESCRIPTION = """\
Train and evaluate ECG-text models with open_clip.

open_clip_ecg adds 1-D ECG towers, ECG model configs (ECG-RN18-MiniLM, ...) and a multi-label
(Jaccard) SigLIP loss to open_clip, and turns ECG collections into webdataset shards, so
open_clip's own training loop learns from 12-lead ECGs paired with their reports."""

EPILOG = """\
typical sequence:
  open-clip-ecg quickstart --out quickstart    # all steps on synthetic ECGs, in minutes on a CPU

  open-clip-ecg shards --format ptbxl --input PTBXL_DIR --output shards/ptbxl
  open-clip-ecg train --model ECG-RN18-MiniLM --train-data 'shards/ptbxl/train-*.tar' \\
      --val-data 'shards/ptbxl/val-*.tar' --logs logs
  open-clip-ecg evaluate --model ECG-RN18-MiniLM --pretrained logs/RUN/checkpoints/epoch_N.pt \\
      --data shards/ptbxl --split test --val-data shards/ptbxl --val-split val --out report

`open-clip-ecg COMMAND --help` lists a command's options."""

USER_ERRORS = (ValueError, FileNotFoundError)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: what the tool is, its commands and --version."""
    parser = argparse.ArgumentParser(prog="open-clip-ecg", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, command in SUBCOMMANDS.items():
        commands.add_parser(name, help=command.help, add_help=False)
    return parser


def command_parser(name: str, module) -> argparse.ArgumentParser:
    """The parser of one command, filled in by its module."""
    parser = argparse.ArgumentParser(prog=f"open-clip-ecg {name}", description=SUBCOMMANDS[name].help)
    module.add_arguments(parser)
    return parser


def parse_command_args(parser: argparse.ArgumentParser, argv: List[str]) -> argparse.Namespace:
    """argparse's parse_args, except that a command declaring ``forwarded_args`` receives the flags
    it does not define there instead of an 'unrecognized arguments' error."""
    args, unknown = parser.parse_known_args(argv)
    if unknown and not hasattr(args, "forwarded_args"):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, "forwarded_args"):
        args.forwarded_args = unknown
    return args


def report_user_errors(name: str, action) -> int:
    """``action()``'s exit status; a user error (``USER_ERRORS``) becomes one line on stderr and 2."""
    try:
        return int(action() or 0)
    except USER_ERRORS as e:
        print(f"open-clip-ecg {name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"open-clip-ecg {name}: error: {e.strerror} (errno {e.errno}){where}: free some space and run the "
              "command again (completed output is kept)", file=sys.stderr)
        return 2


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser = build_parser()
        parser.parse_args(argv or ["--help"])  # exits: help, version, or argparse's usage error
        parser.error("a command is required")
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(SUBCOMMANDS[name].module)
    args = parse_command_args(command_parser(name, module), rest)
    return report_user_errors(name, lambda: module.run(args))


if __name__ == "__main__":
    sys.exit(main())
