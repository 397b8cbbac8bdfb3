"""`open-clip-ecg quickstart`: records -> shards -> open_clip training -> zero-shot report.

The whole method on a laptop in minutes: synthetic 12-lead ECGs (the embedded default) or a real
collection (``--data ptbxl:PATH``, ``cinc:PATH``, ``csv:PATH``) are written as shards, a model is
trained through open_clip's own loop (:mod:`open_clip_ecg.train`) with the Jaccard SigLIP loss,
and evaluated zero-shot on the held-out test split. Everything evaluation chooses is chosen on the
val split, as in the PTB-XL study: per task, the checkpoint (training keeps one every quarter of the
epochs) and the zero-shot scoring rules with the best val macro AUROC
(:func:`open_clip_ecg.evaluate.choose_on_validation`; ``--choose last``: the last checkpoint with
the source's default rules), then per-label thresholds. Each stage is the same code the individual
subcommands run.

At the end the model is handed over: one checkpoint is exported to ``OUT/model`` (``local-dir:``
layout, :mod:`open_clip_ecg.export`) with ``classify.json`` beside it (per task, the scoring rules
and the validation thresholds of that checkpoint; :mod:`open_clip_ecg.classify`), and the
``classify`` command to run next is printed. Tasks may choose different epochs; one model must
answer all of them, so the exported epoch is the one with the best mean val macro AUROC over the
tasks, each task under its best rules for that epoch (:func:`exported_checkpoint`; ties: the later
epoch). It is chosen on val like everything else; a task that chose another epoch is answered by the
exported one with its own best rules and thresholds for it, so ``classify`` reproduces the test
probabilities of every task whose chosen epoch is the exported one (always, with one task).
"""
from __future__ import annotations

import glob
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from .scoring import ScoringRules


# Per source: how the shards are written, how the model trains and what is evaluated.
@dataclass(frozen=True)
class SourceDefaults:
    text: str              # --text of the shard writer
    reader_options: Dict   # reader keyword arguments
    split_by: Optional[str]
    tasks: Tuple[str, ...]  # evaluation tasks
    train_flags: Tuple[str, ...] = ()  # extra training flags
    rules: ScoringRules = field(default_factory=ScoringRules)  # with --choose last, or no val AUROC
    epochs: int = 20         # --epochs unless given
    crop_seconds: float = 8.0  # --crop-seconds unless given
    model: str = "ECG-RN18-CLIPText"  # --model unless given


# PTB-XL: the settings that won on fold 7 of ptbxl-2k (scripts/ptbxl_zeroshot_study.py; README):
# all 71 statements as labels, texts sampled per step from the German report and the English
# finding names, and every ECG paired with each finding's text in every step with membership
# targets (--ecg-finding-texts contains: fold-7 mean macro AUROC 0.718 -> 0.794), plus one text per
# superclass and multi-statement subclass (--ecg-finding-groups ptbxl-super ptbxl-sub: 0.794 -> 0.805),
# with the finding-text term weighted 4x against the report pairs (--ecg-finding-weight 4: 0.805 ->
# 0.807; the rate findings fit their own training ECGs better) and each finding text's log-odds
# added to its training logits (--ecg-finding-prior: 0.807 -> 0.815, rhythm 0.778 -> 0.818), on the
# tower that also takes the RR channels (ECG-RN18-RR-CLIPText: 0.815 -> 0.852, rhythm 0.818 -> 0.905).
# As in the study, each task's epoch and scoring rules are chosen on the val split
# (--choose per-task); the rules below (English names only, superclasses/subclasses as the
# noisy-OR of their statements) are what --choose last and tasks without a val AUROC use.
# (An 'auto' bias with a 10x logit step made the scale and bias move but did not rank better on
# fold 7, so the quickstart keeps its -4 bias.)
PTBXL_TRAIN_FLAGS = ("--ecg-text", "sampled", "--ecg-finding-texts", "contains",
                     "--ecg-finding-groups", "ptbxl-super", "ptbxl-sub", "--ecg-finding-weight", "4",
                     "--ecg-finding-prior")
PTBXL_RULES = ScoringRules(names="name", aggregate="noisy-or", scoring="sigmoid")
PTBXL_TASKS = ("ptbxl-super", "ptbxl-sub", "ptbxl-rhythm", "ptbxl-form")

SOURCES = {
    # the varied report plus the canonical finding sentence: ties synonyms to the prompt names
    "synthetic": SourceDefaults("both", {}, "patient", ("labels",)),
    # the study's 24-epoch schedule and 5 s crops (8 s crops: fold-7 mean 0.800 against 0.805)
    "ptbxl": SourceDefaults("both", {"sampling_rate": 100, "label_level": "all"}, "fold", PTBXL_TASKS,
                            PTBXL_TRAIN_FLAGS, PTBXL_RULES, epochs=24, crop_seconds=5.0, model="ECG-RN18-RR-CLIPText"),
    # Challenge records carry no report: the text is composed from the SNOMED finding names
    "cinc": SourceDefaults("labels", {}, "patient", ("labels",)),
    "csv": SourceDefaults("report", {}, None, ("labels",)),
}

# --choose: each task's checkpoint and scoring rules chosen on val, or the last with the source's rules
CHOICES = ("per-task", "last")


def fold_split(reader) -> Tuple[Tuple[int], Tuple[int]]:
    """(val folds, test folds): PTB-XL's recommended 9 and 10, or the last two folds present."""
    folds = sorted({entry.fold for entry in reader.entries() if entry.fold is not None})
    if {9, 10} <= set(folds):
        return (9,), (10,)
    if len(folds) < 3:
        raise ValueError(f"a fold split needs at least 3 folds, the data has {folds}")
    return (folds[-2],), (folds[-1],)


def _stage(number: int, title: str) -> float:
    print(f"\n[{number}/4] {title}", file=sys.stderr, flush=True)
    return time.perf_counter()


def _done(start: float) -> None:
    print(f"      done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def save_frequency(epochs: int) -> int:
    """Training keeps a checkpoint every this many epochs (a quarter of the run), and the last."""
    return max(1, epochs // 4)


def saved_epochs(epochs: int) -> List[int]:
    """The epochs whose checkpoints training keeps: the training lengths validation chooses from."""
    return [epoch for epoch in range(1, epochs + 1) if epoch % save_frequency(epochs) == 0 or epoch == epochs]


def _choice_line(task: str, choice, epoch: int) -> str:
    """What stage 4 says of a task's choice: epoch, rules and their val macro AUROC."""
    rules = ", ".join(f"{what} {value}" for what, value in asdict(choice.rules).items())
    auroc = "n/a" if choice.val_macro_auroc is None else f"{choice.val_macro_auroc:.3f}"
    note = f"; {choice.note}" if choice.note else ""
    return f"      {task}: epoch {epoch}, {rules} (val macro AUROC {auroc}{note})"


def exported_checkpoint(candidates: List[Dict], last: str) -> str:
    """The checkpoint with the best mean val macro AUROC over the tasks, each task under its best
    rules for that checkpoint (ties: the later checkpoint); `last` when no AUROC is defined."""
    best: Dict[Tuple[str, str], float] = {}
    for row in candidates:
        if row["val_macro_auroc"] is not None:
            key = (row["checkpoint"], row["task"])
            best[key] = max(best.get(key, row["val_macro_auroc"]), row["val_macro_auroc"])
    means: Dict[str, List[float]] = {}
    for (checkpoint, _), auroc in best.items():
        means.setdefault(checkpoint, []).append(auroc)
    chosen, score = last, None
    for checkpoint, values in means.items():  # candidate order: training order
        mean = sum(values) / len(values)
        if score is None or mean >= score:
            chosen, score = checkpoint, mean
    return chosen


def rules_for_checkpoint(candidates: List[Dict], checkpoint: str, task: str, fallback: ScoringRules) -> ScoringRules:
    """The task's best scoring rules at `checkpoint` on val (the first of equals), else `fallback`."""
    rows = [r for r in candidates if r["checkpoint"] == checkpoint and r["task"] == task
            and r["val_macro_auroc"] is not None]
    if not rows:
        return fallback
    best = max(rows, key=lambda row: row["val_macro_auroc"])
    return ScoringRules(best["names"], best["aggregate"], best["scoring"])


def export_for_classify(model: str, checkpoint: str, epoch: int, tasks: Dict[str, ScoringRules], shard_dir: str,
                        out_dir: str, why: str) -> str:
    """Export `checkpoint` to `out_dir` with ``classify.json``: per task its rules and the max-F1
    thresholds of this checkpoint on the val split (as evaluate chooses them)."""
    from .classify import decisions_on_validation, write_decisions
    from .export import export_model
    from .factory import load_model

    export_model(model, checkpoint, out_dir)
    trained, tokenizer = load_model(model, checkpoint)
    decisions = decisions_on_validation(trained, tokenizer, shard_dir, "val", tasks)
    write_decisions(out_dir, decisions, {"model": model, "checkpoint": os.path.basename(checkpoint), "epoch": epoch,
                                         "why": why})
    return out_dir


def classify_inputs(fmt: str, path: str, sampling_rate: float) -> str:
    """What the printed classify command reads: the collection's records as classify takes them."""
    if fmt == "ptbxl":
        return os.path.join(path, "records100" if sampling_rate <= 100 else "records500")
    return path


def parse_data_spec(spec: Optional[str]):
    """'ptbxl:PATH' -> ('ptbxl', PATH); None -> ('synthetic', None)."""
    if spec is None:
        return "synthetic", None
    fmt, sep, path = spec.partition(":")
    if not sep or fmt not in SOURCES or fmt == "synthetic" or not path:
        raise ValueError(f"--data {spec!r}: expected ptbxl:PATH, cinc:PATH or csv:PATH")
    if not os.path.exists(path):
        raise ValueError(f"--data {spec!r}: {path} does not exist")
    return fmt, path


def default_precision() -> str:
    """amp_bf16 on GPUs and on CPUs with native bfloat16 (about 2x faster there), else fp32."""
    import torch

    from .compat import cpu_has_bf16

    if torch.cuda.is_available() or cpu_has_bf16():
        return "amp_bf16"
    return "fp32"


def run_quickstart(out: str, data: Optional[str] = None, n_records: int = 2000, epochs: Optional[int] = None,
                   batch_size: int = 64, model: Optional[str] = None, sampling_rate: float = 100,
                   lr: float = 1e-3, seed: int = 0, workers: int = 2, bootstrap: int = 1000,
                   text: Optional[str] = None, precision: Optional[str] = None,
                   init_logit_bias: float = -4.0, crop_seconds: Optional[float] = None,
                   choose: str = "per-task") -> Dict[str, str]:
    """Run the four stages into `out`; returns the paths of what was written.

    `choose`: ``per-task`` (each task's checkpoint and scoring rules chosen on the val split) or
    ``last`` (the last checkpoint with the source's default rules). `epochs`, `crop_seconds` and
    `model` default to the source's (:data:`SOURCES`).

    Re-running with the same `out` completes an interrupted run: records and shards are rewritten
    identically and training resumes from its latest checkpoint (``--resume latest``).
    """
    from .atomic import write_csv_atomic
    from .data.readers import get_reader
    from .data.shard_writer import ShardOptions, write_shards
    from .data.synthetic import write_synthetic_dataset
    from .evaluate import TaskChoice, choose_on_validation, evaluate_zeroshot
    from .factory import load_model
    from .reporting import headline_line, results_table, write_report
    from .train import main as train_main

    if choose not in CHOICES:
        raise ValueError(f"choose={choose!r}: expected one of {', '.join(CHOICES)}")
    fmt, path = parse_data_spec(data)
    defaults = SOURCES[fmt]
    text = text or defaults.text
    epochs = defaults.epochs if epochs is None else epochs
    model = model or defaults.model
    crop_seconds = defaults.crop_seconds if crop_seconds is None else crop_seconds
    precision = precision or default_precision()
    os.makedirs(out, exist_ok=True)

    start = _stage(1, "records" + (f": {n_records} synthetic ECGs" if fmt == "synthetic" else f": {fmt} at {path}"))
    if fmt == "synthetic":
        path = str(write_synthetic_dataset(os.path.join(out, "records"), n=n_records, seed=seed,
                                           workers=workers))
        fmt = "csv"
    _done(start)

    start = _stage(2, f"shards at {sampling_rate:g} Hz (text: {text})")
    shard_dir = os.path.join(out, "shards")
    reader_options = {k: v for k, v in defaults.reader_options.items() if k != "sampling_rate"}
    if "sampling_rate" in defaults.reader_options:  # PTB-XL: read the stored rate closest to the target
        reader_options["sampling_rate"] = 100 if sampling_rate <= 100 else 500
    reader = get_reader(fmt, path, **reader_options)
    val_folds, test_folds = fold_split(reader) if defaults.split_by == "fold" else ((9,), (10,))
    manifest = write_shards(reader, shard_dir, ShardOptions(
        sampling_rate=sampling_rate, seconds=10, split_by=defaults.split_by, text=text,
        val_folds=val_folds, test_folds=test_folds,
        shard_size=max(16, n_records // 16) if data is None else 128, workers=workers, seed=seed,
        beats=True))  # the RR models' loaders read the stored beats instead of detecting them
    counts = manifest["counts"]
    print(f"      {counts}", file=sys.stderr)
    for split in ("train", "val", "test"):
        if not glob.glob(os.path.join(shard_dir, f"{split}-*.tar")):
            raise ValueError(f"no {split} records in {shard_dir}: the collection is too small to split")
    _done(start)

    start = _stage(3, f"training {model} for {epochs} epoch(s) with open_clip's loop (Jaccard SigLIP, {precision})")
    logs = os.path.join(out, "logs")
    run_name = "quickstart"
    train_workers = min(workers, len(glob.glob(os.path.join(shard_dir, "train-*.tar"))))
    status = train_main([
        "--model", model, "--train-data", os.path.join(shard_dir, "train-*.tar"),
        "--val-data", os.path.join(shard_dir, "val-*.tar"), "--batch-size", str(batch_size),
        "--epochs", str(epochs), "--lr", str(lr), "--precision", precision, "--warmup", "10", "--wd", "0.05",
        "--workers", str(train_workers), "--logs", logs, "--name", run_name, "--seed", str(seed),
        "--save-frequency", str(save_frequency(epochs)),
        "--zeroshot-frequency", str(epochs), "--val-frequency", str(epochs), "--report-to", "tensorboard",
        "--resume", "latest", "--log-every-n-steps", "20", "--ecg-init-logit-bias", str(init_logit_bias),
        "--ecg-seconds", str(crop_seconds), *defaults.train_flags])
    if status != 0:
        raise RuntimeError(f"training failed; see {os.path.join(logs, run_name, 'out.log')}")
    checkpoints = {epoch: os.path.join(logs, run_name, "checkpoints", f"epoch_{epoch}.pt")
                   for epoch in saved_epochs(epochs)}
    epoch_of = {checkpoint: epoch for epoch, checkpoint in checkpoints.items()}
    _done(start)

    chosen = ("each task's epoch and scoring rules chosen on val" if choose == "per-task"
              else f"epoch {epochs} with the default scoring rules")
    start = _stage(4, f"zero-shot evaluation on the held-out test split ({chosen}; thresholds from val)")
    choice_table = os.path.join(out, "report", "choice_on_val.csv")
    if choose == "per-task":
        choices, candidates = choose_on_validation(model, list(checkpoints.values()), shard_dir, "val",
                                                   defaults.tasks, fallback_rules=defaults.rules)
        rows = [{"task": row["task"], "epoch": epoch_of[row["checkpoint"]], **row} for row in candidates]
        os.makedirs(os.path.dirname(choice_table), exist_ok=True)
        write_csv_atomic(choice_table, list(rows[0]), rows)  # one row per task x epoch x rules
    else:
        choices = {task: TaskChoice(checkpoints[epochs], defaults.rules, None, None,
                                    "--choose last: the last checkpoint with the default rules")
                   for task in defaults.tasks}
        if os.path.exists(choice_table):  # an earlier per-task run's table would contradict this report
            os.remove(choice_table)
    loaded, results, paths = {}, [], {}
    for task in defaults.tasks:
        choice = choices[task]
        print(_choice_line(task, choice, epoch_of[choice.checkpoint]), file=sys.stderr)
        if choice.checkpoint not in loaded:
            loaded[choice.checkpoint] = load_model(model, choice.checkpoint)
        trained, tokenizer = loaded[choice.checkpoint]
        result = evaluate_zeroshot(trained, tokenizer, shard_dir, task, split="test", val_data=shard_dir,
                                   val_split="val", n_bootstrap=bootstrap, seed=seed, rules=choice.rules,
                                   about={"model": model, "pretrained": choice.checkpoint,
                                          "choice": {**choice.describe(), "epoch": epoch_of[choice.checkpoint]}})
        report_dir = os.path.join(out, "report") if len(defaults.tasks) == 1 else os.path.join(out, "report", task)
        task_paths = write_report(result, report_dir)
        paths = paths or task_paths  # the first task's report is the one listed below
        results.append(result)
    if choose == "per-task":
        exported = exported_checkpoint(candidates, checkpoints[epochs])
        why = ("the epoch with the best mean val macro AUROC over the tasks" if len(defaults.tasks) > 1
               else f"the epoch chosen on val for {defaults.tasks[0]}")
        task_rules = {task: choices[task].rules if choices[task].checkpoint == exported
                      else rules_for_checkpoint(candidates, exported, task, defaults.rules) for task in defaults.tasks}
    else:
        exported, why = checkpoints[epochs], "--choose last: the last epoch"
        task_rules = {task: defaults.rules for task in defaults.tasks}
    task_rules.setdefault("labels", defaults.rules)  # classify's default findings: the training vocabulary
    model_dir = export_for_classify(model, exported, epoch_of[exported], task_rules, shard_dir,
                                    os.path.join(out, "model"), why)
    print(f"      exported epoch {epoch_of[exported]} ({why}) with its val thresholds to {model_dir}", file=sys.stderr)
    _done(start)
    print()
    for result in results:
        print(headline_line(result))
    if len(results) > 1:
        print("\n" + results_table(results))
    paths = {"shards": shard_dir, "checkpoint": checkpoints[epochs], "model": model_dir,
             "training_log": os.path.join(logs, run_name, "out.log"),
             **({"choice_on_val": choice_table} if choose == "per-task" else {}), **paths}
    for name, p in paths.items():
        print(f"{name:>14}: {p}")
    records = classify_inputs(fmt, path, sampling_rate)
    print(f"\nnext: zero-shot findings for ECG files (add --plot for 12-lead PNGs; see docs/classify.md):\n"
          f"  open-clip-ecg classify --model local-dir:{model_dir} --out {os.path.join(out, 'findings')} {records}")
    return paths


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="quickstart", help="output folder (default ./quickstart)")
    parser.add_argument("--data", default=None, metavar="FORMAT:PATH",
                        help="a real collection instead of synthetic ECGs: ptbxl:PATH, cinc:PATH or csv:PATH")
    parser.add_argument("--n", type=int, default=2000, help="synthetic records (default 2000)")
    parser.add_argument("--epochs", type=int, default=None, help="default 20; PTB-XL 24 (the study's schedule)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default=None,
                        help="default ECG-RN18-CLIPText; PTB-XL ECG-RN18-RR-CLIPText (the fold-7 winner)")
    parser.add_argument("--sampling-rate", type=float, default=100,
                        help="shard sampling rate (default 100 Hz: fast on CPUs)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--crop-seconds", type=float, default=None,
                        help="random training crop of the 10 s records (default 8; PTB-XL 5, the fold-7 winner)")
    parser.add_argument("--init-logit-bias", type=float, default=-4.0,
                        help="initial SigLIP bias (default -4: small batches, see --ecg-init-logit-bias)")
    parser.add_argument("--text", choices=("report", "labels", "both"), default=None,
                        help="shard text (default: per source, see SOURCES)")
    parser.add_argument("--precision", default=None, help="training precision (default: amp_bf16 where "
                        "the CPU/GPU has bfloat16, else fp32)")
    parser.add_argument("--choose", choices=CHOICES, default="per-task",
                        help="per-task (default): each task's epoch (checkpoints every quarter of the run) and "
                             "zero-shot scoring rules with the best val macro AUROC; last: the last epoch with "
                             "the source's default rules")


def run(args) -> int:
    run_quickstart(args.out, data=args.data, n_records=args.n, epochs=args.epochs, batch_size=args.batch_size,
                   model=args.model, sampling_rate=args.sampling_rate, lr=args.lr, seed=args.seed,
                   workers=args.workers, bootstrap=args.bootstrap, text=args.text, precision=args.precision,
                   init_logit_bias=args.init_logit_bias, crop_seconds=args.crop_seconds, choose=args.choose)
    return 0
