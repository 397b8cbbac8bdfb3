"""ECG transforms for training and evaluation: crops, normalisation, light augmentations.

Every transform takes a ``[leads, T]`` signal (torch tensor or numpy array, any float dtype) and
returns a float32 torch tensor. Randomness comes from torch's RNG (the global one unless a
``torch.Generator`` is given), so a DataLoader's per-worker seeding applies and runs repeat under
``torch.manual_seed``.

Normalisation keeps millivolts by default (``'center'``): voltage findings such as LVH or low QRS
voltage are defined by amplitude, and per-lead z-scoring would erase them. open_clip's image
transforms (``create_model_and_transforms``) do not apply to ECGs; use
:func:`build_ecg_transform` instead.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torchvision.transforms import Compose

from ..leads import RR_CHANNELS
from .rhythm import AppendRRChannels

NORMALIZE_MODES = ("center", "zscore", "none")

__all__ = [
    "NORMALIZE_MODES",
    "AmplitudeScale",
    "CenterCrop",
    "Compose",
    "LeadDropout",
    "Normalize",
    "OnLeads",
    "RandomCrop",
    "as_ecg_tensor",
    "build_ecg_transform",
]


def as_ecg_tensor(signal) -> torch.Tensor:
    """A ``[leads, T]`` float32 tensor from a tensor or numpy array (float16 shards included)."""
    if isinstance(signal, np.ndarray):
        signal = torch.from_numpy(np.ascontiguousarray(signal))
    if not isinstance(signal, torch.Tensor):
        raise TypeError(f"expected an ECG as a torch tensor or numpy array, got {type(signal).__name__}")
    if signal.ndim != 2:
        raise ValueError(f"expected an ECG of shape [leads, samples], got shape {tuple(signal.shape)}")
    return signal.float()


def _place(signal: torch.Tensor, n_samples: int, offset: int) -> torch.Tensor:
    """The window ``[offset, offset + n_samples)`` of the signal zero-extended on both sides.

    A signal shorter than the window takes ``offset <= 0`` and lands ``-offset`` samples into a
    zero window: after ``'center'`` normalisation zero is the isoelectric baseline.
    """
    length = signal.shape[-1]
    if length >= n_samples:
        return signal[:, offset:offset + n_samples]
    out = signal.new_zeros(signal.shape[0], n_samples)
    out[:, -offset:-offset + length] = signal
    return out


class RandomCrop:
    """A random window of ``n_samples`` (the paper's augmentation against drift and for shift
    invariance). Shorter signals are zero-padded at a random position instead."""

    def __init__(self, n_samples: int, generator: Optional[torch.Generator] = None):
        if n_samples <= 0:
            raise ValueError(f"n_samples must be positive, got {n_samples}")
        self.n_samples = int(n_samples)
        self.generator = generator

    def __call__(self, signal) -> torch.Tensor:
        signal = as_ecg_tensor(signal)
        slack = signal.shape[-1] - self.n_samples
        offset = int(torch.randint(0, abs(slack) + 1, (1,), generator=self.generator))
        return _place(signal, self.n_samples, offset if slack >= 0 else -offset)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_samples={self.n_samples})"


class CenterCrop:
    """The central window of ``n_samples`` (evaluation); shorter signals are zero-padded equally
    on both sides (the extra sample, if any, goes to the end)."""

    def __init__(self, n_samples: int):
        if n_samples <= 0:
            raise ValueError(f"n_samples must be positive, got {n_samples}")
        self.n_samples = int(n_samples)

    def __call__(self, signal) -> torch.Tensor:
        signal = as_ecg_tensor(signal)
        slack = signal.shape[-1] - self.n_samples
        return _place(signal, self.n_samples, slack // 2 if slack >= 0 else -(-slack // 2))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_samples={self.n_samples})"


class Normalize:
    """Per-lead normalisation.

    - ``'center'`` (default): subtract each lead's median and keep millivolts. The median
      estimates the isoelectric baseline (an ECG spends most of each beat near it), which the
      mean does not when QRS and T waves are large and one-signed; amplitudes stay comparable
      across leads and records, so voltage findings remain learnable.
    - ``'zscore'``: subtract the per-lead mean and divide by the per-lead standard deviation
      (+ ``eps``); discards absolute amplitude (LVH, low voltage) by design.
    - ``'none'``: identity (float32 conversion only).
    """

    def __init__(self, mode: str = "center", eps: float = 1e-6):
        if mode not in NORMALIZE_MODES:
            raise ValueError(f"unknown normalisation {mode!r}; expected one of {NORMALIZE_MODES}")
        self.mode = mode
        self.eps = eps

    def __call__(self, signal) -> torch.Tensor:
        signal = as_ecg_tensor(signal)
        if self.mode == "center":
            return signal - _lower_median(signal)
        if self.mode == "zscore":
            mean = signal.mean(dim=-1, keepdim=True)
            std = signal.std(dim=-1, keepdim=True, unbiased=False)
            return (signal - mean) / (std + self.eps)
        return signal

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


def _lower_median(signal: torch.Tensor) -> torch.Tensor:
    """Per-lead median ``[leads, 1]`` as torch defines it (the lower middle value), by numpy's
    partition on the CPU (five times faster than ``Tensor.median`` on a 12-lead record)."""
    if signal.device.type != "cpu" or signal.requires_grad or not signal.shape[-1]:
        return signal.median(dim=-1, keepdim=True).values
    k = (signal.shape[-1] - 1) // 2
    return torch.from_numpy(np.partition(signal.numpy(), k, axis=-1)[:, k:k + 1])


class AmplitudeScale:
    """With probability ``p``, multiply the whole record by one factor drawn from
    ``U(low, high)``. One factor for all leads keeps the leads' mutual relations (Einthoven);
    keep the range narrow, since voltage findings are defined by amplitude."""

    def __init__(self, low: float = 0.9, high: float = 1.1, p: float = 0.5,
                 generator: Optional[torch.Generator] = None):
        if not 0 < low <= high:
            raise ValueError(f"amplitude scale range must satisfy 0 < low <= high, got ({low}, {high})")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.low, self.high, self.p = float(low), float(high), float(p)
        self.generator = generator

    def __call__(self, signal) -> torch.Tensor:
        signal = as_ecg_tensor(signal)
        draw = torch.rand(2, generator=self.generator)
        if draw[0] >= self.p:
            return signal
        return signal * (self.low + (self.high - self.low) * float(draw[1]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(low={self.low}, high={self.high}, p={self.p})"


class LeadDropout:
    """Zero each lead independently with probability ``p`` (robustness to missing or detached
    leads). At least one lead always survives: if every lead is drawn, one drawn at random is
    kept."""

    def __init__(self, p: float = 0.1, generator: Optional[torch.Generator] = None):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = float(p)
        self.generator = generator

    def __call__(self, signal) -> torch.Tensor:
        signal = as_ecg_tensor(signal)
        n_leads = signal.shape[0]
        drop = torch.rand(n_leads, generator=self.generator) < self.p
        keep = int(torch.randint(0, n_leads, (1,), generator=self.generator))
        if bool(drop.all()):
            drop[keep] = False
        return signal.masked_fill(drop[:, None], 0.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class OnLeads:
    """Apply an augmentation to the recorded leads only, not to the derived channels that follow
    them (rescaling the heart-rate channel would change the heart rate)."""

    def __init__(self, transform, n_derived: int):
        self.transform, self.n_derived = transform, int(n_derived)

    def __call__(self, signal) -> torch.Tensor:
        signal = as_ecg_tensor(signal)
        k = signal.shape[0] - self.n_derived
        return torch.cat([self.transform(signal[:k]), signal[k:]])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r}, n_derived={self.n_derived})"


def build_ecg_transform(train: bool, n_samples: int, normalize: str = "center",
                        amplitude_scale: Optional[Sequence[float]] = None, lead_dropout: float = 0.0,
                        generator: Optional[torch.Generator] = None,
                        rr_sampling_rate: Optional[float] = None) -> Compose:
    """The transform for training (random crop + optional augmentations) or evaluation (centre crop).

    Normalisation runs on the whole record before cropping, so the baseline estimate uses all
    samples and zero padding sits at the baseline. ``amplitude_scale`` is ``(low, high)`` or
    ``(low, high, p)`` (p defaults to 0.5); augmentations apply only when ``train`` is true.
    ``rr_sampling_rate`` (the signal's rate) appends the RR channels as the first step
    (:class:`~open_clip_ecg.data.rhythm.AppendRRChannels`): computed on the whole record as
    recorded, and left out of the normalisation and the augmentations.
    """
    steps = []
    n_derived = 0
    if rr_sampling_rate is not None:
        steps.append(AppendRRChannels(rr_sampling_rate))
        n_derived = len(RR_CHANNELS)
    steps.append(OnLeads(Normalize(normalize), n_derived) if n_derived else Normalize(normalize))
    if not train:
        return Compose(steps + [CenterCrop(n_samples)])
    steps.append(RandomCrop(n_samples, generator=generator))
    augmentations = []
    if amplitude_scale is not None:
        low, high, *rest = amplitude_scale
        augmentations.append(AmplitudeScale(low, high, p=rest[0] if rest else 0.5, generator=generator))
    if lead_dropout > 0:
        augmentations.append(LeadDropout(lead_dropout, generator=generator))
    steps += [OnLeads(a, n_derived) if n_derived else a for a in augmentations]
    return Compose(steps)
