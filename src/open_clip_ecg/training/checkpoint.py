"""Checkpoints as open_clip_train writes and resumes them: atomic, carrying what the run was trained
on, and checked against the run that resumes them.

Each checkpoint dict gets the ECG preprocessing (``ecg_preprocess``, see
:mod:`open_clip_ecg.model_preprocess`) and ``ecg_training``: the pair targets and the recipe
changes accepted on resumes. ``--resume`` (a file, or ``latest``) is refused with one line when the
checkpoint was trained as another model (another ``--model``, or ``--ecg-text-model`` /
``--ecg-text-cache`` added or dropped), or when the training recipe changed
(:data:`RECIPE_FIELDS`), unless ``--ecg-allow-recipe-change`` is given: then the change is logged
and recorded in every later checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Dict, List, Optional

import torch

from ..atomic import remove_stale_temps, write_atomic
from ..factory import state_dict_mismatch
from ..model_preprocess import ECG_PREPROCESS_KEY

ECG_TRAINING_KEY = "ecg_training"
# what a resumed run must keep: (key in the recorded config, how a user names it)
RECIPE_FIELDS = (("sampling_rate", "the training shards' sampling rate"), ("seconds", "--ecg-seconds"),
                 ("normalize", "--ecg-normalize"), ("targets", "--ecg-targets"),
                 ("vocabulary", "the training shards' vocabulary"))


def atomic_torch_save(obj, path, *args, **kwargs) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a truncated checkpoint, and
    temporaries that killed saves left in the folder are removed."""
    remove_stale_temps(os.path.dirname(os.path.abspath(path)))
    write_atomic(path, lambda tmp: torch.save(obj, tmp, *args, **kwargs))


def checkpoint_saver(ecg_options: argparse.Namespace):
    """torch.save for open_clip_train.main: its checkpoint dicts carry the ECG preprocessing and the
    training record (targets, accepted recipe changes)."""
    def save(obj, path, *args, **kwargs):
        preprocess_cfg = getattr(ecg_options, "preprocess_cfg", None)
        if isinstance(obj, dict) and "state_dict" in obj and preprocess_cfg is not None:
            obj = {**obj, ECG_PREPROCESS_KEY: preprocess_cfg, ECG_TRAINING_KEY: training_record(ecg_options)}
        atomic_torch_save(obj, path, *args, **kwargs)
    return save


def training_record(ecg_options: argparse.Namespace) -> Dict:
    return {"targets": ecg_options.ecg_targets, "recipe_changes": list(getattr(ecg_options, "recipe_changes", []))}


def _recipe(preprocess_cfg: Optional[Dict], training: Optional[Dict]) -> Dict:
    """The comparable recipe of a checkpoint or run (fields it does not record are left out)."""
    recipe = {key: (preprocess_cfg or {}).get(key) for key, _ in RECIPE_FIELDS if key != "targets"}
    if recipe.get("vocabulary") is not None:  # ids and codes define the label columns; names are text
        recipe["vocabulary"] = [v["code"] for v in recipe["vocabulary"]]
    recipe["targets"] = (training or {}).get("targets")
    return {key: value for key, value in recipe.items() if value is not None}


def _shown(key: str, value) -> str:
    if key == "vocabulary":
        return f"{len(value)} labels ({', '.join(value[:4])}{', ...' if len(value) > 4 else ''})"
    return f"{value:g} Hz" if key == "sampling_rate" else f"{value:g}" if isinstance(value, float) else str(value)


def recipe_changes(recorded: Dict, current: Dict) -> List[str]:
    """'what: checkpoint X, this run Y' for every recipe field both record and that differs."""
    names = dict(RECIPE_FIELDS)
    changes = []
    for key, name in RECIPE_FIELDS:
        if key in recorded and key in current and recorded[key] != current[key]:
            if key == "vocabulary" and sorted(recorded[key]) == sorted(current[key]):
                detail = "the same labels in another order (label ids differ)"
            else:
                detail = f"checkpoint {_shown(key, recorded[key])}, this run {_shown(key, current[key])}"
            changes.append(f"{names[key]}: {detail}")
    return changes


def check_resume(path: str, model_name: str, model: torch.nn.Module, ecg_options: argparse.Namespace,
                 current_preprocess: Optional[Dict]) -> None:
    """ValueError (one line) when the checkpoint at `path` cannot continue this run: trained as another
    model, or with another recipe (unless ``--ecg-allow-recipe-change``, which records the change in
    ``ecg_options.recipe_changes`` for the next checkpoints)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # mmap needs torch's zip format; open_clip_train reports anything else itself
        logging.debug(f"--resume {path}: not checked ({err})")
        return
    if not isinstance(checkpoint, dict):
        return
    recorded_cfg, training = checkpoint.get(ECG_PREPROCESS_KEY), checkpoint.get(ECG_TRAINING_KEY)
    recorded_cfg = recorded_cfg if isinstance(recorded_cfg, dict) else None
    training = training if isinstance(training, dict) else None
    trained_as = (recorded_cfg or {}).get("model")
    state = checkpoint.get("state_dict", checkpoint)
    if isinstance(state, dict) and state and all(isinstance(k, str) for k in state):
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        problems = [] if trained_as == model_name else state_dict_mismatch(state, model.state_dict())
        if trained_as not in (None, model_name) or problems:
            was = f"was trained as model {trained_as!r}" if trained_as else "does not fit"
            raise ValueError(f"--resume {path}: the checkpoint {was}, this run asks for {model_name!r}"
                             + (f" ({'; '.join(problems)})" if problems else "")
                             + ": resume with the --model (and --ecg-text-model/--ecg-text-cache) it was trained "
                             "with, or start a new --name")
    if current_preprocess is None:
        return
    current = _recipe(current_preprocess, training_record(ecg_options))
    changes = recipe_changes(_recipe(recorded_cfg, training), current)
    if not changes:
        ecg_options.recipe_changes = list((training or {}).get("recipe_changes", []))
        return
    if not ecg_options.ecg_allow_recipe_change:
        raise ValueError(f"--resume {path}: the training recipe changed: {'; '.join(changes)}. Resume with the "
                         "checkpoint's settings, or pass --ecg-allow-recipe-change to continue with the new "
                         "ones (recorded in the next checkpoints)")
    logging.warning(f"--ecg-allow-recipe-change: continuing {path} with a changed recipe: {'; '.join(changes)}")
    ecg_options.recipe_changes = [*(training or {}).get("recipe_changes", []),
                                  {"resumed_from": os.path.abspath(path), "epoch": checkpoint.get("epoch"),
                                   "changes": changes}]
