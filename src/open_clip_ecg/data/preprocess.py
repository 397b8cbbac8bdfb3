"""One loaded record -> the stored array: float16 ``[len(leads), round(sampling_rate * seconds)]``
in millivolts, leads in a fixed order. Every rejection is a :class:`RecordError` with a reason.

Order of operations and policies (each an argument of :func:`preprocess_record`):

1. **Leads** are matched by :func:`open_clip_ecg.leads.canonical_lead_name` ('AVR', 'avr',
   'lead_ii', 'MLII', ...) and reordered to `leads`. Two source leads with the same canonical
   name -> ``lead_count``. Missing leads (``missing_leads``):

   - ``"error"`` (default): ``missing_leads`` error; nothing is invented.
   - ``"derive"``: III, aVR, aVL and aVF are computed from I and II by Einthoven's and
     Goldberger's relations (III = II - I, aVR = -(I + II)/2, aVL = I - II/2,
     aVF = II - I/2); any other missing lead is still an error.
   - ``"zero"``: derive what can be derived, fill the rest with zeros.

2. **Non-finite samples** (NaN/inf, e.g. WFDB invalid samples) are linearly interpolated per lead
   (edges take the nearest finite value) in leads with at most ``max_non_finite`` of their
   samples non-finite (default 1 %, 50 samples = 100 ms at 500 Hz). A used lead (or I/II for a
   derived lead) beyond that -> ``non_finite``; leads not in `leads` do not matter.

3. **Flat**: the record is rejected as ``flat`` when *every* used lead has a standard deviation
   below ``flat_std_mv`` (default 0.002 mV = 2 µV; real leads in PTB-XL and CinC have >= 13 µV).
   Single flat leads (a detached electrode) are kept: the model sees a flat line.

4. **Sampling rate**: a source rate outside ``SAMPLING_RATE_RANGE`` (50 Hz to 10 kHz; ECGs are
   recorded at 100 Hz to a few kHz) -> ``sampling_rate``, before anything is resampled, so the
   upsampling factor and the memory per record stay bounded (a 0.01 Hz header would otherwise ask
   resampling to 500 Hz for a 50,000-fold array).

5. **Too short**: a record shorter than ``min_seconds`` (default: ``seconds``) -> ``too_short``.

6. **Resampling** to `sampling_rate` with ``scipy.signal.resample_poly`` (polyphase FIR,
   anti-aliasing built in); the rate ratio is approximated by a fraction with denominator
   <= 1000 (exact for all common ECG rates).

7. **Fixed length**: longer records are cropped to ``round(sampling_rate * seconds)`` samples,
   taking the first ones (``crop="start"``, default: deterministic, and the beginning is the
   only part every record has) or the middle ones (``crop="center"``); records shorter than
   that but not shorter than ``min_seconds`` are zero-padded at the end.

8. **float16**: values beyond float16's range (|x| > 65504 mV, physiologically impossible) ->
   ``non_finite``; otherwise cast (resolution ~0.5 µV at 1 mV, ~8 µV at 10 mV).
"""
from __future__ import annotations

from fractions import Fraction
from typing import Optional, Sequence

import numpy as np
import torch

from ..leads import STANDARD_LEADS, canonical_lead_name, lead_set
from .record import ECGRecord, RecordError

MISSING_LEAD_POLICIES = ("error", "derive", "zero")
CROP_RULES = ("start", "center")

FLOAT16_MAX = float(np.finfo(np.float16).max)
SAMPLING_RATE_RANGE = (50.0, 10000.0)  # Hz, source and target rates alike

# Limb leads as linear combinations of I and II: name -> (weight of I, weight of II).
_LIMB_FROM_I_II = {
    "III": (-1.0, 1.0),
    "aVR": (-0.5, -0.5),
    "aVL": (1.0, -0.5),
    "aVF": (-0.5, 1.0),
}


def sampling_rate_problem(rate: float) -> Optional[str]:
    """Why `rate` is not a supported ECG sampling rate (None when it is)."""
    low, high = SAMPLING_RATE_RANGE
    return None if low <= float(rate) <= high else f"{float(rate):g} Hz is outside the supported {low:g}-{high:g} Hz"


def _error(record: ECGRecord, reason: str, detail: str) -> RecordError:
    return RecordError(reason, record.entry.path, detail, record.entry.record_id)


def reorder_leads(record: ECGRecord, leads: Sequence[str] = STANDARD_LEADS,
                  missing_leads: str = "error") -> np.ndarray:
    """Signal rows in the order of `leads` (names, or a LEAD_SETS key such as "12"), derived or
    zero-filled per policy; ValueError for a lead name that is not a standard lead."""
    if missing_leads not in MISSING_LEAD_POLICIES:
        raise ValueError(f"missing_leads must be one of {MISSING_LEAD_POLICIES}, not {missing_leads!r}")
    signal = record.signal
    canonical = [canonical_lead_name(n) for n in record.lead_names]
    duplicates = sorted({n for n in canonical if canonical.count(n) > 1})
    if duplicates:
        raise _error(record, "lead_count", f"leads {duplicates} appear twice in {record.lead_names}")
    row_of = {name: i for i, name in enumerate(canonical)}
    wanted = lead_set(leads)
    missing = [n for n in wanted if n not in row_of]
    if not missing:
        return signal[[row_of[n] for n in wanted]]
    derivable = [n for n in missing if n in _LIMB_FROM_I_II and "I" in row_of and "II" in row_of]
    if missing_leads == "error" or (missing_leads == "derive" and len(derivable) < len(missing)):
        absent = missing if missing_leads == "error" else [n for n in missing if n not in derivable]
        raise _error(record, "missing_leads", f"leads {absent} absent (have {record.lead_names}; "
                     f"missing_leads={missing_leads!r})")
    out = np.zeros((len(wanted), signal.shape[1]), dtype=signal.dtype)
    for i, name in enumerate(wanted):
        if name in row_of:
            out[i] = signal[row_of[name]]
        elif name in derivable:
            w_i, w_ii = _LIMB_FROM_I_II[name]
            out[i] = w_i * signal[row_of["I"]] + w_ii * signal[row_of["II"]]
    return out


def repair_non_finite(signal: np.ndarray, leads_to_repair: np.ndarray) -> np.ndarray:
    """Linearly interpolate non-finite samples of the selected leads (edges: nearest finite value).

    Leads not selected, or with no finite sample at all, are returned unchanged.
    """
    bad = ~np.isfinite(signal)
    todo = np.flatnonzero(leads_to_repair & bad.any(axis=1) & ~bad.all(axis=1))
    if not todo.size:
        return signal
    signal = signal.copy()
    positions = np.arange(signal.shape[1])
    for lead in todo:
        good = ~bad[lead]
        signal[lead, bad[lead]] = np.interp(positions[bad[lead]], positions[good], signal[lead, good])
    return signal


def resample(signal: np.ndarray, from_rate: float, to_rate: float) -> np.ndarray:
    """Polyphase resampling along the last axis by a rational approximation of the rate ratio."""
    if from_rate == to_rate:
        return signal
    from scipy.signal import resample_poly  # on first use, as in .rhythm.detect_beats

    ratio = Fraction(float(to_rate) / float(from_rate)).limit_denominator(1000)
    return resample_poly(signal, ratio.numerator, ratio.denominator, axis=-1).astype(signal.dtype, copy=False)


def fix_length(signal: np.ndarray, length: int, crop: str = "start") -> np.ndarray:
    """Crop (first or middle `length` samples) or zero-pad at the end to exactly `length` samples."""
    if crop not in CROP_RULES:
        raise ValueError(f"crop must be one of {CROP_RULES}, not {crop!r}")
    n = signal.shape[-1]
    if n > length:
        start = 0 if crop == "start" else (n - length) // 2
        return signal[..., start:start + length]
    if n < length:
        pad = [(0, 0)] * (signal.ndim - 1) + [(0, length - n)]
        return np.pad(signal, pad)
    return signal


def preprocess_record(record: ECGRecord, sampling_rate: float, seconds: float,
                      leads: Sequence[str] = STANDARD_LEADS, missing_leads: str = "error",
                      min_seconds: Optional[float] = None, crop: str = "start",
                      max_non_finite: float = 0.01, flat_std_mv: float = 0.002) -> np.ndarray:
    """Resample, reorder, validate and fix the length of one record (policies: module docstring)."""
    if sampling_rate <= 0 or seconds <= 0:
        raise ValueError(f"sampling_rate and seconds must be positive, got {sampling_rate}, {seconds}")
    signal = np.asarray(record.signal)
    if signal.ndim != 2 or signal.shape[0] != len(record.lead_names):
        raise _error(record, "lead_count", f"signal shape {signal.shape} does not match "
                     f"{len(record.lead_names)} lead names {record.lead_names}")
    if not record.sampling_rate or record.sampling_rate <= 0:
        raise _error(record, "unreadable", f"invalid sampling rate {record.sampling_rate!r}")
    rate_problem = sampling_rate_problem(record.sampling_rate)
    if rate_problem:
        raise _error(record, "sampling_rate", rate_problem)
    min_seconds = seconds if min_seconds is None else min_seconds
    duration = signal.shape[1] / float(record.sampling_rate)
    if duration < min_seconds:
        raise _error(record, "too_short", f"{duration:.2f} s < minimum {min_seconds:g} s")

    signal = signal.astype(np.float32, copy=False)
    # a NaN or inf anywhere makes the float64 sum non-finite: the per-lead count only when needed
    finite = bool(np.isfinite(signal.sum(dtype=np.float64)))
    fractions = np.zeros(len(signal)) if finite else (~np.isfinite(signal)).mean(axis=1)
    if fractions.any():
        signal = repair_non_finite(signal, fractions <= max_non_finite)
    selected = reorder_leads(ECGRecord(record.entry, signal, record.sampling_rate, record.lead_names),
                             leads, missing_leads)
    if not finite and not np.isfinite(selected).all():  # finite input, finite output (derived leads too)
        worst = {record.lead_names[i]: f"{fractions[i]:.1%}" for i in np.flatnonzero(fractions > max_non_finite)}
        raise _error(record, "non_finite", f"non-finite samples beyond {max_non_finite:.1%} of a used lead: {worst}")

    present = {canonical_lead_name(n) for n in record.lead_names}
    measured = np.flatnonzero([n in present for n in lead_set(leads)])  # not derived, not zero-filled
    # one lead that is not flat decides (the usual case); all of them only for the error's figure
    if measured.size and selected[measured[0]].std() < flat_std_mv:
        std = selected[measured].std(axis=1)
        if (std < flat_std_mv).all():
            raise _error(record, "flat", f"every lead has std < {flat_std_mv} mV (max {std.max():.2g} mV)")

    out = fix_length(resample(selected, record.sampling_rate, sampling_rate),
                     int(round(sampling_rate * seconds)), crop)
    peak = max(float(out.max()), -float(out.min())) if out.size else 0.0
    if peak > FLOAT16_MAX:
        raise _error(record, "non_finite", f"amplitude {peak:.3g} mV exceeds the float16 range "
                     f"({FLOAT16_MAX:g}); wrong units or gain in the header?")
    return to_float16(out)


_TORCH_GRAIN = 32768  # at::internal::GRAIN_SIZE: torch casts fewer elements on the calling thread


def to_float16(array: np.ndarray) -> np.ndarray:
    """``array.astype(np.float16)``, bit for bit (round to nearest even, inf beyond the range), by
    torch's vectorised cast: numpy's is scalar code, ~200 µs of a 12 x 5000 record, a sixth of the
    shard writer's own work. Cast in pieces below torch's parallel grain, so a cast never waits for
    a thread on a busy core (whole, it averaged 10x slower beside a training)."""
    flat = np.ascontiguousarray(array, dtype=np.float32).reshape(-1)
    out = np.empty(flat.shape, dtype=np.float16)
    source, target = torch.from_numpy(flat), torch.from_numpy(out)
    for start in range(0, flat.size, _TORCH_GRAIN):
        target[start:start + _TORCH_GRAIN].copy_(source[start:start + _TORCH_GRAIN])
    return out.reshape(np.shape(array))
