"""Synthetic 12-lead ECGs with findings and varied English reports (quickstart and tests).

``open-clip-ecg synth --output DIR --n N --seed S`` writes real WFDB records (16-bit, 1 uV per
unit, mV) under ``DIR/records/``, ``DIR/records.csv`` for the generic CSV reader and
``DIR/label_names.csv``; ``open-clip-ecg shards --format csv --input DIR/records.csv`` turns them
into shards.

Beat model: every wave (P, Q, R, S, T, and the extra waves of wide QRS and PVCs) is a Gaussian
in time with per-lead amplitudes. Amplitudes are set for the eight independent leads
(I, II, V1-V6) and the other limb leads are derived exactly (III = II - I, aVR = -(I + II)/2,
aVL = I - II/2, aVF = II - I/2), so Einthoven's and Goldberger's relations hold, noise included.
Each record draws per-lead gains, respiratory RR modulation, baseline wander, white noise and
sometimes mains hum and muscle noise.

Findings and the signal signature each one gets (codes follow PTB-XL where one exists):

===========  ===============================  ================================================
code         name                             signature
===========  ===============================  ================================================
NORM         normal ECG                       sinus 60-95 bpm, no other finding
SBRAD        sinus bradycardia                sinus 40-55 bpm
STACH        sinus tachycardia                sinus 105-145 bpm
AFIB         atrial fibrillation              irregular RR, no P waves, 4-8 Hz f-waves
1AVB         first degree AV block            PR 240-340 ms (otherwise 130-190 ms)
BBB          bundle branch block              QRS 1.6-1.9x wider, R' in V1/V2, slurred S in I/V6
LVH          left ventricular hypertrophy     S(V1) + R(V5) 3.8-5.0 mV (Sokolow-Lyon)
LVOLT        low QRS voltage                  limb-lead QRS peak-to-peak 0.30-0.45 mV
STE          ST elevation                     ST segment +0.15-0.35 mV in one territory
STD          ST depression                    ST segment -0.10-0.25 mV in one territory
INVT         T wave inversion                 negative T waves in one territory
LNGQT        long QT interval                 QTc 490-570 ms (otherwise 380-430 ms)
PVC          premature ventricular complexes  1-3 early wide beats, discordant T, full pause
===========  ===============================  ================================================

Exclusivity: one rhythm (sinus at normal rate, SBRAD, STACH or AFIB); no 1AVB in AFIB; LVH and
LVOLT exclusive; STE and STD exclusive. NORM records have none of the others; other records have
at least one finding. Records without LVH keep S(V1) + R(V5) at most 3.3 mV and, without LVOLT,
a limb-lead QRS of at least 0.7 mV, so the voltage labels are unambiguous.

Determinism: record ``i`` depends only on ``(seed, i)`` (its own ``numpy`` generator), so any
subset can be regenerated, in any order or process, with identical output. Patients: records
are grouped so that 4 patients have 5 records (patient of record i = ``4 * i // 5``).
Reports are English only (unlike PTB-XL's mostly German ones), with synonyms, abbreviations,
territory qualifiers, random order and several templates.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import numpy as np
import wfdb
from tqdm import tqdm

from ..atomic import write_csv_atomic
from ..leads import STANDARD_LEADS

FINDINGS: Dict[str, str] = {
    "NORM": "normal ECG",
    "SBRAD": "sinus bradycardia",
    "STACH": "sinus tachycardia",
    "AFIB": "atrial fibrillation",
    "1AVB": "first degree AV block",
    "BBB": "bundle branch block",
    "LVH": "left ventricular hypertrophy",
    "LVOLT": "low QRS voltage",
    "STE": "ST elevation",
    "STD": "ST depression",
    "INVT": "T wave inversion",
    "LNGQT": "long QT interval",
    "PVC": "premature ventricular complexes",
}

# Amplitudes (mV) of the normal waves on the independent leads I, II, V1..V6.
_INDEPENDENT = ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]
_BASE_AMPLITUDES = {
    "P": [0.08, 0.15, 0.06, 0.08, 0.08, 0.08, 0.07, 0.06],
    "Q": [-0.05, -0.04, 0.00, 0.00, 0.00, -0.03, -0.07, -0.07],
    "R": [0.70, 1.10, 0.25, 0.50, 0.80, 1.30, 1.40, 1.10],
    "S": [-0.10, -0.20, -0.90, -1.30, -0.80, -0.40, -0.20, -0.10],
    "T": [0.25, 0.30, -0.05, 0.35, 0.45, 0.40, 0.30, 0.25],
}
# Extra waves of the wide (right-bundle-like) QRS: R' in V1/V2, slurred S in I, V5, V6.
_BBB_R_PRIME = [0.0, 0.0, 0.60, 0.40, 0.10, 0.0, 0.0, 0.0]
_BBB_SLURRED_S = [-0.30, -0.10, 0.0, 0.0, -0.10, -0.20, -0.40, -0.40]
# f-wave weights in AF (largest in V1 and the inferior leads).
_F_WAVE_WEIGHTS = [0.15, 0.5, 1.0, 0.7, 0.4, 0.3, 0.2, 0.15]
# Lead territories (independent leads; derived leads follow through the limb-lead relations).
_TERRITORIES = {"inferior": ["II"], "lateral": ["I", "V5", "V6"], "anterior": ["V1", "V2", "V3", "V4"]}

# 12 x 8 map from the independent leads to STANDARD_LEADS.
_TO_12 = np.zeros((12, 8), dtype=np.float64)
for _row, _lead in enumerate(STANDARD_LEADS):
    if _lead in _INDEPENDENT:
        _TO_12[_row, _INDEPENDENT.index(_lead)] = 1.0
_TO_12[STANDARD_LEADS.index("III"), :2] = [-1.0, 1.0]
_TO_12[STANDARD_LEADS.index("aVR"), :2] = [-0.5, -0.5]
_TO_12[STANDARD_LEADS.index("aVL"), :2] = [1.0, -0.5]
_TO_12[STANDARD_LEADS.index("aVF"), :2] = [-0.5, 1.0]
_LIMB_ROWS = [STANDARD_LEADS.index(name) for name in ("I", "II", "III", "aVR", "aVL", "aVF")]

_SYNONYMS = {
    "SBRAD": ["sinus bradycardia", "slow sinus rhythm", "SB", "sinus rhythm with bradycardia", "bradycardic sinus rhythm"],
    "STACH": ["sinus tachycardia", "fast sinus rhythm", "sinus tach", "sinus rhythm with tachycardia"],
    "AFIB": ["atrial fibrillation", "AF", "AFib", "irregularly irregular rhythm without P waves"],
    "1AVB": ["first degree AV block", "1st degree atrioventricular block", "prolonged PR interval", "1AVB",
             "first-degree heart block"],
    "BBB": ["bundle branch block", "wide QRS complex", "BBB", "intraventricular conduction delay with wide QRS",
            "broad QRS"],
    "LVH": ["left ventricular hypertrophy", "LVH", "voltage criteria for LVH", "increased QRS voltage suggesting LVH"],
    "LVOLT": ["low QRS voltage", "low voltage QRS", "low limb lead voltage", "reduced QRS amplitudes"],
    "STE": ["ST elevation", "ST-segment elevation", "elevated ST segments", "STE"],
    "STD": ["ST depression", "ST-segment depression", "depressed ST segments", "STD"],
    "INVT": ["T wave inversion", "inverted T waves", "negative T waves", "TWI"],
    "LNGQT": ["long QT", "prolonged QT interval", "QT prolongation", "long QTc"],
    "PVC": ["premature ventricular complexes", "PVCs", "ventricular ectopic beats", "ventricular premature beats",
            "occasional PVCs"],
}
_NORMAL_REPORTS = ["Normal ECG.", "Sinus rhythm. Normal ECG.", "Within normal limits.", "Normal sinus rhythm.",
                   "Normal sinus rhythm, no acute abnormality.", "Normal electrocardiogram.",
                   "Sinus rhythm, normal tracing."]
_TEMPLATES = ["{}.", "ECG shows {}.", "Findings: {}.", "{}. Clinical correlation advised.", "Interpretation: {}.",
              "12-lead ECG with {}.", "Abnormal ECG: {}.", "Tracing demonstrates {}."]
_TERRITORY_PHRASES = ["in the {} leads", "({})", "in {} leads"]


@dataclass
class SyntheticECG:
    """One generated record: the signal with its findings, report and ground-truth parameters."""

    record_id: str
    patient_id: str
    signal: np.ndarray                 # [12, T] float32 mV, STANDARD_LEADS order
    sampling_rate: float
    findings: List[str]                # sorted codes
    report: str
    age: int
    sex: str
    params: Dict = field(default_factory=dict)  # heart rate, PR, QRS, QTc, territories, R peaks


def sample_findings(rng: np.random.Generator) -> List[str]:
    """A plausible finding set (see the module docstring for the exclusivity rules)."""
    if rng.random() < 0.22:
        return ["NORM"]
    findings = []
    rhythm = rng.choice(["SR", "SBRAD", "STACH", "AFIB"], p=[0.4, 0.2, 0.2, 0.2])
    if rhythm != "SR":
        findings.append(str(rhythm))
    if rhythm != "AFIB" and rng.random() < 0.25:
        findings.append("1AVB")
    if rng.random() < 0.2:
        findings.append("BBB")
    findings += [str(f) for f in [rng.choice(["", "LVH", "LVOLT"], p=[0.7, 0.15, 0.15]),
                                  rng.choice(["", "STE", "STD"], p=[0.7, 0.15, 0.15])] if f]
    findings += [code for code, p in (("INVT", 0.2), ("LNGQT", 0.15), ("PVC", 0.2)) if rng.random() < p]
    if not findings:
        findings.append(str(rng.choice(["1AVB", "BBB", "LVH", "LVOLT", "STE", "STD", "INVT", "LNGQT", "PVC"])))
    return sorted(findings)


def _pulses(centers: np.ndarray, sigma: float, weights: np.ndarray, fs: float, n: int) -> np.ndarray:
    """Sum of Gaussians ``weights[b] * exp(-(t - centers[b])^2 / 2 sigma^2)`` on ``n`` samples,
    evaluated only within 5 sigma of each centre."""
    half = int(np.ceil(5 * sigma * fs))
    idx = np.rint(centers * fs).astype(np.int64)[:, None] + np.arange(-half, half + 1)
    values = weights[:, None] * np.exp(-0.5 * ((idx / fs - centers[:, None]) / sigma) ** 2)
    inside = (idx >= 0) & (idx < n)
    return np.bincount(idx[inside], values[inside], minlength=n)


def _plateaus(starts: np.ndarray, ends: np.ndarray, edge: float, fs: float, n: int) -> np.ndarray:
    """Sum of smooth boxes from ``starts[b]`` to ``ends[b]`` (logistic edges of width ``edge``)."""
    half = int(np.ceil((np.max(ends - starts, initial=0.0) + 12 * edge) * fs))
    idx = np.rint((starts - 6 * edge) * fs).astype(np.int64)[:, None] + np.arange(half + 1)
    t = idx / fs
    values = 1.0 / (1.0 + np.exp(-(t - starts[:, None]) / edge)) - 1.0 / (1.0 + np.exp(-(t - ends[:, None]) / edge))
    inside = (idx >= 0) & (idx < n)
    return np.bincount(idx[inside], values[inside], minlength=n)


def _beat_times(rng: np.random.Generator, rr: float, irregular: bool, seconds: float) -> np.ndarray:
    """R-peak times covering [-1.5 s, seconds + 1.5 s]: respiratory modulation, or AF irregularity."""
    phase, resp_f, resp_a = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.33), rng.uniform(0.01, 0.04)
    times = [rng.uniform(-1.5, -1.5 + rr)]
    while times[-1] < seconds + 1.5:
        if irregular:
            step = rr * rng.uniform(0.6, 1.45)
        else:
            step = rr * (1 + resp_a * np.sin(2 * np.pi * resp_f * times[-1] + phase) + rng.normal(0, 0.01))
        times.append(times[-1] + step)
    return np.asarray(times)


def _qrs_waves(bbb: bool, width: float):
    """(name, centre offset from the R peak, sigma) of the QRS waves."""
    waves = [("Q", -0.022 * width, 0.008 * width), ("R", 0.0, 0.010 * width), ("S", 0.024 * width, 0.009 * width)]
    if bbb:
        waves += [("R'", 0.062, 0.014), ("S'", 0.070, 0.020)]
    return waves


def _template_qrs(amps: Dict[str, np.ndarray], waves, fs: float) -> np.ndarray:
    """One noise-free QRS on the 12 leads, for measuring and calibrating voltages."""
    t = np.arange(-0.15, 0.15, 1 / fs)
    qrs = sum(amps[name][:, None] * np.exp(-0.5 * ((t - c) / s) ** 2) for name, c, s in waves)
    return _TO_12 @ qrs


def synthesize_ecg(findings: List[str], rng: np.random.Generator, sampling_rate: float = 500.0,
                   seconds: float = 10.0, noise: bool = True):
    """The 12-lead signal ``[12, T]`` (float32 mV) for a finding set, and its ground-truth parameters."""
    fs, n = float(sampling_rate), int(round(sampling_rate * seconds))
    present = set(findings)
    t = np.arange(n) / fs

    if "SBRAD" in present:
        hr = rng.uniform(40, 55)
    elif "STACH" in present:
        hr = rng.uniform(105, 145)
    elif "AFIB" in present:
        hr = rng.uniform(70, 130)
    else:
        hr = rng.uniform(60, 95)
    rr = 60.0 / hr
    beats = _beat_times(rng, rr, "AFIB" in present, seconds)

    gains = rng.uniform(0.85, 1.15) * rng.uniform(0.85, 1.15, size=8)
    amps = {name: np.asarray(values) * gains for name, values in _BASE_AMPLITUDES.items()}
    amps["R'"], amps["S'"] = np.asarray(_BBB_R_PRIME) * gains, np.asarray(_BBB_SLURRED_S) * gains
    width = rng.uniform(1.6, 1.9) if "BBB" in present else rng.uniform(0.9, 1.1)
    waves = _qrs_waves("BBB" in present, width)
    qrs_onset = -0.022 * width - 2.5 * 0.008 * width
    qrs_end = max(c + 2.5 * s for _, c, s in waves)

    # Voltage calibration on a noise-free template: LVOLT shrinks the limb-lead QRS, LVH raises
    # S(V1) + R(V5); other records are kept clear of both criteria (the precordial cap leaves the
    # limb leads untouched, so the two corrections do not undo each other).
    qrs_names = ("Q", "R", "S", "R'", "S'")
    limb_ptp = np.ptp(_template_qrs(amps, waves, fs)[_LIMB_ROWS], axis=1).max()
    if "LVOLT" in present or limb_ptp < 0.7:
        target = rng.uniform(0.30, 0.45) if "LVOLT" in present else 0.7
        for name in qrs_names:
            amps[name] = amps[name] * (target / limb_ptp)
    v1, v5 = STANDARD_LEADS.index("V1"), STANDARD_LEADS.index("V5")
    template = _template_qrs(amps, waves, fs)
    sokolow = -template[v1].min() + template[v5].max()
    if "LVH" in present:
        factor = rng.uniform(3.8, 5.0) / sokolow
        for name, leads in (("R", ["I", "V4", "V5", "V6"]), ("S", ["V1", "V2", "V3"])):
            for lead in leads:
                amps[name][_INDEPENDENT.index(lead)] *= factor
    elif sokolow > 3.3:
        for name in qrs_names:
            amps[name][2:] *= 3.3 / sokolow
    template = _template_qrs(amps, waves, fs)

    params = {"heart_rate": float(hr), "qrs_width_factor": float(width),
              "sokolow_lyon_mv": float(-template[v1].min() + template[v5].max()),
              "limb_qrs_ptp_mv": float(np.ptp(template[_LIMB_ROWS], axis=1).max())}

    # PVCs replace sinus beats: early (55-70% of RR), followed by the sinus beat they displaced.
    pvc_times = np.zeros(0)
    if "PVC" in present:
        visible = np.flatnonzero((beats > 0.8) & (beats < seconds - 1.0))
        candidates = visible[1:]  # each PVC needs a preceding sinus beat
        chosen = np.sort(rng.choice(candidates, size=min(len(candidates), int(rng.integers(1, 4))), replace=False))
        chosen = chosen[np.insert(np.diff(chosen) > 1, 0, True)]  # no two PVCs in a row
        pvc_times = beats[chosen - 1] + rng.uniform(0.55, 0.70) * (beats[chosen] - beats[chosen - 1])
        beats = np.delete(beats, chosen)

    signal = np.zeros((8, n))
    modulation = 1 + 0.05 * np.sin(2 * np.pi * rng.uniform(0.2, 0.33) * beats + rng.uniform(0, 2 * np.pi))
    for name, offset, sigma in waves:
        signal += amps[name][:, None] * _pulses(beats + offset, sigma, modulation, fs, n)

    pr = rng.uniform(0.24, 0.34) if "1AVB" in present else rng.uniform(0.13, 0.19)
    if "AFIB" not in present:
        p_center = qrs_onset - pr + 0.05
        signal += amps["P"][:, None] * _pulses(beats + p_center, 0.022, modulation, fs, n)
        params["pr_s"] = float(pr)
    else:
        f_wave = sum(rng.uniform(0.5, 1.0) * np.sin(2 * np.pi * rng.uniform(4.5, 7.5) * t + rng.uniform(0, 2 * np.pi))
                     for _ in range(3))
        signal += np.outer(_F_WAVE_WEIGHTS, rng.uniform(0.03, 0.07) * f_wave * (1 + 0.3 * np.sin(2 * np.pi * 0.3 * t)))

    qtc = rng.uniform(0.49, 0.57) if "LNGQT" in present else rng.uniform(0.38, 0.43)
    t_sigma = rng.uniform(0.040, 0.050) * (1.2 if "LNGQT" in present else 1.0)
    t_center = qrs_onset + qtc * np.sqrt(rr) - 2.2 * t_sigma
    t_amps = amps["T"].copy()
    params.update(qtc_s=float(qtc), qt_s=float(qtc * np.sqrt(rr)), t_peak_after_r_s=float(t_center))
    if "INVT" in present:
        territory = str(rng.choice(list(_TERRITORIES)))
        for lead in _TERRITORIES[territory]:
            i = _INDEPENDENT.index(lead)
            t_amps[i] = -abs(_BASE_AMPLITUDES["T"][i]) * gains[i] * rng.uniform(0.8, 1.3)
        params["t_inversion_territory"] = territory
    signal += t_amps[:, None] * _pulses(beats + t_center, t_sigma, modulation, fs, n)
    if "STE" in present or "STD" in present:
        territory = str(rng.choice(list(_TERRITORIES)))
        shift = rng.uniform(0.15, 0.35) if "STE" in present else -rng.uniform(0.10, 0.25)
        st_amps = np.array([shift if lead in _TERRITORIES[territory] else 0.0 for lead in _INDEPENDENT])
        signal += st_amps[:, None] * _plateaus(beats + qrs_end, beats + t_center, 0.008, fs, n)
        params.update(st_territory=territory, st_shift_mv=float(shift))

    if len(pvc_times):
        # unifocal: one random direction per record; a wide biphasic QRS (~140-160 ms) and a
        # discordant T wave
        direction = rng.normal(0, 1, 8)
        pvc_qrs = direction / np.abs(direction).max() * rng.uniform(1.4, 2.4)
        ones = np.ones(len(pvc_times))
        signal += pvc_qrs[:, None] * _pulses(pvc_times, rng.uniform(0.016, 0.022), ones, fs, n)
        signal += -0.6 * pvc_qrs[:, None] * _pulses(pvc_times + 0.045, 0.02, ones, fs, n)
        signal += -0.35 * pvc_qrs[:, None] * _pulses(pvc_times + 0.32, 0.06, ones, fs, n)

    if noise:
        signal += _noise(rng, t)
    all_r = np.sort(np.concatenate([beats, pvc_times]))
    params.update(r_peaks_s=[float(b) for b in all_r if 0 <= b < seconds],
                  pvc_s=[float(b) for b in pvc_times])
    return (_TO_12 @ signal).astype(np.float32), params


def _noise(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """Baseline wander, white noise, sometimes mains hum and a burst of muscle noise (8 leads)."""
    n = len(t)
    wander = sum(rng.uniform(0, 0.12, (8, 1)) * np.sin(2 * np.pi * rng.uniform(0.05, 0.4, (8, 1)) * t
                                                      + rng.uniform(0, 2 * np.pi, (8, 1))) for _ in range(2))
    noise = wander + rng.normal(0, rng.uniform(0.005, 0.02), (8, n))
    if rng.random() < 0.3:
        noise += rng.uniform(0.005, 0.02) * np.sin(2 * np.pi * rng.choice([50.0, 60.0]) * t)
    if rng.random() < 0.2:
        start = rng.uniform(0, t[-1] - 2)
        burst = (t >= start) & (t < start + rng.uniform(1, 2))
        noise[:, burst] += rng.normal(0, 0.03, (8, int(burst.sum())))
    return noise


def compose_report(findings: List[str], params: Dict, rng: np.random.Generator) -> str:
    """An English report with varied synonyms, order and templates (see module docstring)."""
    if findings == ["NORM"]:
        return str(rng.choice(_NORMAL_REPORTS))
    phrases = []
    for code in findings:
        phrase = str(rng.choice(_SYNONYMS[code]))
        territory = params.get("t_inversion_territory" if code == "INVT" else "st_territory")
        if code in ("INVT", "STE", "STD") and rng.random() < 0.5:
            phrase += " " + str(rng.choice(_TERRITORY_PHRASES)).format(territory)
        phrases.append(phrase)
    rng.shuffle(phrases)
    if not {"SBRAD", "STACH", "AFIB"} & set(findings) and rng.random() < 0.5:
        phrases.insert(0, "sinus rhythm")
    if len(phrases) == 1:
        joined = phrases[0]
    elif rng.random() < 0.5:
        joined = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    else:
        joined = str(rng.choice([", ", "; "])).join(phrases)
    report = str(rng.choice(_TEMPLATES)).format(joined)
    if rng.random() < 0.3:
        report += f" Ventricular rate {int(round(params['heart_rate']))} bpm."
    return report[0].upper() + report[1:]


def generate_record(index: int, seed: int = 0, sampling_rate: float = 500.0, seconds: float = 10.0,
                    noise: bool = True) -> SyntheticECG:
    """Record ``index`` of the synthetic collection for ``seed`` (depends on nothing else)."""
    rng = np.random.default_rng([int(seed), int(index)])
    findings = sample_findings(rng)
    signal, params = synthesize_ecg(findings, rng, sampling_rate, seconds, noise=noise)
    return SyntheticECG(
        record_id=f"syn{index + 1:05d}",
        patient_id=f"P{4 * index // 5 + 1:05d}",
        signal=signal,
        sampling_rate=float(sampling_rate),
        findings=findings,
        report=compose_report(findings, params, rng),
        age=int(rng.integers(18, 91)),
        sex=str(rng.choice(["M", "F"])),
        params=params,
    )


def _write_record(job) -> dict:
    """Generate record ``index`` and write it as WFDB; returns its ``records.csv`` row."""
    index, seed, sampling_rate, seconds, output_dir = job
    record = generate_record(index, seed, sampling_rate, seconds)
    rel_dir = Path("records") / f"{index // 1000 * 1000:05d}"
    (output_dir / rel_dir).mkdir(parents=True, exist_ok=True)
    digital = np.clip(np.rint(record.signal.T.astype(np.float64) * 1000), -32767, 32767).astype(np.int16)
    wfdb.wrsamp(record.record_id, fs=sampling_rate, units=["mV"] * 12, sig_name=list(STANDARD_LEADS),
                d_signal=digital, fmt=["16"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12,
                write_dir=str(output_dir / rel_dir))
    return {"id": record.record_id, "path": (rel_dir / record.record_id).as_posix(), "patient": record.patient_id,
            "report": record.report, "labels": ";".join(record.findings), "age": record.age, "sex": record.sex}


def write_synthetic_dataset(output_dir, n: int, seed: int = 0, sampling_rate: float = 500.0,
                            seconds: float = 10.0, workers: int = 1, progress: bool = True) -> Path:
    """Write ``n`` WFDB records, ``records.csv`` and ``label_names.csv``; returns the CSV path.

    Records are independent, so ``workers`` processes produce the same files as one.
    """
    if n <= 0 or workers <= 0:
        raise ValueError(f"n and workers must be positive, got n={n}, workers={workers}")
    output_dir = Path(output_dir)
    jobs = [(index, seed, sampling_rate, seconds, output_dir) for index in range(n)]
    bar = dict(total=n, desc="synth", unit="rec", disable=not progress, file=sys.stderr)
    if workers == 1:
        rows = [_write_record(job) for job in tqdm(jobs, **bar)]
    else:
        with multiprocessing.Pool(workers) as pool:
            rows = list(tqdm(pool.imap(_write_record, jobs, chunksize=16), **bar))
    write_csv_atomic(output_dir / "label_names.csv", ["code", "name"],
                     [{"code": c, "name": name} for c, name in FINDINGS.items()])
    csv_path = output_dir / "records.csv"
    write_csv_atomic(csv_path, list(rows[0]), rows)
    return csv_path


def add_arguments(parser) -> None:
    parser.add_argument("--output", required=True, help="folder for records/, records.csv and label_names.csv")
    parser.add_argument("--n", type=int, default=2000, help="number of records (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="record i depends only on (seed, i)")
    parser.add_argument("--sampling-rate", type=float, default=500.0, help="Hz (default 500)")
    parser.add_argument("--seconds", type=float, default=10.0, help="record length (default 10)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes (default: CPU count, at most 8); the output does not depend on it")


def run(args) -> int:
    csv_path = write_synthetic_dataset(args.output, args.n, args.seed, args.sampling_rate, args.seconds,
                                       args.workers)
    print(f"wrote {args.n} synthetic records and {csv_path}\n"
          f"next: open-clip-ecg shards --format csv --input {csv_path} --output SHARD_DIR")
    return 0
