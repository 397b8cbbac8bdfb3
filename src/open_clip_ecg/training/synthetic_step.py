"""One training step of a model on a random batch: what a step costs, apart from the data.

The benchmarks (the tower's consumption beside the loader's rate) and the study's ablation table
(step time per embedding dimension) time the same thing: label-passing forward, the multi-label
SigLIP loss, backward and an AdamW step, as ``open_clip_ecg.train`` runs them.
"""
from __future__ import annotations

from typing import Callable, Tuple

import open_clip
import torch

from ..data.pipeline import pack_text_and_labels
from ..loss import MultiLabelSigLipLoss
from .label_passing import enable_label_passing

N_LABELS = 71  # PTB-XL's statements: the width of the packed multi-hot


def synthetic_training_step(model_name: str, batch_size: int, samples: int, device="cpu", precision: str = "fp32",
                            **model_kwargs) -> Tuple[torch.nn.Module, Callable[[], None]]:
    """(model, step): `model_name` built as training builds it, and a closure running one step on a
    fixed random batch of `batch_size` ECGs of `samples` samples (every channel the tower takes)
    with short texts and 10 % positive labels. ``model_kwargs`` go to ``open_clip.create_model``."""
    from open_clip_train.precision import get_autocast

    model = enable_label_passing(open_clip.create_model(model_name, output_dict=True, device=device,
                                                        precision=precision, **model_kwargs))
    model.train()
    tokens = open_clip.get_tokenizer(model_name)([f"sinus rhythm, report {i}" for i in range(batch_size)])
    labels = (torch.rand(batch_size, N_LABELS) < 0.1).float()
    packed = torch.stack([pack_text_and_labels(t, y) for t, y in zip(tokens, labels)]).to(device)
    ecg = torch.randn(batch_size, model.visual.trunk.in_chans, samples, device=device)
    loss, optimizer = MultiLabelSigLipLoss(), torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = get_autocast(precision, device_type=torch.device(device).type)

    def step() -> None:
        optimizer.zero_grad()
        with autocast():
            total = sum(loss(**model(ecg, packed), output_dict=True).values())
        total.backward()
        optimizer.step()

    return model, step
