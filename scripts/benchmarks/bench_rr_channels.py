"""RR channels: what beat detection costs, against wfdb's XQRS and against a training step.

Ratios, all measured in this one run on synthetic 10 s, 12-lead records:
* ``xqrs_vs_ours_100hz`` / ``xqrs_vs_ours_500hz``: seconds per record of wfdb's XQRS (one lead,
  resampled to 250 Hz from 100 Hz as it needs) over :func:`open_clip_ecg.data.rhythm.detect_beats`
  (all 12 leads);
* ``preparer_rr_vs_plain``: seconds per sample of the training sample preparation (normalise, crop)
  with the RR channels over without them, 100 Hz;
* ``rr_channels_vs_training_step``: the RR channels' cost per record over the forward and backward
  of one sample of ECG-RN18-RR-CLIPText's ECG tower in a batch of 64 (5 s crop at 100 Hz).

    python scripts/benchmarks/bench_rr_channels.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import timm
import torch
from scipy.signal import resample_poly
from wfdb.processing import xqrs_detect

import open_clip_ecg  # noqa: F401  (registers the towers)
from open_clip_ecg.data.pipeline import ECGSamplePreparer
from open_clip_ecg.data.rhythm import detect_beats, rr_channels
from open_clip_ecg.data.synthetic import synthesize_ecg
from open_clip_ecg.leads import LEAD_SETS


def _records(n: int, rate: float):
    rng = np.random.default_rng(0)
    findings = (["NORM"], ["AFIB"], ["SBRAD"], ["STACH"])
    return [synthesize_ecg(findings[i % len(findings)], rng, sampling_rate=rate)[0].astype(np.float32)
            for i in range(n)]


def _per_call(fn, items, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        for item in items:
            fn(item)
    return (time.perf_counter() - start) / (repeat * len(items))


def _xqrs(signal: np.ndarray, rate: float) -> np.ndarray:
    lead = signal[1].astype(np.float64)
    if rate < 250:
        lead, rate = resample_poly(lead, 250, int(rate)), 250
    return xqrs_detect(lead, fs=rate, verbose=False)


def run(quick: bool = False, device: str = "cpu") -> dict:
    n = 8 if quick else 40
    records = {rate: _records(n, rate) for rate in (100, 500)}
    ours = {rate: _per_call(lambda s, r=rate: detect_beats(s, r), records[rate]) for rate in records}
    xqrs = {rate: _per_call(lambda s, r=rate: _xqrs(s, r), records[rate]) for rate in records}
    channels = _per_call(lambda s: rr_channels(s, 100), records[100])
    samples = [{"ecg": s} for s in records[100]]
    plain = ECGSamplePreparer(500, 1, train=True, leads=LEAD_SETS["12"], sampling_rate=100)
    with_rr = ECGSamplePreparer(500, 1, train=True, leads=LEAD_SETS["12+rr"], sampling_rate=100)
    prepare_plain = _per_call(plain.ecg, samples, repeat=3)
    prepare_rr = _per_call(with_rr.ecg, samples, repeat=3)
    tower = timm.create_model("ecg_resnet1d18_rr").to(device)
    batch = torch.randn(16 if quick else 64, 14, 500, device=device)
    steps = 1 if quick else 3
    tower(batch).sum().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        tower(batch).sum().backward()
    step_per_sample = (time.perf_counter() - start) / (steps * len(batch))
    return {
        "name": "rr_channels",
        "figures": {
            "records": n, "ours_ms_100hz": 1e3 * ours[100], "ours_ms_500hz": 1e3 * ours[500],
            "xqrs_ms_100hz_via_250": 1e3 * xqrs[100], "xqrs_ms_500hz": 1e3 * xqrs[500],
            "rr_channels_ms_100hz": 1e3 * channels, "prepare_ms_plain": 1e3 * prepare_plain,
            "prepare_ms_rr": 1e3 * prepare_rr, "tower_step_ms_per_sample": 1e3 * step_per_sample,
        },
        "ratios": {
            "xqrs_vs_ours_100hz": xqrs[100] / ours[100],
            "xqrs_vs_ours_500hz": xqrs[500] / ours[500],
            "preparer_rr_vs_plain": prepare_rr / prepare_plain,
            "rr_channels_vs_training_step": channels / step_per_sample,
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(json.dumps(run(parser.parse_args().quick), indent=2))
