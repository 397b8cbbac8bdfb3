"""The ECG shard loaders open_clip_train reads (``get_dataset_fn`` seam), and what training measures
on the training shards before it starts: texts longer than the text context, and the initial logit
bias of ``--ecg-init-logit-bias auto``."""
from __future__ import annotations

import itertools
import logging
from typing import Dict, Optional

import numpy as np
import torch

from ..data.manifest import check_validation_shards, read_shard_info
from ..data.pipeline import ECGSamplePreparer, expand_shards, iterate_samples, make_train_loader, make_val_loader
from ..data.text import TrainingTextSampler, compose_label_text, token_count, truncation_counts
from ..embed import crop_length
from ..leads import LEAD_SETS
from ..loss import mean_pair_target
from ..model_preprocess import training_preprocess_cfg


def _shard_info_for(args, is_train: bool) -> Dict:
    """Shard info for the train or val shards; val must fit the training ones (vocabulary, rate)."""
    shards = expand_shards(args.train_data if is_train else args.val_data)
    info = read_shard_info(shards)
    key = "train" if is_train else "val"
    args.ecg_shard_info = getattr(args, "ecg_shard_info", {})
    args.ecg_shard_info[key] = info
    if {"train", "val"} <= args.ecg_shard_info.keys():
        check_validation_shards(args.ecg_shard_info["train"], args.ecg_shard_info["val"])
    return info


def get_ecg_dataset(args, preprocess_fn, is_train, epoch=0, tokenizer=None):
    """open_clip_train dataset factory for ECG shards (replaces images with ECG crops)."""
    ecg = args.ecg
    info = _shard_info_for(args, is_train)
    n_samples = (crop_length(info, ecg.ecg_seconds, "--ecg-seconds") if is_train
                 else crop_length(info, ecg.ecg_eval_seconds, "--ecg-eval-seconds"))
    preparer = ECGSamplePreparer(
        n_samples, len(info["vocabulary"]), train=is_train, leads=LEAD_SETS[ecg.ecg_leads],
        normalize=ecg.ecg_normalize,
        amplitude_scale=ecg.ecg_amplitude_scale if is_train else None,
        lead_dropout=ecg.ecg_lead_dropout if is_train else 0.0, sampling_rate=info["sampling_rate"])
    if is_train:  # what the checkpoints record (.checkpoint)
        ecg.preprocess_cfg = training_preprocess_cfg(args.model, ecg, info)
        names = [v["name"] for v in info["vocabulary"]]
        text_sampler = (TrainingTextSampler(names, ecg.ecg_text_weights) if ecg.ecg_text == "sampled" else None)
        if not hasattr(args, "ecg_truncation"):
            log_text_truncation(args, tokenizer, text_sampler)
        return make_train_loader(
            args.train_data, tokenizer=tokenizer, preparer=preparer, batch_size=args.batch_size,
            workers=args.workers, world_size=args.world_size, seed=args.seed, epoch=epoch,
            resampled=args.dataset_resampled, num_samples=args.train_num_samples, text_sampler=text_sampler)
    return make_val_loader(args.val_data, tokenizer=tokenizer, preparer=preparer,
                           batch_size=args.batch_size, workers=args.workers)


def current_preprocess_cfg(args) -> Optional[Dict]:
    """The ECG preprocessing this run's checkpoints will record (None without --train-data)."""
    if not args.train_data:
        return None
    return training_preprocess_cfg(args.model, args.ecg, read_shard_info(expand_shards(args.train_data)))


TRUNCATION_SAMPLE = 2000  # training texts checked against the context length before training


def log_text_truncation(args, tokenizer, text_sampler: Optional[TrainingTextSampler]) -> Dict[str, int]:
    """Count (and log) training texts longer than the text tower's context, on up to
    TRUNCATION_SAMPLE samples of the train shards: the stored texts, or with `text_sampler` its
    longest kind (findings, then the report). Kept in ``args.ecg_truncation``."""
    names = [v["name"] for v in args.ecg_shard_info["train"]["vocabulary"]]
    if token_count(tokenizer, "") is None:
        args.ecg_truncation = {}
        logging.info("Text truncation: not counted (texts come from a text-embedding cache, which cut them "
                     "to the text model's context when it was built)")
        return {}

    def texts():
        for sample in itertools.islice(iterate_samples(args.train_data), TRUNCATION_SAMPLE):
            ids = sample["label_ids"]
            findings = compose_label_text(names[i] for i in ids) if ids else ""
            if text_sampler is None:
                yield sample["text"], (findings if findings in sample["text"] else "")
            else:
                yield " ".join(p for p in (findings, sample["meta"].get("report") or "") if p), findings

    counts = truncation_counts(tokenizer, texts())
    args.ecg_truncation = counts
    logging.info(f"Text truncation: {counts['truncated']} of {counts['texts']} training texts exceed the "
                 f"{counts['context_length']}-token context (the report's end is cut); the findings "
                 f"sentence itself is cut in {counts['findings_cut']}")
    if counts["findings_cut"]:
        logging.warning(f"{counts['findings_cut']} findings sentences are longer than the text context: "
                        "use a text tower with a longer context")
    return counts


AUTO_BIAS_SAMPLE = 5000  # training label sets read to choose --ecg-init-logit-bias auto


def auto_logit_bias(train_data, targets: str, batch_size: int) -> float:
    """logit(mean pair target) of training batches, from up to AUTO_BIAS_SAMPLE samples' labels."""
    shards = expand_shards(train_data)
    n_labels = len(read_shard_info(shards)["vocabulary"])
    rows = []
    for sample in itertools.islice(iterate_samples(shards), AUTO_BIAS_SAMPLE):
        row = torch.zeros(n_labels)
        row[sample["label_ids"]] = 1.0
        rows.append(row)
    if len(rows) < 2:
        raise ValueError(f"--ecg-init-logit-bias auto needs at least 2 training samples in {train_data!r}")
    target = min(max(mean_pair_target(torch.stack(rows), targets, batch_size), 1e-4), 1 - 1e-4)
    return float(np.log(target / (1 - target)))
