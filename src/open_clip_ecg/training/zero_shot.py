"""Multi-label validation during training (the ``zero_shot_eval`` seam): zero-shot classification
and ECG<->text retrieval where every text sharing the ECG's findings counts as a match."""
from __future__ import annotations

import logging
from typing import Dict

import numpy as np
import torch

from .. import compat
from ..data.pipeline import unpack_text_and_labels
from ..scoring import ScoringRules, TaskScorer
from ..tasks import get_task

# relevance levels of the retrieval metrics: name in the logged keys -> minimum Jaccard of finding sets
RETRIEVAL_RELEVANCE = {"same_findings": 1.0, "jaccard50": 0.5}


def finding_retrieval(ecg: torch.Tensor, text: torch.Tensor, ecg_labels: torch.Tensor,
                      text_labels: torch.Tensor) -> Dict[str, float]:
    """ECG->text and text->ECG mAP and R@k of normalised embeddings under each relevance of
    :data:`RETRIEVAL_RELEVANCE` (text labels: the findings the text states). open_clip's
    ``image_to_text_R@k`` beside them counts the paired text only."""
    from ..metrics import multilabel_retrieval

    similarity = (ecg @ text.T).numpy()
    ecg_labels, text_labels = ecg_labels.numpy(), text_labels.numpy()
    out = {}
    for name, level in RETRIEVAL_RELEVANCE.items():
        for direction, scores, queries, items in (("ecg_to_text", similarity, ecg_labels, text_labels),
                                                  ("text_to_ecg", similarity.T, text_labels, ecg_labels)):
            for metric, value in multilabel_retrieval(scores, queries, items, level).items():
                out[f"{direction}_{metric}_{name}"] = value
    return out


def ecg_zero_shot_eval(model, data, epoch, args, tokenizer=None) -> Dict[str, float]:
    """Multi-label zero-shot metrics on the val shards (macro AUROC, micro-F1 at 0.5) and the
    retrieval metrics of :func:`finding_retrieval`.

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
    embeddings, targets, texts, text_targets = [], [], [], []
    with torch.inference_mode(), autocast():
        scorer = TaskScorer(model, tokenizer, get_task("labels", vocabulary=vocabulary), ScoringRules(),
                            vocabulary=vocabulary)
        for ecg, packed in data["val"].dataloader:
            unpacked = unpack_text_and_labels(packed)
            embeddings.append(model.encode_image(ecg.to(device), normalize=True).float())
            texts.append(model.encode_text(unpacked.tokens.to(device), normalize=True).float().cpu())
            targets.append(unpacked.labels)
            text_targets.append(unpacked.text_labels)
    with torch.inference_mode():  # probabilities in float32, outside autocast
        probs = scorer.scores(torch.cat(embeddings))
    y_true, y_score = torch.cat(targets).numpy(), probs.cpu().numpy()
    summary = headline_metrics(y_true, y_score, np.full(y_true.shape[1], DEFAULT_THRESHOLD))
    n_scored = sum(status == "ok" for status in label_status(y_true))
    macro_auroc = summary["macro_auroc"] if summary["macro_auroc"] is not None else float("nan")
    logging.info(f"Zero-shot (epoch {epoch}): macro AUROC {macro_auroc:.4f} over {n_scored} "
                 f"labels with positives and negatives, micro-F1@0.5 {summary['micro_f1']:.4f}")
    retrieval = finding_retrieval(torch.cat(embeddings).cpu(), torch.cat(texts), torch.cat(targets),
                                  torch.cat(text_targets))
    same, half = (f"ecg_to_text_{{}}_{name}".format for name in RETRIEVAL_RELEVANCE)
    logging.info(f"Retrieval (epoch {epoch}), every text with the ECG's finding set relevant: ECG->text mAP "
                 f"{retrieval[same('mAP')]:.4f}, R@1 {retrieval[same('R@1')]:.4f}; every text with Jaccard >= 0.5: "
                 f"mAP {retrieval[half('mAP')]:.4f}, R@1 {retrieval[half('R@1')]:.4f}")
    return {
        "zeroshot-macro-auroc": macro_auroc,
        "zeroshot-micro-f1": summary["micro_f1"],
        "zeroshot-labels-scored": float(n_scored),
        **retrieval,
    }
