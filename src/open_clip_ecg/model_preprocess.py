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
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .data.preprocess import resample, sampling_rate_problem
from .data.rhythm import split_channels
from .data.transforms import build_ecg_transform
from .leads import LEAD_SETS, lead_indices

ECG_PREPROCESS_KEY = "ecg_preprocess"


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
    """The ECG preprocessing a checkpoint records, or None (older checkpoints, bare state dicts)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    cfg = checkpoint.get(ECG_PREPROCESS_KEY) if isinstance(checkpoint, dict) else None
    return cfg if isinstance(cfg, dict) else None


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
    (scipy's polyphase filter) to the model's rate, normalised and cropped (random crop of
    ``seconds`` for training, centre crop of ``eval_seconds`` otherwise; shorter ones zero-padded),
    with the RR channels appended when the model takes them."""

    def __init__(self, cfg: Dict, train: bool = False):
        self.cfg = cfg
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
        if signal.shape[-1] < self.n_samples:
            signal = np.pad(signal, [(0, 0), (0, self.n_samples - signal.shape[-1])])
        return torch.as_tensor(self.transform(torch.from_numpy(np.ascontiguousarray(signal))), dtype=torch.float32)
