"""The open_clip glue: the only module that replaces anything in open_clip_train.

For the duration of one run, :func:`open_clip_seams` swaps a few names that open_clip_train looks
up at call time (the seams of :mod:`open_clip_ecg.compat`) and restores them afterwards:

=========================================== ==================================================
seam                                        why
=========================================== ==================================================
``open_clip_train.main.parse_args``         add ``--ecg-*`` options, force SigLIP, reject flags
                                            that cannot work with ECGs, fp32 default on CPU
``open_clip_train.main.create_model_and_…`` check a --resume checkpoint against the run's
                                            model and recipe (one line instead of load_state_dict's
                                            hundreds); give the model a forward that unpacks the labels
                                            carried with the text and returns them as
                                            ``labels`` (accumulation caches them like features),
                                            plus the embedded ``--ecg-finding-texts`` (groups too),
                                            and an ``encode_text`` that skips each text's
                                            padding (exact; ``open_clip_ecg.unpadded_text``), and a
                                            lock_image_tower that also freezes
                                            BatchNorm1d (open_clip's only freezes 2-D); each
                                            a plain function bound to the model, which
                                            ``--torchcompile`` can trace
``open_clip_train.main.create_loss``        MultiLabelSigLipLoss (Jaccard targets by default),
                                            stopping the run at the first non-finite loss
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

Why labels ride inside the text tensor: see :mod:`.label_passing`. What each replacement does
lives in the module of its responsibility; this one only wires them in.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import types
from typing import List, Optional

import numpy as np
import torch

from .. import compat
from ..factory import raise_if_checkpoint_does_not_fit
from ..loss import MultiLabelSigLipLoss
from ..towers import lock_image_tower
from .checkpoint import check_resume, checkpoint_saver
from .data import current_preprocess_cfg, get_ecg_dataset
from .finding_texts import FindingTextTokens, finding_text_tokens
from .finite_loss import FiniteLossCheck
from .label_passing import enable_label_passing
from .logit_step import LogitStepAmplifier
from .options import resolve_run_args
from .zero_shot import ecg_zero_shot_eval


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
    return compat.module_view(torch, {"save": checkpoint_saver(ecg_options),
                                      "nn.parallel.DistributedDataParallel": CPUCapableDistributedDataParallel})


def _ecg_dataset_fn(data_path, dataset_type):
    return get_ecg_dataset


def _lock_image_tower_1d(self, unlocked_groups=0, freeze_bn_stats=False):
    """open_clip's lock_image_tower with BatchNorm1d statistics frozen too when asked."""
    lock_image_tower(self, unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_bn_stats)


@contextlib.contextmanager
def open_clip_seams(ecg_options: argparse.Namespace, argv: List[str]):
    """Install the ECG seams into open_clip_train for one run; restore them afterwards."""
    upstream_parse_args = compat.PARSE_ARGS.get()
    upstream_create_model = compat.CREATE_MODEL_AND_TRANSFORMS.get()
    amplifier = LogitStepAmplifier(ecg_options.ecg_logit_lr_mult)
    finding_tokens: Optional[FindingTextTokens] = None  # --ecg-finding-texts, set by parse_args
    run_args = argparse.Namespace(resume=None)  # open_clip_train's args, set by parse_args

    def parse_args(raw_args):
        # open_clip_train's flags, checked with the --ecg-* ones; args.ecg carries the latter
        args = upstream_parse_args(raw_args)
        resolve_run_args(args, ecg_options, argv)
        nonlocal finding_tokens, run_args
        finding_tokens = finding_text_tokens(args)
        run_args = args
        return args

    def create_model_and_transforms(*args, **kwargs):
        # initial values only: --resume and --pretrained weights replace them; a --resume checkpoint
        # (already resolved by main) is checked against the model and the recipe before main loads it
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
        if run_args.resume and os.path.isfile(run_args.resume):  # main resolved --resume latest before this
            check_resume(run_args.resume, run_args.model, model, ecg_options, current_preprocess_cfg(run_args))
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
        loss = MultiLabelSigLipLoss(
            targets=args.ecg.ecg_targets, rank=args.rank, world_size=args.world_size, dist_impl=args.loss_dist_impl,
            finding_targets=finding_targets,
            finding_members=finding_tokens.finding_texts.members() if finding_targets else None,
            finding_weight=args.ecg.ecg_finding_weight, finding_prior=args.ecg.ecg_finding_prior)
        return FiniteLossCheck(loss, args.accum_freq)  # a NaN loss stops the run before any checkpoint

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
