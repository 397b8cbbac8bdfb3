"""What a model was trained on, carried with the model, and the callable that turns a raw ECG into
its input.

Training records an ECG preprocessing config with every checkpoint (key ``ecg_preprocess`` of
open_clip_train's checkpoint dict; ``preprocess_cfg.ecg`` of an exported ``open_clip_config.json``)::

    {"model": "ECG-RN18-MiniLM", "sampling_rate": 100.0, "seconds": 5.0, "eval_seconds": 10.0,
     "leads": ["I", ...], "normalize": "center", "text": "report",
     "vocabulary": [{"id": 0, "code": "AF", "name": "atrial fibrillation"}, ...]}

:func:`open_clip_ecg.factory.load_model` attaches it to the model (``model.ecg_preprocess``), and
everything that embeds shards (evaluate, embed, probe, the Python API) applies it: the crop and
normalisation by default, and a shard folder at another sampling rate is refused with what to do.
Checkpoints written before this existed have none: the shards' own rate, the whole stored record
and ``center`` normalisation are used, as before.

A config comes from a file someone else may have written, so :func:`check_preprocess_cfg` checks
every field before anything is allocated from it: rates in ``SAMPLING_RATE_RANGE`` (as for input
signals), crops of at least one sample and at most ``MAX_CROP_SECONDS``, known lead names and
normalisations. A 10 MHz rate or a 10^9 s crop would otherwise ask for gigabytes per ECG.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .data.preprocess import resample, sampling_rate_problem, to_float16
from .data.rhythm import split_channels
from .data.transforms import NORMALIZE_MODES, build_ecg_transform
from .leads import LEAD_SETS, RR_CHANNELS, STANDARD_LEADS, canonical_lead_name, lead_indices

ECG_PREPROCESS_KEY = "ecg_preprocess"
# Longest crop a model config may declare: 10 minutes (at 10 kHz, 12 leads: 288 MB of float32),
# far beyond any resting or rhythm-strip ECG model.
MAX_CROP_SECONDS = 600.0


def training_preprocess_cfg(model_name: str, ecg_options, shard_info: Dict) -> Dict:
    """The config a training run records: its --ecg-* options and what its training shards hold."""
    stored_seconds = shard_info["n_samples"] / shard_info["sampling_rate"]
    return {
        "model": model_name,
        "sampling_rate": float(shard_info["sampling_rate"]),
        "seconds": float(ecg_options.ecg_seconds),
        "eval_seconds": float(ecg_options.ecg_eval_seconds or stored_seconds),
        "leads": list(LEAD_SETS[ecg_options.ecg_leads]),
        "normalize": ecg_options.ecg_normalize,
        "text": shard_info.get("text"),
        "vocabulary": [{"id": v["id"], "code": v["code"], "name": v["name"]} for v in shard_info["vocabulary"]],
    }


def read_checkpoint_preprocess(path: str) -> Optional[Dict]:
    """The ECG preprocessing a checkpoint records (checked), or None (older checkpoints, bare state dicts)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    cfg = checkpoint.get(ECG_PREPROCESS_KEY) if isinstance(checkpoint, dict) else None
    if cfg is None:
        return None
    return check_preprocess_cfg(cfg, f"checkpoint {path}: {ECG_PREPROCESS_KEY}")


def _number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def check_preprocess_cfg(cfg, where: str) -> Dict:
    """`cfg` if it is a usable ECG preprocessing config, else a ValueError naming `where` (the file
    and key it came from) and the field at fault. Runs before anything is sized from the config."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where} must be an object with sampling_rate, seconds, eval_seconds, leads and "
                         f"normalize, got {type(cfg).__name__}")
    missing = [k for k in ("sampling_rate", "seconds", "eval_seconds", "leads", "normalize") if k not in cfg]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    rate = cfg["sampling_rate"]
    if not _number(rate) or sampling_rate_problem(rate):
        raise ValueError(f"{where}.sampling_rate: "
                         f"{sampling_rate_problem(rate) if _number(rate) else f'{rate!r} is not a number of Hz'}")
    for key in ("seconds", "eval_seconds"):
        seconds = cfg[key]
        if not _number(seconds) or not 0 < seconds <= MAX_CROP_SECONDS or round(rate * seconds) < 1:
            shown = f"{seconds:g}" if _number(seconds) else repr(seconds)
            raise ValueError(f"{where}.{key}: {shown} is not a crop length (a number of seconds, at least one "
                             f"sample and at most {MAX_CROP_SECONDS:g} s)")
    leads = cfg["leads"]
    if (not isinstance(leads, list) or not leads or not all(isinstance(n, str) for n in leads)
            or any(n not in RR_CHANNELS and canonical_lead_name(n) not in STANDARD_LEADS for n in leads)):
        raise ValueError(f"{where}.leads: {leads!r} is not a list of lead names ({', '.join(STANDARD_LEADS)}, "
                         f"then optionally {', '.join(RR_CHANNELS)})")
    try:
        split_channels(leads)
    except ValueError as e:
        raise ValueError(f"{where}.leads: {e}") from e
    if cfg["normalize"] not in NORMALIZE_MODES:
        raise ValueError(f"{where}.normalize: {cfg['normalize']!r} is not one of {NORMALIZE_MODES}")
    vocabulary = cfg.get("vocabulary", [])
    if not isinstance(vocabulary, list) or not all(isinstance(v, dict) and isinstance(v.get("name"), str)
                                                   for v in vocabulary):
        raise ValueError(f"{where}.vocabulary must be a list of {{'id', 'code', 'name'}} objects")
    return cfg


def check_shards_fit(cfg: Optional[Dict], shard_info: Dict) -> None:
    """ValueError when shards are stored at another rate than the model was trained on."""
    if cfg is None or float(cfg["sampling_rate"]) == float(shard_info["sampling_rate"]):
        return
    rate = float(cfg["sampling_rate"])
    raise ValueError(f"the model was trained on {rate:g} Hz ECGs but the shards in {shard_info['directory']} are "
                     f"{float(shard_info['sampling_rate']):g} Hz: write them with `open-clip-ecg shards "
                     f"--sampling-rate {rate:g}` (or resample raw signals with "
                     "open_clip_ecg.create_model_and_transforms' preprocess)")


class ECGPreprocess:
    """Raw signal ``[leads, T]`` (numpy or tensor, mV), its rate and lead names -> model input
    ``[model leads, round(rate * seconds)]`` float32: leads picked and reordered by name, resampled
    (scipy's polyphase filter) to the model's rate, rounded to float16 as shards store it, normalised
    and cropped (random crop of ``seconds`` for training, centre crop of ``eval_seconds`` otherwise;
    shorter ones zero-padded after normalisation), with the RR channels appended when the model
    takes them."""

    def __init__(self, cfg: Dict, train: bool = False):
        self.cfg = check_preprocess_cfg(cfg, "preprocess_cfg")
        seconds = cfg["seconds"] if train else cfg["eval_seconds"]
        self.n_samples = int(round(float(cfg["sampling_rate"]) * float(seconds)))
        self.leads, with_rr = split_channels(cfg["leads"])
        self.transform = build_ecg_transform(train=train, n_samples=self.n_samples, normalize=cfg["normalize"],
                                             rr_sampling_rate=float(cfg["sampling_rate"]) if with_rr else None)

    def __call__(self, signal, sampling_rate: float, lead_names: Sequence[str]) -> torch.Tensor:
        signal = signal.detach().cpu().numpy() if isinstance(signal, torch.Tensor) else np.asarray(signal)
        if signal.ndim != 2 or signal.shape[0] != len(lead_names):
            raise ValueError(f"expected a [leads, samples] signal with one row per lead name; got shape "
                             f"{signal.shape} and {len(lead_names)} lead names")
        if sampling_rate_problem(sampling_rate):
            raise ValueError(f"sampling rate {sampling_rate_problem(sampling_rate)}")
        signal = signal[lead_indices(lead_names, self.leads)].astype(np.float32)
        if not np.isfinite(signal).all():
            raise ValueError("the signal holds NaN or inf values")
        signal = resample(signal, float(sampling_rate), float(self.cfg["sampling_rate"]))
        # the precision shards store (float16, ~0.5 uV at 1 mV): the input the model was trained and
        # validated on, so a raw record scores as its shard does (classify equals evaluate)
        signal = to_float16(signal).astype(np.float32)
        if not np.isfinite(signal).all():
            raise ValueError(f"the signal exceeds float16's range (|x| > {np.finfo(np.float16).max:g} mV)")
        # a short record is padded by the crop, after normalisation: zeros then sit at the baseline
        return torch.as_tensor(self.transform(torch.from_numpy(np.ascontiguousarray(signal))), dtype=torch.float32)
