"""Supervised baseline: the same 1D-ResNet-18 ECG tower trained with BCE on the task's labels.

    open-clip-ecg train-supervised --task ptbxl-super --train-data shards/ --train-split train \\
        --data shards/ --split test --val-data shards/ --val-split val --out supervised/

The paper's baseline: ``timm.create_model('ecg_resnet1d18', num_classes=n_labels)`` (the tower the
contrastive model uses, with a linear head), one sigmoid per label, ``BCEWithLogitsLoss``. Targets
are the task's (:mod:`open_clip_ecg.tasks`), derived exactly as in evaluation, so all methods are
scored on the same labels. Training records the task does not evaluate (e.g. no rhythm statement
for ``ptbxl-rhythm``) are masked out of the loss, as the PTB-XL benchmark drops them.

Choices (the paper gives none): AdamW (lr 1e-3, weight decay 1e-2), cosine schedule over all
steps, batch 64, 20 epochs; a random crop of ``--seconds`` for training and its centre crop for
evaluation (default: the whole stored record). With ``--val-data`` the epoch with the best
validation macro AUROC is kept and thresholds are chosen there; without it the last epoch and 0.5.
The checkpoint (``supervised.pt``, atomic) holds only tensors and plain values, so it loads with
``torch.load(weights_only=True)`` (:func:`load_supervised`). Scoring and the report are the
zero-shot evaluation's (:func:`open_clip_ecg.scoring.summarize` / :func:`open_clip_ecg.reporting.write_report`).
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Dict, Optional, Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F

from .data.manifest import read_shard_info
from .data.pipeline import ECGSamplePreparer, make_epoch_loader
from .atomic import write_atomic
from .embed import crop_length, map_shards, model_leads, resolve_shards
from .metrics import macro_auroc
from .model_preprocess import check_shards_fit
from .reporting import headline_line, write_report
from .scoring import (
    EvaluationResult,
    add_evaluation_arguments,
    aggregate_probabilities,
    check_disjoint,
    choose_thresholds,
    describe_shards,
    labelled_scores,
    resolve_task,
    summarize,
)
from .tasks import Task, member_indices

_LOGGER = logging.getLogger(__name__)
CHECKPOINT_NAME = "supervised.pt"


class TaskTargets:
    """The supervised baseline's prepare stage (:mod:`open_clip_ecg.data.pipeline`): decoded sample ->
    (ecg [leads, T] randomly cropped, the task's targets [n_labels], 1.0 when the task evaluates the
    record else 0.0). A class so loader workers can pickle it."""

    def __init__(self, task: Task, preparer: ECGSamplePreparer):
        self.task, self.preparer = task, preparer

    def __call__(self, sample: Dict):
        y, keep = self.task.multi_hot([sample["label_codes"]], [sample["meta"]], [sample["key"]])
        return (self.preparer.ecg(sample), torch.from_numpy(y[0].astype(np.float32)),
                torch.tensor(float(keep[0])))


def _collate_examples(examples):
    ecgs, targets, evaluated = zip(*examples)
    return torch.stack(ecgs), torch.stack(targets), torch.stack(evaluated)


def create_supervised_model(arch: str, n_labels: int) -> torch.nn.Module:
    """The ECG tower with a linear head of `n_labels` outputs."""
    return timm.create_model(arch, num_classes=n_labels)


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, ecg: torch.Tensor) -> torch.Tensor:
    model.eval()
    parameter = next(model.parameters())
    return torch.sigmoid(model(ecg.to(parameter.device, parameter.dtype)))


def predict_supervised(model, shards, trained: Dict, batch_size: int, workers: int):
    """(probabilities ``[N, n_labels]``, records) of the model on `shards`, cropped to
    ``trained["n_samples"]``; shards at another rate than ``trained["sampling_rate"]`` (the model's) are refused."""
    check_shards_fit(trained, read_shard_info(shards))
    return map_shards(lambda ecg: predict_probabilities(model, ecg), shards, trained["n_samples"],
                      model_leads(model), batch_size, workers, desc="predict",
                      sampling_rate=trained["sampling_rate"])


def score_supervised(model, task: Task, shards, spec: str, trained: Dict, batch_size: int, workers: int):
    """The model's probabilities on `shards` beside `task`'s targets (the task it was trained for)."""
    probabilities, records = predict_supervised(model, shards, trained, batch_size, workers)
    return labelled_scores(task, records, probabilities, spec)


def answer_from_statements(task: Task, statement_codes: Sequence[str], probabilities: np.ndarray, records, spec: str,
                           aggregate: str = "noisy-or"):
    """A model trained on statements (e.g. ``--task ptbxl-all``) answering a coarser `task`: each label
    is the `aggregate` of its member statements' probabilities, the rule zero-shot scoring uses
    (:func:`open_clip_ecg.scoring.aggregate_probabilities`), so one model for every finding can be
    compared with one model for every task."""
    members = member_indices(task, statement_codes)
    missing = [label.code for label, ids in zip(task.labels, members) if not ids]
    if missing:
        raise ValueError(f"task {task.name!r}: labels {missing} have no member among the model's "
                         f"{len(statement_codes)} labels; train it on the statements the task groups (e.g. ptbxl-all)")
    answered = aggregate_probabilities(torch.as_tensor(probabilities, dtype=torch.float64), members, aggregate)
    return labelled_scores(task, records, answered.numpy(), spec)


def save_supervised(path: str, model: torch.nn.Module, about: Dict) -> None:
    """Atomic checkpoint: ``{'state_dict', **about}`` (tensors and plain values only)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_atomic(path, lambda tmp: torch.save({"state_dict": state, **about}, tmp))


def load_supervised(path: str, device="cpu"):
    """(model, checkpoint dict) from :func:`save_supervised`'s file, loaded with weights_only=True."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not {"arch", "codes", "state_dict"} <= set(checkpoint):
        raise ValueError(f"{path} is not a train-supervised checkpoint (needs 'arch', 'codes', 'state_dict')")
    model = create_supervised_model(checkpoint["arch"], len(checkpoint["codes"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), checkpoint


def train_supervised(task, train_data, *, train_split: Optional[str] = None, val_data=None,
                     val_split: Optional[str] = None, arch: str = "ecg_resnet1d18", epochs: int = 20,
                     lr: float = 1e-3, weight_decay: float = 1e-2, batch_size: int = 64,
                     seconds: Optional[float] = None, workers: int = 0, seed: int = 0, device="cpu",
                     checkpoint_path: Optional[str] = None):
    """Train the supervised baseline; returns (model, about dict, validation LabelledScores or None)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    torch.manual_seed(seed)
    train_shards = resolve_shards(train_data, train_split)
    task = resolve_task(task, train_shards)
    info = read_shard_info(train_shards)
    n_samples = crop_length(info, seconds)
    crop = {"n_samples": n_samples, "sampling_rate": info["sampling_rate"]}
    model = create_supervised_model(arch, len(task.labels)).to(device)
    preparer = ECGSamplePreparer(n_samples, len(task.labels), train=True, leads=model_leads(model),
                                   sampling_rate=info["sampling_rate"])
    data = make_epoch_loader(train_shards, TaskTargets(task, preparer), _collate_examples, batch_size=batch_size,
                             workers=workers, seed=seed)
    steps = epochs * data.dataloader.num_batches
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    val_shards = resolve_shards(val_data, val_split) if val_data is not None else None
    val_spec = describe_shards(val_data, val_split) if val_data is not None else None
    if val_shards is not None:  # refused now rather than after the first epoch
        check_shards_fit(crop, read_shard_info(val_shards))
    best = {"auroc": -np.inf, "epoch": epochs, "state": None, "validation": None}
    for epoch in range(epochs):
        model.train()
        data.set_epoch(epoch)
        losses = []
        for ecg, targets, evaluated in data.dataloader:
            targets, evaluated = targets.to(device), evaluated.to(device)
            if not evaluated.any():
                continue
            logits = model(ecg.to(device))
            loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)
            loss = (loss * evaluated).sum() / evaluated.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        message = f"epoch {epoch + 1}/{epochs}: train BCE {np.mean(losses) if losses else float('nan'):.4f}"
        if val_shards is not None:
            validation = score_supervised(model, task, val_shards, val_spec, crop, batch_size, workers)
            auroc = macro_auroc(validation.y_true, validation.y_score)
            message += f", val macro AUROC {auroc if auroc is not None else float('nan'):.4f}"
            if auroc is not None and auroc > best["auroc"]:
                best = {"auroc": auroc, "epoch": epoch + 1, "state": copy.deepcopy(model.state_dict()),
                        "validation": validation}
        _LOGGER.info(message)
        print(message, flush=True)
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    about = {"arch": arch, "task": task.name, "codes": task.codes, "epoch": best["epoch"], "epochs": epochs,
             "selected_on": f"validation macro AUROC ({val_spec})" if best["state"] is not None else "last epoch",
             "train_data": describe_shards(train_data, train_split), **crop, "leads": model_leads(model), "lr": lr,
             "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed}
    if checkpoint_path:
        save_supervised(checkpoint_path, model, about)
    return model, about, best["validation"]


def evaluate_supervised(model, about: Dict, data, *, split: Optional[str] = None, validation=None,
                        batch_size: int = 64, workers: int = 0, n_bootstrap: int = 1000,
                        seed: int = 0) -> EvaluationResult:
    """Score a trained supervised model on `data` with thresholds from `validation` (None: 0.5)."""
    shards = resolve_shards(data, split)
    task = resolve_task(about["task"], shards)
    if task.codes != list(about["codes"]):
        raise ValueError(f"the model was trained for labels {about['codes']} but task {task.name!r} "
                         f"on {data!r} has {task.codes}")
    evaluated = score_supervised(model, task, shards, describe_shards(data, split), about, batch_size, workers)
    if validation is not None:
        check_disjoint(evaluated, validation)
    thresholds, threshold_info = choose_thresholds(task.codes, validation)
    return summarize(task, "supervised", evaluated, thresholds, threshold_info, n_bootstrap, seed,
                     about={"model": about["arch"], "training": {k: v for k, v in about.items() if k != "codes"}})


def add_arguments(parser) -> None:
    parser.add_argument("--train-data", required=True, help="training shards (spec, or folder with --train-split)")
    parser.add_argument("--train-split", default=None, help="split of --train-data when it is a folder")
    add_evaluation_arguments(parser)
    parser.add_argument("--arch", default="ecg_resnet1d18", help="timm ECG tower (default: ecg_resnet1d18)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)


def run(args) -> int:
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    model, about, validation = train_supervised(
        args.task, args.train_data, train_split=args.train_split, val_data=args.val_data, val_split=args.val_split,
        arch=args.arch, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
        seconds=args.seconds, workers=args.workers, seed=args.seed, device=args.device,
        checkpoint_path=os.path.join(args.out, CHECKPOINT_NAME))
    result = evaluate_supervised(model, about, args.data, split=args.split, validation=validation,
                                 batch_size=args.batch_size, workers=args.workers, n_bootstrap=args.bootstrap,
                                 seed=args.seed)
    write_report(result, args.out)
    print(headline_line(result))
    print(f"checkpoint: {os.path.join(args.out, CHECKPOINT_NAME)}; report: {os.path.join(args.out, 'report.md')}")
    return 0
