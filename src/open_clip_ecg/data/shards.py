"""``open-clip-ecg shards``: an ECG collection -> a folder of webdataset shards.

    open-clip-ecg shards --format {ptbxl,cinc,mimic-iv-ecg,csv} --input PATH --output DIR

Picks the reader (:mod:`.readers`) and its format-specific options, runs
:func:`.shard_writer.write_shards`, prints the skipped records per reason and the
``--train-data``/``--val-data`` patterns to train with. What lands in DIR: :mod:`.shard_format`
(samples) and :mod:`.manifest` (folder files); how splits are drawn: :mod:`.splits`.
"""
from __future__ import annotations

import os
import sys

from .manifest import MANIFEST_FILE
from .preprocess import MISSING_LEAD_POLICIES, SAMPLING_RATE_RANGE
from .readers import READERS, get_reader
from .record import RecordError
from .shard_format import SPLITS
from .shard_writer import ShardOptions, write_shards
from .splits import SPLIT_METHODS
from .text import TEXT_MODES


def add_arguments(parser) -> None:
    parser.add_argument("--format", required=True, choices=sorted(READERS), help="layout of --input")
    parser.add_argument("--input", required=True,
                        help="PTB-XL folder, CinC folder, MIMIC-IV-ECG folder, or a CSV/JSONL index (csv)")
    parser.add_argument("--output", required=True,
                        help="shard folder; `{split}-NNNNNN.tar` files there that this job does not produce are deleted")
    parser.add_argument("--sampling-rate", type=float, default=500.0, help="target rate in Hz (default 500)")
    parser.add_argument("--seconds", type=float, default=10.0, help="stored length in seconds (default 10)")
    parser.add_argument("--min-seconds", type=float, default=None,
                        help="shorter records are skipped as too_short, longer ones up to --seconds are "
                             "zero-padded (default: --seconds)")
    parser.add_argument("--missing-leads", choices=MISSING_LEAD_POLICIES, default="error",
                        help="records lacking leads: skip (error), derive limb leads from I and II, or zero-fill")
    parser.add_argument("--split-by", choices=SPLIT_METHODS, default=None,
                        help="default: fold if every record has one (PTB-XL), column if the CSV has a split "
                             "column, else patient")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="patient/random splits (default 0.1)")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="patient/random splits (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient/random split")
    parser.add_argument("--val-folds", type=int, nargs="+", default=[9], help="folds for val (--split-by fold)")
    parser.add_argument("--test-folds", type=int, nargs="+", default=[10], help="folds for test (--split-by fold)")
    parser.add_argument("--text", choices=TEXT_MODES, default=None,
                        help="report as written (PTB-XL: mostly German), a sentence from the labels' English "
                             "names, or both (default: report; labels for cinc, which has no reports)")
    parser.add_argument("--label-level", default=None,
                        help="ptbxl: all, diagnostic, subclass, superclass, form or rhythm (default all)")
    parser.add_argument("--likelihood-threshold", type=float, default=None,
                        help="ptbxl: drop statements whose known likelihood is below this (default 0)")
    parser.add_argument("--label-names", default=None,
                        help="csv: label names file (.csv with code,name or .json); default label_names.csv/.json "
                             "beside the index")
    parser.add_argument("--encoding", default=None,
                        help="csv: text encoding of the index (default UTF-8); rows not valid in it are skipped "
                             "as bad_encoding")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--beats", action="store_true",
                        help="store each record's QRS beats (for models with RR channels, e.g. ECG-RN18-RR-*: "
                             "their loaders then skip beat detection; costs the writer a beat detection per record)")
    parser.add_argument("--workers", type=int, default=1, help="loading/preprocessing processes (default 1)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record (exit status 1)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _reader_options(args) -> dict:
    """Format-specific reader options; an option given for another format is an error."""
    given = {flag: value for flag, value in (("--label-level", args.label_level),
                                             ("--likelihood-threshold", args.likelihood_threshold),
                                             ("--label-names", args.label_names),
                                             ("--encoding", args.encoding)) if value is not None}
    allowed = {"ptbxl": {"--label-level", "--likelihood-threshold"},
               "csv": {"--label-names", "--encoding"}}.get(args.format, set())
    wrong = sorted(set(given) - allowed)
    if wrong:
        raise ValueError(f"{', '.join(wrong)} do(es) not apply to --format {args.format}")
    if args.format == "ptbxl":
        # PTB-XL is stored at 100 and 500 Hz: read the 100 Hz files when they suffice.
        options = {"sampling_rate": 100 if args.sampling_rate <= 100 else 500}
        if args.label_level is not None:
            options["label_level"] = args.label_level
        if args.likelihood_threshold is not None:
            options["likelihood_threshold"] = args.likelihood_threshold
        return options
    return {key: value for key, value in (("label_names", args.label_names), ("encoding", args.encoding)) if value}


def summarize_skips(manifest: dict, limit: int = 20) -> str:
    """Skipped records per reason and the first ``limit`` of them (for stderr)."""
    skipped = manifest["skipped"]
    if not skipped:
        return f"no records skipped ({manifest['records']['listed']} listed)"
    reasons = ", ".join(f"{reason}={n}" for reason, n in manifest["skip_counts"].items())
    lines = [f"skipped {len(skipped)} of {manifest['records']['listed']} records: {reasons}"]
    lines += [f"  {s['path']} (record {s['record_id']}): {s['reason']}: {s['detail']}" for s in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    lines.append(f"every skipped record is listed in {MANIFEST_FILE}")
    return "\n".join(lines)


# What the dominant skip reason of a run that wrote nothing usually means.
EMPTY_RUN_HINTS = {
    "no_labels": "wrong --format for this input, or --text labels on records without labels?",
    "no_report": "the records have no reports: use --text labels or both",
    "unreadable": "wrong --format or --input (signal files not where the index says)?",
    "missing_leads": "try --missing-leads derive or zero",
    "too_short": "lower --seconds or set --min-seconds",
    "sampling_rate": f"sampling rates must lie in {SAMPLING_RATE_RANGE[0]:g}-{SAMPLING_RATE_RANGE[1]:g} Hz",
    "bad_encoding": "pass the index's encoding with --encoding (e.g. latin-1)",
}


def empty_run_message(manifest: dict, fmt: str) -> str:
    """One line for a run that wrote no sample: the dominant skip reason and what to check."""
    listed = manifest["records"]["listed"]
    if not manifest["skip_counts"]:
        return f"wrote 0 samples of {listed} listed records"
    reason, n = max(manifest["skip_counts"].items(), key=lambda item: item[1])
    hint = EMPTY_RUN_HINTS.get(reason, f"see the skipped records in {MANIFEST_FILE}")
    return (f"wrote 0 samples: all {listed} records were skipped, most as {reason} ({n}) "
            f"with --format {fmt}; {hint}")


def training_flags(manifest: dict, output_dir) -> str:
    """The --train-data/--val-data flags (open_clip brace patterns) for the written shards."""
    patterns = {split: os.path.join(str(output_dir), p) for split, p in manifest["patterns"].items()}
    flags = [f"--{split}-data '{patterns[split]}'" for split in ("train", "val") if split in patterns]
    lines = ["train with: " + " ".join(flags)] if flags else []
    if "test" in patterns:
        lines.append(f"test shards: '{patterns['test']}'")
    return "\n".join(lines)


def run(args) -> int:
    text = args.text or ("labels" if args.format == "cinc" else "report")
    options = ShardOptions(sampling_rate=args.sampling_rate, seconds=args.seconds, min_seconds=args.min_seconds,
                           missing_leads=args.missing_leads, split_by=args.split_by, val_fraction=args.val_fraction,
                           test_fraction=args.test_fraction, seed=args.seed, val_folds=tuple(args.val_folds),
                           test_folds=tuple(args.test_folds), text=text, shard_size=args.shard_size, beats=args.beats,
                           workers=args.workers, strict=args.strict, progress=args.progress)
    try:
        reader_options = _reader_options(args)
        reader = get_reader(args.format, args.input, **reader_options)
        source = {"format": args.format, "input": os.path.abspath(args.input),
                  "reader_options": {k: str(v) for k, v in reader_options.items()}}
        manifest = write_shards(reader, args.output, options, source=source)
    except RecordError as err:
        print(f"error (--strict): {err}", file=sys.stderr)
        return 1
    print(summarize_skips(manifest), file=sys.stderr)
    if manifest["records"]["written"] == 0:
        print(f"error: {empty_run_message(manifest, args.format)}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{split} {manifest['counts'][split]}" for split in SPLITS)
    print(f"wrote {manifest['records']['written']} samples ({counts}) in {len(manifest['shards'])} shard(s) "
          f"to {args.output}")
    print(training_flags(manifest, args.output))
    return 0
