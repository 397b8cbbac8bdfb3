"""`open-clip-ecg <subcommand>`: a thin dispatcher.

Each subcommand lives in the module that does the work; that module exposes
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their
subcommand runs, so `open-clip-ecg --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "synth": ("open_clip_ecg.data.synthetic", "write synthetic 12-lead WFDB records + CSV"),
    "shards": ("open_clip_ecg.data.shards", "turn an ECG collection into webdataset shards"),
    "train": ("open_clip_ecg.train", "train with open_clip's loop (open_clip_train flags + --ecg-*)"),
    "evaluate": ("open_clip_ecg.evaluate", "zero-shot multi-label evaluation with per-label report"),
    "text-cache": ("open_clip_ecg.text_cache", "embed every distinct report once with a local LLM (frozen text)"),
    "embed": ("open_clip_ecg.embed", "write ECG embeddings of shards to .npy"),
    "train-supervised": ("open_clip_ecg.baselines", "supervised BCE baseline on the same tower"),
    "probe": ("open_clip_ecg.probe", "linear probe on frozen ECG embeddings"),
    "export": ("open_clip_ecg.export", "checkpoint -> open_clip folder (local-dir:/hf-hub:, safetensors)"),
    "quickstart": ("open_clip_ecg.quickstart", "synthetic data -> shards -> training -> report"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="open-clip-ecg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv[:1] or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    if hasattr(module, "cli_main"):  # subcommands that forward raw argv (train)
        return int(module.cli_main(rest) or 0)
    sub_parser = argparse.ArgumentParser(prog=f"open-clip-ecg {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except ValueError as e:  # bad input: the message names the file/record/value, no traceback
        print(f"open-clip-ecg {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
