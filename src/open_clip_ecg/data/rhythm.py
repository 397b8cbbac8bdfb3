"""RR-interval input channels: beat-to-beat timing handed to the ECG tower as two extra channels.

Why: a 1D-ResNet on the raw signal sees each beat through a window of a second or two and averages
those views; it does not compare RR intervals across a record. On PTB-XL folds 1-6 the RR
interval's coefficient of variation alone ranks sinus arrhythmia at AUROC 0.84, where the zero-shot
and the supervised 1D-ResNet-18 stay between 0.5 and 0.65 (``scripts/ptbxl_rr_features.py``; README,
"RR channels: the beat-to-beat timing the tower did not see").

Beats: QRS energy across all the model's leads (band-pass 5-15 Hz, the summed squared slope,
smoothed over 80 ms), peaks at least 300 ms apart above 35 % of the record's 99th percentile
(scipy.signal). A hand-composed detector: wfdb's XQRS takes one lead, needs 250 Hz or more (at
100 Hz its mean RR ranked sinus bradycardia at 0.66 against 0.93 after resampling) and costs six to
seven times more (``scripts/benchmarks/bench_rr_channels.py``); on 353 real PTB-XL records ours
finds 99.7 % of XQRS's beats (test_rhythm.py compares them). From the beats, sample by sample:

- ``RR-ratio``: the current RR interval over the record's median RR, minus 1, times 5
  (a 10 % longer beat reads 0.5): irregularity relative to the whole record, even in a crop;
- ``HR``: the current heart rate, (bpm - 70) / 30: bradycardia and tachycardia as a level.

Both are computed on the whole record before cropping and normalisation (the beats of the signal
as recorded, whatever the model's normalisation). A record with fewer than three detected beats
gets zeros in both (no rhythm information), which is what a flat or too short record yields.

Cost: the band-pass is designed once per rate (:func:`qrs_filter`), and the shard writer stores
each record's beats of all 12 leads (:data:`BEAT_DETECTOR` in the manifest), so training,
evaluation and ``embed`` read them instead of detecting again; older shards, other detectors and
models on fewer leads detect at read time. Either way the channels are the same: the writer
detects on the float16 signal the shard stores, exactly what a reader would decode.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..leads import RR_CHANNELS, STANDARD_LEADS

QRS_BAND = (5.0, 15.0)  # Hz: where QRS energy dominates P and T waves and baseline wander
SMOOTHING = 0.08  # s
REFRACTORY = 0.3  # s: no two beats closer (200 bpm)
THRESHOLD = 0.35  # of the energy's 99th percentile

# Stored beats are used only when the shards' manifest names this detector (bump the version when
# anything above changes what it finds) and the model's leads are these, in this order.
BEAT_DETECTOR = {"name": "open_clip_ecg.data.rhythm.detect_beats", "version": 1, "leads": list(STANDARD_LEADS)}


@functools.lru_cache(maxsize=16)
def qrs_filter(sampling_rate: float) -> np.ndarray:
    """Second-order sections of the QRS band-pass at `sampling_rate`, designed once per rate
    (designing it per record was a third of the detector's time)."""
    from scipy.signal import butter  # on first use (see find_peaks below)

    high = min(QRS_BAND[1], 0.45 * sampling_rate)
    return butter(2, [QRS_BAND[0], high], btype="band", fs=sampling_rate, output="sos")


def detect_beats(signal: np.ndarray, sampling_rate: float) -> np.ndarray:
    """Sample indices of the QRS complexes in ``[leads, T]`` (or one lead ``[T]``)."""
    # imported on first use: scipy.signal is about 2 s of every process's start (each CLI call,
    # each DataLoader worker), and most processes never detect a beat
    from scipy.signal import find_peaks, sosfiltfilt

    signal = np.atleast_2d(np.asarray(signal, dtype=np.float64))
    rate = float(sampling_rate)
    if signal.shape[-1] < 2 * rate:  # under two seconds: no RR interval worth a channel
        return np.zeros(0, dtype=np.int64)
    slope = np.diff(sosfiltfilt(qrs_filter(rate), signal, axis=-1), axis=-1)
    energy = np.sqrt((slope ** 2).sum(axis=0))
    width = max(1, int(round(SMOOTHING * rate)))
    energy = np.convolve(energy, np.ones(width) / width, mode="same")
    level = np.percentile(energy, 99)
    if not level > 0:
        return np.zeros(0, dtype=np.int64)
    peaks, _ = find_peaks(energy, distance=max(1, int(REFRACTORY * rate)), height=THRESHOLD * level)
    return peaks


def rr_channels(signal: np.ndarray, sampling_rate: float) -> np.ndarray:
    """``[2, T]`` float32 (:data:`RR_CHANNELS`) for a ``[leads, T]`` signal."""
    return rr_channels_from_beats(detect_beats(signal, sampling_rate), np.asarray(signal).shape[-1], sampling_rate)


def rr_channels_from_beats(beats: np.ndarray, n: int, sampling_rate: float) -> np.ndarray:
    """``[2, n]`` float32 (:data:`RR_CHANNELS`) of a record of `n` samples with these beats."""
    beats = np.asarray(beats, dtype=np.int64)
    if len(beats) < 3:
        return np.zeros((len(RR_CHANNELS), n), dtype=np.float32)
    # slices and preallocated arrays, not np.diff/np.stack: this runs per sample and step
    rr = (beats[1:] - beats[:-1]) / float(sampling_rate)  # seconds; rr[k] spans beats k..k+1
    # rr[k] holds from beat k+1 on (rr[0] before it, the last interval after the last beat)
    edges = np.empty(len(beats), dtype=np.int64)
    edges[0], edges[1:-1], edges[-1] = 0, beats[1:-1], n
    ordered = np.sort(rr)  # np.median's value at a tenth of its cost on a few dozen intervals
    median = (ordered[(len(rr) - 1) // 2] + ordered[len(rr) // 2]) / 2.0
    values = np.empty((len(RR_CHANNELS), len(rr)), dtype=np.float32)
    values[0] = (rr / median - 1.0) * 5.0
    values[1] = (60.0 / rr - 70.0) / 30.0
    return np.repeat(values, edges[1:] - edges[:-1], axis=1)


class AppendRRChannels:
    """Transform stage: ``[leads, T]`` -> ``[leads + 2, T]``, the RR channels appended (run it on
    the whole record, before any crop or normalisation). `beats`, when given, are the record's
    stored beats (:data:`BEAT_DETECTOR`), used instead of detecting them again."""

    def __init__(self, sampling_rate: float):
        self.sampling_rate = float(sampling_rate)

    def __call__(self, signal, beats: Optional[np.ndarray] = None) -> torch.Tensor:
        signal = torch.as_tensor(signal)
        n = signal.shape[-1]
        extra = (rr_channels(signal.detach().cpu().numpy(), self.sampling_rate) if beats is None
                 else rr_channels_from_beats(beats, n, self.sampling_rate))
        return torch.cat([signal, torch.from_numpy(extra).to(signal.device, signal.dtype)])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sampling_rate={self.sampling_rate:g})"


def split_channels(channels: Sequence[str]) -> Tuple[List[str], bool]:
    """(ECG lead names, whether the RR channels follow) of a model's input channel names; the RR
    channels must come last and in order, as :class:`AppendRRChannels` appends them."""
    channels = list(channels)
    if not any(name in RR_CHANNELS for name in channels):
        return channels, False
    if channels[-len(RR_CHANNELS):] != RR_CHANNELS or len(set(channels) & set(RR_CHANNELS)) != len(RR_CHANNELS):
        raise ValueError(f"input channels {channels}: the RR channels {RR_CHANNELS} must come last, in this order")
    return channels[:-len(RR_CHANNELS)], True
