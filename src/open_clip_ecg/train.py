"""Train ECG-text models with open_clip's own loop: ``python -m open_clip_ecg.train [flags]``.

Every open_clip_train flag keeps its meaning (precision, --accum-freq, --resume, logs,
tensorboard, schedules, locking, torchrun DDP); ``--ecg-*`` flags add what ECGs need
(:mod:`open_clip_ecg.training.options`). :func:`main` runs open_clip_train's ``main`` with the
seams of :mod:`open_clip_ecg.training.seams` installed for the run; the parts they plug in live in
:mod:`open_clip_ecg.training`, one module per responsibility.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from . import compat
from .data.manifest import check_validation_shards, read_shard_info
from .data.pipeline import expand_shards
from .training.options import ecg_argument_parser, given_flags
from .training.seams import open_clip_seams


def check_inputs_before_start(open_clip_argv: List[str]) -> None:
    """Fail on missing, unreadable or mismatched shards or a missing checkpoint file before
    open_clip_train starts (and logs ~250 lines)."""
    given = given_flags(open_clip_argv, "--train-data", "--val-data", "--pretrained")
    infos = {spec: read_shard_info(expand_shards(spec)) for spec in (given.train_data, given.val_data) if spec}
    if given.train_data and given.val_data:
        check_validation_shards(infos[given.train_data], infos[given.val_data])
    if given.pretrained and not os.path.isfile(given.pretrained):
        raise ValueError(f"--pretrained {given.pretrained!r} is not a file (ECG models have no pretrained tags)")


HELP_POINTER = "All other flags are open_clip_train's (python -m open_clip_train.main --help)."


def main(argv: Optional[List[str]] = None) -> int:
    """Run open_clip_train.main with the ECG seams; returns its exit status.

    `argv` are open_clip_train's flags and the ``--ecg-*`` ones, in any order. User errors (bad
    flags, missing shards, a checkpoint of another model) raise ValueError naming the problem."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":  # torchrun ... -m open_clip_ecg.train -- --logs ...
        argv = argv[1:]
    ecg_options, open_clip_argv = ecg_argument_parser().parse_known_args(argv)
    check_inputs_before_start(open_clip_argv)
    open_clip_main = compat.TRAINING_MAIN.get()
    root = logging.getLogger()
    root_level, root_handlers = root.level, list(root.handlers)
    try:
        with open_clip_seams(ecg_options, open_clip_argv):
            status = open_clip_main(open_clip_argv)
    finally:
        # open_clip_train's setup_logging adds root handlers and sets every logger to INFO; undo it
        # so in-process callers (quickstart, scripts, tests) don't log twice and torch's compiler
        # does not report its (empty) statistics at exit
        for handler in [h for h in root.handlers if h not in root_handlers]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(root_level)
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch"):
                logging.getLogger(name).setLevel(logging.WARNING)
    return 0 if status in (None, 0) else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`open-clip-ecg train`: the flags go, unparsed and in order, to :func:`main`.

    open_clip_train owns most flags and builds its parser inside its ``parse_args``, so they cannot
    be declared here: they arrive in ``forwarded_args`` (see :mod:`open_clip_ecg.cli`). ``--help``
    lists the ``--ecg-*`` options and points to open_clip_train's."""
    parser.set_defaults(forwarded_args=[])
    parser.usage = "open-clip-ecg train [open_clip_train flags] [--ecg-* flags]"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (ecg_argument_parser().format_help()
                     + f"\n{HELP_POINTER}")


def run(args: argparse.Namespace) -> int:
    return main(args.forwarded_args)


if __name__ == "__main__":
    from .cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
