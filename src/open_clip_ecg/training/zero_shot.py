"""Multi-label zero-shot validation during training (the ``zero_shot_eval`` seam)."""
from __future__ import annotations

import logging
from typing import Dict

import numpy as np
import torch

from .. import compat
from ..data.pipeline import unpack_text_and_labels
from ..scoring import ScoringRules, TaskScorer
from ..tasks import get_task


def ecg_zero_shot_eval(model, data, epoch, args, tokenizer=None) -> Dict[str, float]:
    """Multi-label zero-shot metrics on the val shards: macro AUROC and micro-F1 at 0.5.

    Scores come from the scorer of ``open-clip-ecg evaluate`` (its default rules, task ``labels``
    on the val shards' vocabulary), so the two agree on the same checkpoint and shards."""
    from ..metrics import DEFAULT_THRESHOLD, headline_metrics, label_status

    if "val" not in data or args.zeroshot_frequency == 0:
        return {}
    if (epoch % args.zeroshot_frequency) != 0 and epoch != args.epochs:
        return {}
    if args.distributed and not args.horovod:
        model = model.module
    vocabulary = args.ecg_shard_info["val"]["vocabulary"]
    device = torch.device(args.device)
    autocast = compat.GET_AUTOCAST.get()(args.precision, device_type=device.type)
    embeddings, targets = [], []
    with torch.inference_mode(), autocast():
        scorer = TaskScorer(model, tokenizer, get_task("labels", vocabulary=vocabulary), ScoringRules(),
                            vocabulary=vocabulary)
        for ecg, packed in data["val"].dataloader:
            embeddings.append(model.encode_image(ecg.to(device), normalize=True).float())
            targets.append(unpack_text_and_labels(packed).labels)
    with torch.inference_mode():  # probabilities in float32, outside autocast
        probs = scorer.scores(torch.cat(embeddings))
    y_true, y_score = torch.cat(targets).numpy(), probs.cpu().numpy()
    summary = headline_metrics(y_true, y_score, np.full(y_true.shape[1], DEFAULT_THRESHOLD))
    n_scored = sum(status == "ok" for status in label_status(y_true))
    macro_auroc = summary["macro_auroc"] if summary["macro_auroc"] is not None else float("nan")
    logging.info(f"Zero-shot (epoch {epoch}): macro AUROC {macro_auroc:.4f} over {n_scored} "
                 f"labels with positives and negatives, micro-F1@0.5 {summary['micro_f1']:.4f}")
    return {
        "zeroshot-macro-auroc": macro_auroc,
        "zeroshot-micro-f1": summary["micro_f1"],
        "zeroshot-labels-scored": float(n_scored),
    }
