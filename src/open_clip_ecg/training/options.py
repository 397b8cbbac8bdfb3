"""The ``--ecg-*`` flags, the open_clip_train flags that cannot work with ECG towers, and the checks
that turn both into one run's settings (:func:`resolve_run_args`, called from the ``parse_args``
seam)."""
from __future__ import annotations

import argparse
import math
import os
from typing import List

import open_clip
import torch

from .. import compat
from ..data.text import SAMPLED_TEXT_KINDS
from ..leads import LEAD_SETS
from ..loss import FINDING_TARGETS, TARGET_MODES
from ..registry import list_ecg_models, pair_text_model
from ..tasks import TASKS
from .data import auto_logit_bias

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
    group.add_argument("--ecg-allow-recipe-change", action="store_true",
                       help="--resume a checkpoint although --ecg-seconds, --ecg-normalize, --ecg-targets or the "
                            "training shards' vocabulary or sampling rate differ from its own (refused without "
                            "this flag); the change is logged and recorded in the next checkpoints")
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


def tower_lead_set(model_name: str) -> str:
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
            f"open_clip_torch {compat.SUPPORTED['open_clip_torch']} "
            "(update REJECTED_FLAGS in open_clip_ecg.training.options)")
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


def given_flags(argv: List[str], *flags: str) -> argparse.Namespace:
    """The values of open_clip_train's `flags` in `argv` (None when absent), in every form its parser
    accepts (``--flag value``, ``--flag=value``)."""
    parser = argparse.ArgumentParser(add_help=False)
    for flag in flags:
        parser.add_argument(flag, default=None)
    return parser.parse_known_args(argv)[0]


def resolve_run_args(args: argparse.Namespace, ecg_options: argparse.Namespace, argv: List[str]) -> None:
    """Check open_clip_train's parsed `args` and the `ecg_options` together and settle the run's
    settings in place: the model (with its text tower or cache), fp32 on CPUs unless --precision is
    given, SigLIP, the tower's lead set, the initial logit bias; ``args.ecg`` holds the ECG options."""
    for composed, flag in ((ecg_options.ecg_text == "sampled", "--ecg-text sampled"),
                           (ecg_options.ecg_finding_texts != "off", "--ecg-finding-texts")):
        if composed and ecg_options.ecg_text_cache:
            raise ValueError(f"{flag} composes new texts every step, which a text-embedding cache cannot "
                             "hold: use --ecg-text stored and no --ecg-finding-texts with --ecg-text-cache")
    if ecg_options.ecg_logit_lr_mult <= 0:
        raise ValueError(f"--ecg-logit-lr-mult must be > 0, got {ecg_options.ecg_logit_lr_mult}")
    if not 0 < ecg_options.ecg_init_logit_scale < math.inf:  # the model stores its log
        raise ValueError(f"--ecg-init-logit-scale must be a positive number, got {ecg_options.ecg_init_logit_scale}")
    if ecg_options.ecg_init_logit_bias != "auto" and not math.isfinite(ecg_options.ecg_init_logit_bias):
        raise ValueError(f"--ecg-init-logit-bias must be a finite number or 'auto', got {ecg_options.ecg_init_logit_bias}")
    args.model = pair_text_model(args.model, ecg_options.ecg_text_model, ecg_options.ecg_text_cache)
    check_open_clip_args(args)
    if given_flags(argv, "--precision").precision is None and not torch.cuda.is_available():
        args.precision = "fp32"  # open_clip's default 'amp' is float16 autocast: slow on CPUs
    args.siglip = True  # the logit bias exists only with --siglip
    tower_leads = tower_lead_set(args.model)
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
