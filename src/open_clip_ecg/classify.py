"""``open-clip-ecg classify``: zero-shot findings for a user's own ECG files.

    open-clip-ecg classify --model local-dir:quickstart/model --out findings/ --plot my_ecgs/

- **Model**: an exported folder (``local-dir:DIR``, ``hf-hub:org/repo``; :mod:`.export`) or a
  config name with ``--pretrained``, paired with ``--ecg-text-model``/``--ecg-text-cache`` as in
  training (:func:`open_clip_ecg.factory.load_model_from_args`). It must record its ECG
  preprocessing (every checkpoint trained by this package does).
- **Inputs** (any number, mixed): a WFDB record (``.hea``), a folder (every ``.hea`` under it,
  recursively), a ``.npy``/``.npz`` array (``[leads, samples]``, ``[samples, leads]`` or
  ``[records, leads, samples]``; every array of an ``.npz``) with ``--sampling-rate`` and
  ``--leads``, or the CSV/JSONL index ``open-clip-ecg shards --format csv`` reads. Each record goes
  through the model's recorded preprocessing (:class:`~open_clip_ecg.model_preprocess.ECGPreprocess`:
  leads picked by name in any spelling, resampled, normalised, centre-cropped, RR channels where
  the model takes them).
- **Findings**: ``--findings NAME ...``, the findings of a prompt JSON (``--prompts``), a task's
  labels (``--task``), or by default the training vocabulary the model records. Scores are
  :class:`~open_clip_ecg.scoring.TaskScorer`'s, as ``evaluate`` makes them (SigLIP's sigmoid
  unless the stored rules chose the contrast score).
- **Decisions**: per-finding thresholds chosen on validation data when the model carries them for
  the scored task and prompts (``classify.json`` beside an exported model, written by
  ``quickstart``, or ``--decisions FILE``); otherwise 0.5. The JSON output and the last line say which.
- **Bad records** (unreadable, too short, missing leads, non-finite, unsupported rate) are one line
  each on stderr and counted; the run goes on. Exit status 1 when no record was readable.
- **Outputs** in ``--out``: ``predictions.csv`` (one row per readable record: record, path,
  positive findings, then one probability column per finding), ``predictions.json`` (the same, with
  the model, findings, thresholds and skipped records), with ``--plot`` one ``<record>.png`` per
  record (:func:`open_clip_ecg.ecg_plot.plot_12lead`); a summary line per record on stdout.
"""
from __future__ import annotations

import os
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from .atomic import write_csv_atomic, write_json_atomic
from .data.preprocess import sampling_rate_problem
from .data.readers.csv import CSVReader
from .data.readers.wfdb_io import read_wfdb, record_base
from .data.record import RecordError
from .factory import add_model_arguments, load_model_from_args
from .leads import LEAD_SETS, lead_indices
from .model_preprocess import ECGPreprocess
from .prompts import load_prompt_file
from .scoring import ScoringRules, TaskScorer, choose_thresholds, describe_shards, resolve_task
from .tasks import TASKS, get_task
from .zeroshot import encode_ecg

DECISIONS_FILE = "classify.json"
DECISIONS_FORMAT = "open_clip_ecg.classify/1"
INDEX_SUFFIXES = (".csv", ".jsonl", ".ndjson")
ARRAY_SUFFIXES = (".npy", ".npz")
WFDB_SUFFIXES = (".hea", ".dat", ".mat")
TOP = 3  # findings per record on the summary line and in the plot title


# ------------------------------------------------------------------------------------------------
# Decisions stored beside a model: scoring rules and validation thresholds per task
# ------------------------------------------------------------------------------------------------

def decisions_on_validation(model, tokenizer, val_data, val_split: Optional[str],
                            rules_by_task: Dict[str, ScoringRules], batch_size: int = 64) -> Dict:
    """``{task: {rules, thresholds, ...}}``: per task, the max-F1 thresholds of `model` scored by its
    rules on the validation shards, exactly as ``evaluate --val-data`` chooses them."""
    from .data.manifest import read_shard_info
    from .embed import embed_shards, resolve_shards

    shards = resolve_shards(val_data, val_split)
    embedded = embed_shards(model, shards, batch_size=batch_size)
    vocabulary = read_shard_info(shards)["vocabulary"]
    spec = describe_shards(val_data, val_split)
    decisions = {}
    for name, rules in rules_by_task.items():
        task = resolve_task(name, shards)
        scores = TaskScorer(model, tokenizer, task, rules, None, vocabulary, batch_size).labelled_scores(embedded, spec)
        thresholds, info = choose_thresholds(task.codes, scores)
        decisions[name] = {"rules": asdict(rules), "thresholds": dict(zip(task.codes, map(float, thresholds))),
                           "threshold_source": info["source"], "val_data": spec, "val_records": len(scores.keys)}
    return decisions


def write_decisions(folder, tasks: Dict, about: Dict) -> Path:
    """``classify.json`` in `folder` (an exported model): the decisions :func:`read_decisions` reads."""
    path = Path(folder) / DECISIONS_FILE
    write_json_atomic(path, {"format": DECISIONS_FORMAT, **about, "tasks": tasks}, indent=2, final_newline=True)
    return path


def read_decisions(model_name: str, path: Optional[str] = None) -> Optional[Dict]:
    """The decisions file `path`, else the one beside an exported model (None when there is none)."""
    from open_clip.factory import parse_model_name

    if path is None:
        schema, identifier = parse_model_name(model_name)
        if schema == "local-dir":
            path = os.path.join(identifier, DECISIONS_FILE)
        elif schema == "hf-hub":
            from huggingface_hub import hf_hub_download

            try:
                path = hf_hub_download(identifier, DECISIONS_FILE)
            except Exception:  # a Hub model shared without decisions (or not in the offline cache)
                return None
        if path is None or not os.path.isfile(path):
            return None
    import json

    try:
        decisions = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"decisions file {path}: cannot read it: {err}") from None
    if not isinstance(decisions, dict) or decisions.get("format") != DECISIONS_FORMAT:
        raise ValueError(f"decisions file {path}: not an {DECISIONS_FORMAT} file")
    return {**decisions, "file": str(path)}


# ------------------------------------------------------------------------------------------------
# What is scored and how
# ------------------------------------------------------------------------------------------------

@dataclass
class Findings:
    scorer: TaskScorer
    names: Dict[str, str]  # code -> English name
    thresholds: np.ndarray
    thresholds_about: Dict  # for predictions.json

    @property
    def codes(self) -> List[str]:
        return self.scorer.task.codes


def choose_findings(model, tokenizer, cfg: Dict, decisions: Optional[Dict], task_name: str = "labels",
                    findings: Optional[Sequence[str]] = None, prompts: Optional[str] = None,
                    batch_size: int = 64) -> Findings:
    """The findings scored (module docstring), with stored validation thresholds where they apply:
    only to the task and prompts they were chosen with (stored rules, no --findings/--prompts)."""
    user_findings = list(findings or [])
    if prompts and not user_findings:
        user_findings = list(load_prompt_file(prompts)["findings"])
    if user_findings:
        if len(set(user_findings)) != len(user_findings):
            raise ValueError(f"findings {user_findings}: each finding once")
        task = get_task("labels", [{"id": i, "code": f, "name": f} for i, f in enumerate(user_findings)])
        vocabulary, stored = task_vocabulary(task), None
        why = "--findings" if findings else f"the findings of --prompts {prompts}"
    else:
        vocabulary = cfg.get("vocabulary") or []
        if task_name == "labels" and not vocabulary:
            raise ValueError("the model records no training vocabulary: name the findings with --findings or --prompts")
        task = get_task(task_name, vocabulary if task_name == "labels" else None)
        stored = None if prompts else ((decisions or {}).get("tasks") or {}).get(task_name)
        why = (f"--prompts {prompts} changes the prompts the stored thresholds were chosen with" if prompts
               else f"the model carries no validation thresholds for task {task_name!r}")
    rules = ScoringRules(**stored["rules"]) if stored else ScoringRules(aggregate="prompt" if user_findings
                                                                         else ScoringRules().aggregate)
    scorer = TaskScorer(model, tokenizer, task, rules, prompts, vocabulary, batch_size)
    if stored:
        missing = [code for code in task.codes if code not in stored["thresholds"]]
        if missing:
            raise ValueError(f"decisions file {decisions['file']}: no threshold for {missing} of task {task_name}")
        thresholds = np.array([stored["thresholds"][code] for code in task.codes], dtype=np.float64)
        about = {"source": stored.get("threshold_source", "validation"), "chosen_on": stored.get("val_data"),
                 "file": decisions["file"], "rules": stored["rules"]}
    else:
        thresholds, info = choose_thresholds(task.codes, None)
        about = {"source": info["source"], "value": info["value"], "note": f"0.5 for every finding: {why}"}
    return Findings(scorer, {label.code: label.name for label in task.labels}, thresholds, about)


def task_vocabulary(task) -> List[Dict]:
    return [{"id": i, "code": label.code, "name": label.name} for i, label in enumerate(task.labels)]


# ------------------------------------------------------------------------------------------------
# Inputs -> records
# ------------------------------------------------------------------------------------------------

@dataclass
class Source:
    """One record to read: where it is and how (``wfdb``, ``array`` with `key`, ``index`` with `entry`),
    or a `defect` found while listing."""

    record_id: str
    path: str
    kind: str
    key: Optional[object] = None
    entry: Optional[object] = None
    reader: Optional[CSVReader] = None
    defect: Optional[RecordError] = None


def list_sources(inputs: Sequence[str]) -> List[Source]:
    """Every record the inputs name, in order (module docstring); unusable inputs become defects."""
    sources = []
    for given in inputs:
        path = Path(given)
        suffix = path.suffix.lower()
        if path.is_dir():
            headers = sorted(path.rglob("*.hea"))
            if not headers:
                sources.append(_defect(given, "unreadable", "a folder without WFDB headers (.hea)"))
            sources += [Source(str(h.relative_to(path).with_suffix("")), record_base(h), "wfdb") for h in headers]
        elif suffix in WFDB_SUFFIXES or (not path.exists() and Path(str(path) + ".hea").is_file()):
            sources.append(Source(path.with_suffix("").name if suffix in WFDB_SUFFIXES else path.name,
                                  record_base(path), "wfdb"))
        elif not path.exists():
            sources.append(_defect(given, "unreadable", "no such file or folder"))
        elif suffix in INDEX_SUFFIXES:
            sources += _index_sources(given)
        elif suffix in ARRAY_SUFFIXES:
            sources += _array_sources(given)
        else:
            sources.append(_defect(given, "unreadable", "not a WFDB record (.hea), a .npy/.npz array, a CSV/JSONL "
                                                        "index or a folder"))
    return sources


def _defect(path: str, reason: str, detail: str, record_id: str = "") -> Source:
    return Source(record_id or path, path, "defect", defect=RecordError(reason, path, detail, record_id))


def _index_sources(path: str) -> List[Source]:
    try:
        reader = CSVReader(path)
        entries = list(reader.entries())
    except ValueError as err:
        return [_defect(path, "unreadable", str(err))]
    return [Source(e.record_id, e.path, "index", entry=e, reader=reader) if not e.defect
            else Source(e.record_id, e.path, "defect", defect=RecordError(e.defect[0], e.path, e.defect[1], e.record_id))
            for e in entries]


def _array_sources(path: str) -> List[Source]:
    """One source per record of a .npy (2-D: one; 3-D: one per row) or per array of a .npz."""
    stem = Path(path).stem
    try:
        if path.lower().endswith(".npz"):
            with np.load(path, allow_pickle=False) as arrays:
                shapes = {key: arrays[key].shape for key in arrays.files}
        else:
            shapes = {None: np.load(path, mmap_mode="r", allow_pickle=False).shape}
    except Exception as err:  # numpy raises ValueError, OSError, EOFError, zipfile errors, ...
        return [_defect(path, "unreadable", f"cannot read the array file: {err}")]
    sources = []
    for key, shape in shapes.items():
        name = stem if key is None else f"{stem}:{key}"
        if len(shape) == 3:
            sources += [Source(f"{name}[{i}]", path, "array", key=(key, i)) for i in range(shape[0])]
        else:
            sources.append(Source(name, path, "array", key=(key, None)))
    return sources


def load_source(source: Source, sampling_rate: Optional[float], leads: Optional[Sequence[str]]
                ) -> Tuple[np.ndarray, float, List[str]]:
    """``(signal [leads, T] mV, rate, lead names)`` of a listed record; RecordError when unusable."""
    if source.kind == "wfdb":
        return read_wfdb(source.path, source.record_id)
    if source.kind == "index":
        record = source.reader.load(source.entry)
        return record.signal, record.sampling_rate, record.lead_names
    key, row = source.key
    try:
        if key is None:
            array = np.load(source.path, allow_pickle=False)
        else:
            with np.load(source.path, allow_pickle=False) as arrays:
                array = arrays[key]
    except Exception as err:
        raise RecordError("unreadable", source.path, f"cannot read the array: {err}", source.record_id) from err
    array = array[row] if row is not None else array
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise RecordError("unreadable", source.path, f"expected a numeric [leads, samples] array, got shape "
                                                     f"{array.shape} of {array.dtype}", source.record_id)
    if array.shape[0] != len(leads) and array.shape[1] == len(leads):
        array = array.T
    if array.shape[0] != len(leads):
        raise RecordError("lead_count", source.path, f"shape {array.shape} has no axis of the {len(leads)} "
                                                     f"--leads {' '.join(leads)}", source.record_id)
    return array.astype(np.float32), float(sampling_rate), list(leads)


class RecordPreparer:
    """A listed record -> ``(model input [channels, n_samples], signal, rate, lead names)``, or its
    RecordError: the checks name the reason, then the model's recorded preprocessing runs."""

    def __init__(self, cfg: Dict, sampling_rate: Optional[float] = None, leads: Optional[Sequence[str]] = None):
        self.preprocess = ECGPreprocess(cfg, train=False)
        self.min_seconds = float(cfg["seconds"])  # the model never saw shorter windows
        self.sampling_rate, self.leads = sampling_rate, leads

    def __call__(self, source: Source):
        try:
            if source.defect is not None:
                raise source.defect
            signal, rate, names = load_source(source, self.sampling_rate, self.leads)
            self.check(signal, rate, names, source)
            return self.preprocess(signal, rate, names), signal, rate, names
        except RecordError as err:
            return err

    def check(self, signal: np.ndarray, rate: float, names: Sequence[str], source: Source) -> None:
        def fail(reason, detail):
            raise RecordError(reason, source.path, detail, source.record_id)

        if sampling_rate_problem(rate):
            fail("sampling_rate", sampling_rate_problem(rate))
        try:
            used = signal[lead_indices(names, self.preprocess.leads)]
        except ValueError as err:
            fail("missing_leads", f"the model takes {' '.join(self.preprocess.leads)}: {err}")
        if not np.isfinite(used).all():
            bad = [self.preprocess.leads[i] for i in np.flatnonzero(~np.isfinite(used).all(axis=1))]
            fail("non_finite", f"NaN or infinite samples in lead(s) {', '.join(bad)}")
        seconds = signal.shape[-1] / rate
        if seconds < self.min_seconds:
            fail("too_short", f"{seconds:g} s, shorter than the {self.min_seconds:g} s the model was trained on")


class _Records(torch.utils.data.Dataset):
    def __init__(self, sources: Sequence[Source], prepare: RecordPreparer):
        self.sources, self.prepare = sources, prepare

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, index):
        return index, self.prepare(self.sources[index])


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def classify_records(model, findings: Findings, sources: Sequence[Source], prepare: RecordPreparer,
                     batch_size: int = 64, workers: int = 0, on_record=None, on_skip=None):
    """Probabilities ``[n readable, n findings]`` and the readable sources, in input order; records are
    read by `workers` processes and go through the model `batch_size` at a time. ``on_record(source,
    probabilities, signal, rate, leads)`` and ``on_skip(error)`` are called as they come."""
    loader = torch.utils.data.DataLoader(_Records(sources, prepare), batch_size=batch_size, num_workers=workers,
                                         collate_fn=list)
    rows, kept = [], []
    with tqdm(total=len(sources), desc="classify", unit="ECG", disable=None) as bar:
        for batch in loader:
            ready = [(i, item) for i, item in batch if not isinstance(item, RecordError)]
            for _, item in batch:
                if isinstance(item, RecordError) and on_skip:
                    on_skip(item)
            if ready:
                embeddings = encode_ecg(model, torch.stack([item[0] for _, item in ready]), batch_size=batch_size)
                with torch.no_grad():
                    probabilities = findings.scorer.scores(embeddings).cpu().numpy().astype(np.float64)
                for (i, (_, signal, rate, names)), p in zip(ready, probabilities):
                    rows.append(p)
                    kept.append(sources[i])
                    if on_record:
                        on_record(sources[i], p, signal, rate, names)
            bar.update(len(batch))
    return (np.stack(rows) if rows else np.zeros((0, len(findings.codes)))), kept


def top_findings(findings: Findings, probabilities: np.ndarray, k: int = TOP) -> str:
    """``'NORM 0.91 [+], SR 0.80 [+], LVH 0.12'``: the `k` most probable, [+] where decided positive."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return ", ".join(f"{findings.codes[j]} {probabilities[j]:.2f}{' [+]' if probabilities[j] >= findings.thresholds[j] else ''}"
                     for j in order)


def plot_name(record_id: str) -> str:
    """A file name for a record id (path separators and odd characters become '_')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", record_id).strip("._") or "record"


def write_predictions(out_dir: str, findings: Findings, sources: Sequence[Source], probabilities: np.ndarray,
                      skipped: Sequence[RecordError], about: Dict) -> Dict[str, str]:
    """predictions.csv and predictions.json (same records, same probabilities), atomically."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in ("predictions.csv", "predictions.json")}
    codes = findings.codes
    records = []
    for source, p in zip(sources, probabilities):
        positive = [c for c, value, t in zip(codes, p, findings.thresholds) if value >= t]
        records.append({"record": source.record_id, "path": source.path, "positive": positive,
                        "probabilities": {c: float(v) for c, v in zip(codes, p)}})
    write_csv_atomic(paths["predictions.csv"], ["record", "path", "positive", *codes],
                     [{"record": r["record"], "path": r["path"], "positive": ";".join(r["positive"]),
                       **{c: f"{v:.6f}" for c, v in r["probabilities"].items()}} for r in records])
    write_json_atomic(paths["predictions.json"], {
        **about,
        "findings": [{"code": c, "name": findings.names[c], "threshold": float(t)}
                     for c, t in zip(codes, findings.thresholds)],
        "thresholds": findings.thresholds_about,
        "scoring": findings.scorer.describe(),
        "counts": {"records": len(records) + len(skipped), "classified": len(records), "skipped": len(skipped),
                   "skipped_by_reason": dict(Counter(e.reason for e in skipped))},
        "records": records,
        "skipped": [{"record": e.record_id, "path": e.path, "reason": e.reason, "detail": e.detail} for e in skipped],
    }, indent=2)
    return paths


def lead_names(text: str) -> List[str]:
    """``--leads``: a lead set name of :data:`open_clip_ecg.leads.LEAD_SETS` or comma-separated names."""
    return list(LEAD_SETS[text]) if text in LEAD_SETS else [name.strip() for name in text.split(",") if name.strip()]


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="WFDB records (.hea), folders of them (recursive), .npy/.npz arrays (with "
                             "--sampling-rate and --leads) or CSV/JSONL indexes (path, report, labels columns)")
    parser.add_argument("--out", required=True, help="output folder: predictions.csv, predictions.json, plots")
    parser.add_argument("--findings", nargs="+", default=None, metavar="NAME",
                        help="findings to score, in English (e.g. 'atrial fibrillation'); default: the model's "
                             "training vocabulary. Put it after the INPUTs, or end it with --")
    parser.add_argument("--prompts", default=None,
                        help="prompt JSON: its findings are scored with its names and templates")
    parser.add_argument("--task", default="labels", choices=TASKS,
                        help="label set scored when no --findings/--prompts: the training vocabulary (labels, "
                             "default) or a benchmark task's labels (e.g. ptbxl-super)")
    parser.add_argument("--decisions", default=None,
                        help=f"a {DECISIONS_FILE} of scoring rules and validation thresholds (default: the one "
                             "beside an exported model)")
    parser.add_argument("--sampling-rate", type=float, default=None, help="sampling rate of .npy/.npz inputs (Hz)")
    parser.add_argument("--leads", type=lead_names, default=None,
                        help="lead names of .npy/.npz inputs in array order, comma-separated (I,II,III,aVR,...), "
                             "or 12 for the standard order I,II,III,aVR,aVL,aVF,V1,...,V6")
    parser.add_argument("--plot", action="store_true", help="one 12-lead PNG per record, titled with its top findings")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="processes reading records (default 0: this one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args) -> int:
    sources = list_sources(args.inputs)
    if any(s.kind == "array" for s in sources) and (args.sampling_rate is None or not args.leads):
        raise ValueError("arrays (.npy/.npz) carry no sampling rate or lead names: give --sampling-rate and --leads")
    model, tokenizer = load_model_from_args(args, device=args.device)
    cfg = model.ecg_preprocess
    if cfg is None:
        raise ValueError(f"{args.model} ({args.pretrained}) records no ECG preprocessing (it predates it): "
                         "retrain it, or evaluate it on shards")
    if getattr(model, "logit_bias", None) is None:
        raise ValueError("zero-shot probabilities need a SigLIP-trained model with a logit_bias")
    findings = choose_findings(model, tokenizer, cfg, read_decisions(args.model, args.decisions), args.task,
                               args.findings, args.prompts, args.batch_size)
    skipped: List[RecordError] = []

    def on_skip(err: RecordError) -> None:
        skipped.append(err)
        tqdm.write(f"skipped {err}", file=sys.stderr)

    def on_record(source, probabilities, signal, rate, names) -> None:
        summary = top_findings(findings, probabilities)
        tqdm.write(f"{source.record_id}: {summary}")
        if args.plot:
            from .ecg_plot import plot_12lead

            plot_12lead(signal, rate, names, os.path.join(args.out, plot_name(source.record_id) + ".png"),
                        title=f"{source.record_id}: {summary}", subtitle=f"{source.path} | {thresholds_line(findings)}")

    os.makedirs(args.out, exist_ok=True)
    probabilities, kept = classify_records(model, findings, sources, RecordPreparer(cfg, args.sampling_rate, args.leads),
                                           args.batch_size, args.workers, on_record, on_skip)
    about = {"model": args.model, "pretrained": args.pretrained, "inputs": list(args.inputs)}
    paths = write_predictions(args.out, findings, kept, probabilities, skipped, about)
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(Counter(e.reason for e in skipped).items()))
    print(f"{len(kept)} record(s) classified, {len(skipped)} skipped{f' ({reasons})' if skipped else ''}; "
          f"{thresholds_line(findings)}; wrote {paths['predictions.csv']} and {paths['predictions.json']}"
          + (f" and {len(kept)} plot(s)" if args.plot else ""))
    if not kept:
        print(f"open-clip-ecg classify: no readable record in {' '.join(args.inputs)}", file=sys.stderr)
        return 1
    return 0


def thresholds_line(findings: Findings) -> str:
    about = findings.thresholds_about
    if about["source"] == "fixed":
        return "decisions at 0.5 (no validation thresholds apply)"
    return f"decisions at the thresholds chosen on validation data ({about.get('chosen_on')})"
