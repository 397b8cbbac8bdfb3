"""Train ECG-text models with open_clip's own loop: ``python -m open_clip_ecg.train [flags]``.

Every open_clip_train flag keeps its meaning (precision, --accum-freq, --resume, logs,
tensorboard, schedules, locking, torchrun DDP); ``--ecg-*`` flags add what ECGs need. This module
is the *only* place that drives open_clip_train. For the duration of one run it swaps a few names
that open_clip_train looks up at call time (the seams of :mod:`open_clip_ecg.compat`, installed by
:func:`open_clip_seams`):

=========================================== ==================================================
seam                                        why
=========================================== ==================================================
``open_clip_train.main.parse_args``         add ``--ecg-*`` options, force SigLIP, reject flags
                                            that cannot work with ECGs, fp32 default on CPU
``open_clip_train.main.create_model_and_…`` give the model a forward that unpacks the labels
                                            carried with the text and returns them as
                                            ``labels`` (accumulation caches them like features),
                                            plus the embedded ``--ecg-finding-texts`` (groups too),
                                            and a lock_image_tower that also freezes
                                            BatchNorm1d (open_clip's only freezes 2-D)
``open_clip_train.main.create_loss``        MultiLabelSigLipLoss (Jaccard targets by default)
``open_clip_train.main.torch``              only ``torch.save`` (atomic, records the ECG
                                            preprocessing with each checkpoint, removes
                                            temporaries of killed saves) and
                                            ``torch.nn.parallel.DistributedDataParallel``
                                            (accepts CPU modules: upstream passes
                                            ``device_ids=[cpu]``, which torch rejects); every
                                            other attribute is torch's (``compat.module_view``)
``open_clip_train.data.get_dataset_fn``     ECG shard loaders instead of image loaders
``open_clip_train.train.zero_shot_eval``    multi-label zero-shot metrics on the val shards,
                                            scored as ``open-clip-ecg evaluate`` scores them
=========================================== ==================================================

Why labels ride inside the text tensor: the loop does ``images, texts = batch`` and calls
``loss(**model_out)``, so the only per-sample channel from loader to loss is the batch itself.
Packing the multi-hot labels into each text row (:mod:`open_clip_ecg.data.pipeline`) keeps them
aligned through ``.to(device)``, DDP and ``--accum-freq`` caches; a fingerprint taken when the
sample is read is checked on every forward (the label-alignment contract).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import logging
import os
import sys
import types
from typing import Dict, List, Optional

import numpy as np
import open_clip
import torch

from . import compat
from .atomic import remove_stale_temps, write_atomic
from .data.text import (
    SAMPLED_TEXT_KINDS,
    FindingTexts,
    TrainingTextSampler,
    compose_label_text,
    token_count,
    truncation_counts,
)
from .data.pipeline import (
    ECGSamplePreparer,
    expand_shards,
    fingerprint,
    iterate_samples,
    make_train_loader,
    make_val_loader,
    unpack_text_and_labels,
)
from .data.manifest import read_shard_info
from .embed import crop_length
from .factory import raise_if_checkpoint_does_not_fit
from .leads import LEAD_SETS
from .loss import FINDING_TARGETS, TARGET_MODES, MultiLabelSigLipLoss, mean_pair_target
from .model_preprocess import ECG_PREPROCESS_KEY, training_preprocess_cfg
from .registry import list_ecg_models, pair_text_model
from .scoring import ScoringRules, TaskScorer
from .tasks import TASKS, finding_groups, get_task
from .towers import lock_image_tower

# Flags of open_clip_train that cannot work with ECG towers, and what to do instead. Each must be
# one of open_clip_train's own flags (checked on every run and in tests/test_compat.py), so a flag
# renamed upstream fails loudly instead of silently no longer being checked.
REJECTED_FLAGS = {
    "imagenet_val": "ImageNet zero-shot needs images; ECG zero-shot runs on --val-data shards",
    "imagenet_v2": "ImageNet zero-shot needs images; ECG zero-shot runs on --val-data shards",
    "horovod": "open_clip's SigLIP loss does not support horovod; use torchrun",
    "force_patch_dropout": "patch dropout is for image ViTs; use --ecg-lead-dropout",
    "distill_model": "distillation is not supported for ECG models",
    "trace": "tracing builds an image input; train without --trace",
    "torchscript": "TorchScript is not supported for ECG towers",
    "pretrained_image": "no pretrained ECG tower weights are shipped; use --pretrained CKPT",
    "local_loss": "--local-loss is a ClipLoss option; the ECG loss is SigLIP",
    "gather_with_grad": "--gather-with-grad is a ClipLoss option; use --loss-dist-impl",
    "aug_cfg": "image augmentations do not apply; use --ecg-amplitude-scale/--ecg-lead-dropout",
    "force_image_size": "ECG towers take any length; use --ecg-seconds",
    "image_mean": "ECG normalisation is --ecg-normalize",
    "image_std": "ECG normalisation is --ecg-normalize",
}
PURE_PRECISIONS = {"bf16", "fp16", "pure_bf16", "pure_fp16"}


class LabelAlignmentError(RuntimeError):
    """The labels in a batch are not those of the batch's texts."""


# --------------------------------------------------------------------------------------------
# --ecg-* options
# --------------------------------------------------------------------------------------------

def ecg_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("ECG options (open_clip_ecg)")
    group.add_argument("--ecg-targets", choices=TARGET_MODES, default="jaccard",
                       help="SigLIP pair targets: Jaccard of finding sets (default), identity "
                            "(plain SigLIP) or exact label-set match")
    group.add_argument("--ecg-seconds", type=float, default=5.0,
                       help="length of the random training crop in seconds (default 5; the paper's "
                            "crop length is unknown)")
    group.add_argument("--ecg-eval-seconds", type=float, default=None,
                       help="centre crop for validation/zero-shot (default: the whole stored record)")
    group.add_argument("--ecg-leads", choices=sorted(LEAD_SETS), default=None,
                       help="lead set fed to the model (default: what the model's tower expects)")
    group.add_argument("--ecg-normalize", choices=("center", "zscore", "none"), default="center",
                       help="per-lead normalisation (default center: subtract the mean, keep mV "
                            "so voltage criteria survive)")
    group.add_argument("--ecg-amplitude-scale", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                       help="random amplitude scaling range for training")
    group.add_argument("--ecg-lead-dropout", type=float, default=0.0,
                       help="probability of zeroing each lead during training")
    group.add_argument("--ecg-text", choices=("stored", "sampled"), default="stored",
                       help="training text: the shards' stored text, or one composed afresh per sample "
                            "and step from the report and the finding names (see --ecg-text-weights)")
    group.add_argument("--ecg-text-weights", type=float, nargs=len(SAMPLED_TEXT_KINDS),
                       default=(0.25, 0.25, 0.25, 0.25), metavar=tuple(k.upper() for k in SAMPLED_TEXT_KINDS),
                       help="--ecg-text sampled: how often each kind of text is drawn: the report, all "
                            "findings in random order, a random subset of the findings, findings then "
                            "report (default 0.25 each)")
    group.add_argument("--ecg-finding-texts", choices=("off", *FINDING_TARGETS), default="off",
                       help="also pair every ECG with one text per vocabulary finding ('an ECG showing "
                            "{finding}.') in every step, with Jaccard targets (1/|findings| when the ECG "
                            "has it) or 'contains' targets (1 when it has it); default off")
    group.add_argument("--ecg-finding-groups", nargs="+", default=[], metavar="TASK",
                       choices=[task for task in TASKS if task != "labels"],
                       help="with --ecg-finding-texts: also one text per label of these tasks that groups "
                            "several vocabulary findings (e.g. ptbxl-super: 'conduction disturbance' is "
                            "present when any of 1AVB, CLBBB, ... is), so coarse questions are trained in "
                            "their own words")
    group.add_argument("--ecg-finding-weight", type=float, default=1.0,
                       help="with --ecg-finding-texts: weight of the finding-text term against the report "
                            "pairs' (default 1)")
    group.add_argument("--ecg-finding-prior", action="store_true",
                       help="with --ecg-finding-texts: add each finding text's log-odds (its share of the "
                            "training ECGs seen so far, centred) to its training logits, so a rare "
                            "finding's text need not point away from normal ECGs (logit adjustment); "
                            "prompts are scored without it")
    group.add_argument("--ecg-init-logit-bias", type=_bias_value, default=-10.0,
                       help="initial SigLIP logit bias: a number (default -10, SigLIP's; it assumes huge "
                            "batches where nearly every pair is negative) or 'auto': logit of the mean pair "
                            "target of training batches under --ecg-targets, measured on the train shards' "
                            "labels (the bias a model with uninformative features would learn)")
    group.add_argument("--ecg-init-logit-scale", type=float, default=10.0,
                       help="initial SigLIP logit scale (multiplier; default 10, SigLIP's)")
    group.add_argument("--ecg-logit-lr-mult", type=float, default=1.0,
                       help="each optimizer step moves the logit scale and bias this many times as far as "
                            "the optimizer would (default 1); on small data they otherwise barely move")
    group.add_argument("--ecg-text-model", default=None, metavar="HF_FOLDER",
                       help="pair the --model's ECG tower with this local Hugging Face text model "
                            "(BERT-like encoder or decoder LLM: Qwen3, Llama, Gemma, Mistral, ...)")
    group.add_argument("--ecg-text-cache", default=None, metavar="CACHE",
                       help="frozen LLM text: read its embeddings from this `open-clip-ecg text-cache` "
                            "folder instead of running it (only the projection head trains)")
    return parser


def _bias_value(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _tower_lead_set(model_name: str) -> str:
    """The lead set ('12', '6', '1', or '12+rr': the 12 leads and the RR channels) the model config's
    ECG tower is built for."""
    import timm

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown model {model_name!r}; ECG models: {list_ecg_models()}")
    tower = cfg["vision_cfg"].get("timm_model_name")
    if not tower:
        raise ValueError(f"model {model_name!r} has no timm ECG tower; ECG models: {list_ecg_models()}")
    n_leads = timm.models.get_pretrained_cfg(tower).input_size[0]
    for name, leads in LEAD_SETS.items():
        if len(leads) == n_leads:
            return name
    raise ValueError(f"tower {tower} expects {n_leads} leads, which is no known lead set")


def check_open_clip_args(args: argparse.Namespace) -> None:
    """Reject flags that cannot work with ECG models, with what to use instead."""
    unknown = [flag for flag in REJECTED_FLAGS if not hasattr(args, flag)]
    if unknown:
        raise compat.UpstreamChanged(
            f"open_clip_ecg rejects {', '.join('--' + f.replace('_', '-') for f in unknown)}, which open_clip_train "
            f"(open_clip_torch {compat.installed_version('open_clip_torch')}) no longer has; supported: "
            f"open_clip_torch {compat.SUPPORTED['open_clip_torch']} (update REJECTED_FLAGS in open_clip_ecg.train)")
    problems = []
    for flag, advice in REJECTED_FLAGS.items():
        value = getattr(args, flag, None)
        if value not in (None, False, 0, "", [], {}):
            problems.append(f"--{flag.replace('_', '-')}: {advice}")
    if args.precision in PURE_PRECISIONS:
        problems.append(f"--precision {args.precision} casts the logit scale/bias to low precision and "
                        "freezes them; use amp_bf16 (GPU), amp or fp32")
    if "coca" in args.model.lower():
        problems.append("CoCa models need an image decoder; use an ECG-* model")
    if args.dataset_type not in ("auto", "webdataset"):
        problems.append(f"--dataset-type {args.dataset_type}: ECG training reads open-clip-ecg shards")
    llm_text = "ecg_text_tower" in (open_clip.get_model_config(args.model) or {}).get("text_cfg", {})
    if (args.lock_text and args.lock_text_unlocked_layers > 0 and args.model.lower().find("cliptext") < 0
            and not llm_text):  # decoder LLM towers unlock their last blocks themselves
        problems.append("--lock-text-unlocked-layers > 0 fails for BERT-family HF towers in open_clip "
                        "3.3 (KeyError 'layer_attr'); lock the whole text tower or none")
    if problems:
        raise ValueError("flags that cannot work with ECG training:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------------------------
# The model's label-carrying forward
# --------------------------------------------------------------------------------------------

def check_label_alignment(tokens: torch.Tensor, labels: torch.Tensor, text_labels: torch.Tensor,
                          carried: torch.Tensor) -> None:
    """Raise LabelAlignmentError if any row's labels are not the ones read with its text."""
    mismatch = fingerprint(tokens, labels, text_labels) != carried
    if bool(mismatch.any()):
        rows = mismatch.nonzero().flatten().tolist()
        raise LabelAlignmentError(
            f"labels of {len(rows)}/{len(carried)} samples in this batch do not belong to their text "
            f"(rows {rows[:8]}): the data pipeline paired labels with the wrong samples")


class FindingTextTokens:
    """The tokens of this step's finding texts (:class:`~open_clip_ecg.data.text.FindingTexts`)."""

    def __init__(self, finding_texts: FindingTexts, tokenizer):
        self.finding_texts, self.tokenizer = finding_texts, tokenizer

    def __call__(self) -> torch.Tensor:
        return self.tokenizer(self.finding_texts())


def _labelled_forward(self, image=None, text=None, finding_tokens: Optional[FindingTextTokens] = None):
    """CLIP.forward for packed text rows: returns the batch's ECG and text labels with the features,
    and with `finding_tokens` the embedded finding texts of this step (``finding_features``)."""
    if text is None:
        return type(self).forward(self, image, None)
    packed = unpack_text_and_labels(text)
    check_label_alignment(packed.tokens, packed.labels, packed.text_labels, packed.fingerprint)
    out = type(self).forward(self, image, packed.tokens)
    out["labels"], out["text_labels"] = packed.labels, packed.text_labels
    if finding_tokens is not None and image is not None and self.training:  # only the loss uses them
        # inside forward, so DDP sees the text tower's use and --accum-freq caches them like features
        out["finding_features"] = self.encode_text(finding_tokens().to(packed.tokens.device), normalize=True)
    return out


def enable_label_passing(model: torch.nn.Module,
                         finding_tokens: Optional[FindingTextTokens] = None) -> torch.nn.Module:
    """Make `model` accept packed (labels + tokens) text rows (and embed the finding texts with
    each batch when given); weights and state_dict unchanged."""
    forward = functools.partial(_labelled_forward, finding_tokens=finding_tokens)
    model.forward = types.MethodType(forward, model)
    return model


def finding_text_tokens(args) -> Optional[FindingTextTokens]:
    """--ecg-finding-texts: the training vocabulary's finding texts, tokenized for `args.model`."""
    if args.ecg.ecg_finding_texts == "off":
        if args.ecg.ecg_finding_groups:
            raise ValueError("--ecg-finding-groups adds finding texts: use it with --ecg-finding-texts contains|jaccard")
        if args.ecg.ecg_finding_weight != 1.0:
            raise ValueError("--ecg-finding-weight weighs the finding texts: use it with --ecg-finding-texts contains|jaccard")
        if args.ecg.ecg_finding_prior:
            raise ValueError("--ecg-finding-prior offsets the finding texts' logits: use it with "
                             "--ecg-finding-texts contains|jaccard")
        return None
    if not args.ecg.ecg_finding_weight > 0:
        raise ValueError(f"--ecg-finding-weight must be > 0, got {args.ecg.ecg_finding_weight}")
    if not args.train_data:
        raise ValueError("--ecg-finding-texts reads the finding names of the --train-data vocabulary")
    vocabulary = read_shard_info(expand_shards(args.train_data))["vocabulary"]
    groups = finding_groups(args.ecg.ecg_finding_groups, [v["code"] for v in vocabulary])
    finding_texts = FindingTexts([v["name"] for v in vocabulary], groups)
    return FindingTextTokens(finding_texts, open_clip.get_tokenizer(args.model, cache_dir=args.cache_dir))


def _lock_image_tower_1d(self, unlocked_groups=0, freeze_bn_stats=False):
    """open_clip's lock_image_tower with BatchNorm1d statistics frozen too when asked."""
    lock_image_tower(self, unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_bn_stats)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def _shard_info_for(args, is_train: bool) -> Dict:
    """Shard info for the train or val shards; val must share the training vocabulary."""
    shards = expand_shards(args.train_data if is_train else args.val_data)
    info = read_shard_info(shards)
    key = "train" if is_train else "val"
    args.ecg_shard_info = getattr(args, "ecg_shard_info", {})
    args.ecg_shard_info[key] = info
    other = args.ecg_shard_info.get("val" if is_train else "train")
    if other is not None:
        codes = [v["code"] for v in info["vocabulary"]]
        if codes != [v["code"] for v in other["vocabulary"]]:
            raise ValueError(f"the label vocabularies of {info['directory']} and {other['directory']} "
                             "differ; write train and val shards in one `open-clip-ecg shards` run")
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
    if is_train:  # what the checkpoints record (see _torch_for_main)
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


class LogitStepAmplifier:
    """Makes every optimizer step move the logit scale and bias `mult` times as far.

    open_clip_train builds its optimizer inside ``main()`` and its LR schedules overwrite every
    param group's learning rate, so a group with its own LR cannot be added from outside. torch's
    global optimizer step hooks can: before a step they note the two parameters, after it they
    stretch the step. Works with any optimizer, schedule and --accum-freq.
    """

    def __init__(self, mult: float):
        self.mult, self.params, self.before, self.handles = mult, [], [], []

    def watch(self, model: torch.nn.Module) -> None:
        self.params = [p for name, p in model.named_parameters() if name in ("logit_scale", "logit_bias")]

    def _pre(self, optimizer, *_):
        self.before = [p.detach().clone() for p in self.params]

    def _post(self, optimizer, *_):
        with torch.no_grad():
            for p, old in zip(self.params, self.before):
                p.add_((p - old) * (self.mult - 1))

    def __enter__(self):
        if self.mult != 1:
            from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
            self.handles = [register_optimizer_step_pre_hook(self._pre), register_optimizer_step_post_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _ecg_dataset_fn(data_path, dataset_type):
    return get_ecg_dataset


# --------------------------------------------------------------------------------------------
# Zero-shot validation
# --------------------------------------------------------------------------------------------

def ecg_zero_shot_eval(model, data, epoch, args, tokenizer=None) -> Dict[str, float]:
    """Multi-label zero-shot metrics on the val shards: macro AUROC and micro-F1 at 0.5.

    Scores come from the scorer of ``open-clip-ecg evaluate`` (its default rules, task ``labels``
    on the val shards' vocabulary), so the two agree on the same checkpoint and shards."""
    from .metrics import DEFAULT_THRESHOLD, headline_metrics, label_status

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


# --------------------------------------------------------------------------------------------
# torch as open_clip_train.main sees it: atomic saves, CPU-capable DDP
# --------------------------------------------------------------------------------------------

def atomic_torch_save(obj, path, *args, **kwargs) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a truncated checkpoint, and
    temporaries that killed saves left in the folder are removed."""
    remove_stale_temps(os.path.dirname(os.path.abspath(path)))
    write_atomic(path, lambda tmp: torch.save(obj, tmp, *args, **kwargs))


def _checkpoint_saver(ecg_options: argparse.Namespace):
    """torch.save for open_clip_train.main: its checkpoint dicts carry the ECG preprocessing."""
    def save(obj, path, *args, **kwargs):
        preprocess_cfg = getattr(ecg_options, "preprocess_cfg", None)
        if isinstance(obj, dict) and "state_dict" in obj and preprocess_cfg is not None:
            obj = {**obj, ECG_PREPROCESS_KEY: preprocess_cfg}
        atomic_torch_save(obj, path, *args, **kwargs)
    return save


class CPUCapableDistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """DDP that drops ``device_ids`` for CPU modules (torch requires None there; upstream passes
    ``[device]``), so torchrun with gloo on CPUs works."""

    def __init__(self, module, device_ids=None, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids=device_ids, **kwargs)


def _torch_for_main(ecg_options: argparse.Namespace) -> types.ModuleType:
    """torch as open_clip_train.main sees it: its checkpoint saves and its DDP replaced, nothing else
    (``compat.module_view`` explains why the seam is main's name ``torch``)."""
    return compat.module_view(torch, {"save": _checkpoint_saver(ecg_options),
                                      "nn.parallel.DistributedDataParallel": CPUCapableDistributedDataParallel})


# --------------------------------------------------------------------------------------------
# The seams and the entry point
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def open_clip_seams(ecg_options: argparse.Namespace, argv: List[str]):
    """Install the ECG seams into open_clip_train for one run; restore them afterwards."""
    upstream_parse_args = compat.PARSE_ARGS.get()
    upstream_create_model = compat.CREATE_MODEL_AND_TRANSFORMS.get()
    amplifier = LogitStepAmplifier(ecg_options.ecg_logit_lr_mult)
    finding_tokens: Optional[FindingTextTokens] = None  # --ecg-finding-texts, set by parse_args

    def parse_args(raw_args):
        args = upstream_parse_args(raw_args)
        for composed, flag in ((ecg_options.ecg_text == "sampled", "--ecg-text sampled"),
                               (ecg_options.ecg_finding_texts != "off", "--ecg-finding-texts")):
            if composed and ecg_options.ecg_text_cache:
                raise ValueError(f"{flag} composes new texts every step, which a text-embedding cache cannot "
                                 "hold: use --ecg-text stored and no --ecg-finding-texts with --ecg-text-cache")
        if ecg_options.ecg_logit_lr_mult <= 0:
            raise ValueError(f"--ecg-logit-lr-mult must be > 0, got {ecg_options.ecg_logit_lr_mult}")
        args.model = pair_text_model(args.model, ecg_options.ecg_text_model, ecg_options.ecg_text_cache)
        check_open_clip_args(args)
        if given_flags(argv, "--precision").precision is None and not torch.cuda.is_available():
            args.precision = "fp32"  # open_clip's default 'amp' is float16 autocast: slow on CPUs
        args.siglip = True  # the logit bias exists only with --siglip
        tower_leads = _tower_lead_set(args.model)
        if ecg_options.ecg_leads not in (None, tower_leads):
            raise ValueError(f"--ecg-leads {ecg_options.ecg_leads} but {args.model} takes {tower_leads} lead(s)")
        ecg_options.ecg_leads = tower_leads
        if ecg_options.ecg_init_logit_bias == "auto":
            if not args.train_data:
                raise ValueError("--ecg-init-logit-bias auto reads the --train-data labels; give a number instead")
            # the loss pairs each rank's ECGs with the texts of all ranks: the global batch counts
            world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
            ecg_options.ecg_init_logit_bias = auto_logit_bias(args.train_data, ecg_options.ecg_targets,
                                                              args.batch_size * world_size)
        args.ecg = ecg_options
        nonlocal finding_tokens
        finding_tokens = finding_text_tokens(args)
        return args

    def create_model_and_transforms(*args, **kwargs):
        # initial values only: --resume and --pretrained weights replace them
        kwargs["init_logit_bias"] = ecg_options.ecg_init_logit_bias
        kwargs["init_logit_scale"] = float(np.log(ecg_options.ecg_init_logit_scale))
        try:
            model, preprocess_train, preprocess_val = upstream_create_model(*args, **kwargs)
        except Exception as err:  # --pretrained of another model, or not a checkpoint: one line, exit 2
            name, pretrained = (list(args) + [None, None])[:2]
            name, pretrained = kwargs.get("model_name", name), kwargs.get("pretrained", pretrained)
            if pretrained:
                raise_if_checkpoint_does_not_fit(name, pretrained, err)
            raise
        amplifier.watch(model)
        model.lock_image_tower = types.MethodType(_lock_image_tower_1d, model)  # main calls it for --lock-image
        return enable_label_passing(model, finding_tokens), preprocess_train, preprocess_val

    def create_loss(args):
        # model_out keys (image/text features, logit scale/bias, labels, finding features) are its keywords
        finding_targets = None if args.ecg.ecg_finding_texts == "off" else args.ecg.ecg_finding_texts
        if finding_targets:
            finding_texts = finding_tokens.finding_texts
            logging.info(f"Finding texts: every ECG also meets {len(finding_texts)} finding texts per step "
                         f"({len(finding_texts) - finding_texts.n_findings} of them groups), {finding_targets} targets, "
                         f"weight {args.ecg.ecg_finding_weight:g}"
                         + (", log-odds offsets (--ecg-finding-prior)" if args.ecg.ecg_finding_prior else ""))
            for name, reason in finding_texts.skipped:
                logging.info(f"--ecg-finding-groups: no text for {name!r}: {reason}")
        return MultiLabelSigLipLoss(
            targets=args.ecg.ecg_targets, rank=args.rank, world_size=args.world_size, dist_impl=args.loss_dist_impl,
            finding_targets=finding_targets,
            finding_members=finding_tokens.finding_texts.members() if finding_targets else None,
            finding_weight=args.ecg.ecg_finding_weight, finding_prior=args.ecg.ecg_finding_prior)

    replacements = [
        (compat.PARSE_ARGS, parse_args),
        (compat.CREATE_MODEL_AND_TRANSFORMS, create_model_and_transforms),
        (compat.CREATE_LOSS, create_loss),
        (compat.MAIN_TORCH, _torch_for_main(ecg_options)),
        (compat.GET_DATASET_FN, _ecg_dataset_fn),
        (compat.ZERO_SHOT_EVAL, ecg_zero_shot_eval),
    ]
    # amplifier: torch's global optimizer step hooks (--ecg-logit-lr-mult), for this run only
    with compat.swapped(replacements), amplifier:
        yield


def given_flags(argv: List[str], *flags: str) -> argparse.Namespace:
    """The values of open_clip_train's `flags` in `argv` (None when absent), in every form its parser
    accepts (``--flag value``, ``--flag=value``)."""
    parser = argparse.ArgumentParser(add_help=False)
    for flag in flags:
        parser.add_argument(flag, default=None)
    return parser.parse_known_args(argv)[0]


def check_inputs_before_start(open_clip_argv: List[str]) -> None:
    """Fail on missing shards or checkpoint files before open_clip_train starts (and logs ~250 lines)."""
    given = given_flags(open_clip_argv, "--train-data", "--val-data", "--pretrained")
    for spec in (given.train_data, given.val_data):
        if spec:
            read_shard_info(expand_shards(spec))
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
