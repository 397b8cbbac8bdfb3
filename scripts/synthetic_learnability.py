"""Is the synthetic ECG collection learnable? A small supervised 1-D CNN, CPU, a few minutes.

Generates ``--n`` records in memory (the same records ``open-clip-ecg synth --seed S`` writes),
holds out the last 20% (disjoint patients: patient of record i is ``4 * i // 5``), trains a
5-layer 1-D CNN with BCE on the 13 finding labels, and reports the held-out AUROC per finding
and its macro average (scikit-learn). Input: 250 Hz (``scipy.signal.decimate``), leads centred
on their median (the default ECG normalisation, amplitudes kept in mV).

    python scripts/synthetic_learnability.py [--n 1500] [--epochs 10] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy.signal import decimate
from sklearn.metrics import roc_auc_score
from torch import nn

from open_clip_ecg.data.synthetic import FINDINGS, generate_record
from open_clip_ecg.data.transforms import Normalize


class SmallCNN(nn.Module):
    """Five strided conv blocks (receptive field ~0.5 s at 250 Hz, enough for PR and QT), then
    average pooling (rhythm, morphology) concatenated with max pooling (rare beats such as PVCs)."""

    def __init__(self, n_leads: int, n_labels: int):
        super().__init__()
        widths = [n_leads, 32, 64, 64, 128, 128]
        kernels = [9, 7, 5, 5, 5]
        self.features = nn.Sequential(*[
            layer for c_in, c_out, k in zip(widths, widths[1:], kernels)
            for layer in (nn.Conv1d(c_in, c_out, k, stride=2, padding=k // 2, bias=False), nn.BatchNorm1d(c_out),
                          nn.ReLU())])
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(2 * widths[-1], n_labels))

    def forward(self, x):
        features = self.features(x)
        return self.head(torch.cat([features.mean(dim=-1), features.amax(dim=-1)], dim=1))


def dataset(n: int, seed: int):
    codes = list(FINDINGS)
    normalize = Normalize("center")
    signals, targets = [], []
    for index in range(n):
        record = generate_record(index, seed)
        signals.append(normalize(decimate(record.signal, 2, axis=1).astype(np.float32)))
        targets.append([code in record.findings for code in codes])
    return torch.stack(signals), torch.tensor(targets, dtype=torch.float32), codes


def run(n: int = 1500, epochs: int = 10, seed: int = 0, batch_size: int = 64) -> dict:
    torch.manual_seed(seed)
    start = time.perf_counter()
    x, y, codes = dataset(n, seed)
    n_train = int(0.8 * n)  # patient of record i is 4i//5: records split at a multiple of 5 share no patient
    n_train -= n_train % 5
    generated = time.perf_counter() - start
    model = SmallCNN(x.shape[1], y.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * -(-n_train // batch_size))
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(n_train).split(batch_size):
            optimizer.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        scores = torch.sigmoid(model(x[n_train:])).numpy()
    truth = y[n_train:].numpy()
    per_finding = {code: round(float(roc_auc_score(truth[:, i], scores[:, i])), 4) for i, code in enumerate(codes)}
    return {
        "records": {"train": n_train, "held_out": n - n_train},
        "epochs": epochs,
        "macro_auroc": round(float(np.mean(list(per_finding.values()))), 4),
        "auroc_per_finding": per_finding,
        "held_out_positives": {code: int(truth[:, i].sum()) for i, code in enumerate(codes)},
        "seconds": {"generate": round(generated, 1), "total": round(time.perf_counter() - start, 1)},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1500)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    print(json.dumps(run(cli.n, cli.epochs, cli.seed), indent=2))
