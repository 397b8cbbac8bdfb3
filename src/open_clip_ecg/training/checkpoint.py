"""Checkpoints as open_clip_train writes them, made atomic and carrying the ECG preprocessing."""
from __future__ import annotations

import argparse
import os

import torch

from ..atomic import remove_stale_temps, write_atomic
from ..model_preprocess import ECG_PREPROCESS_KEY


def atomic_torch_save(obj, path, *args, **kwargs) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a truncated checkpoint, and
    temporaries that killed saves left in the folder are removed."""
    remove_stale_temps(os.path.dirname(os.path.abspath(path)))
    write_atomic(path, lambda tmp: torch.save(obj, tmp, *args, **kwargs))


def checkpoint_saver(ecg_options: argparse.Namespace):
    """torch.save for open_clip_train.main: its checkpoint dicts carry the ECG preprocessing."""
    def save(obj, path, *args, **kwargs):
        preprocess_cfg = getattr(ecg_options, "preprocess_cfg", None)
        if isinstance(obj, dict) and "state_dict" in obj and preprocess_cfg is not None:
            obj = {**obj, ECG_PREPROCESS_KEY: preprocess_cfg}
        atomic_torch_save(obj, path, *args, **kwargs)
    return save
