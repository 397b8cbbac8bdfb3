"""One training step of a model on a random batch: what a step costs, apart from the data.

The benchmarks (the tower's consumption beside the loader's rate) and the study's ablation table
(step time per embedding dimension) time the same thing: label-passing forward, the multi-label
SigLIP loss, backward and an AdamW step, as ``open_clip_ecg.train`` runs them.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple, Union

import open_clip
import torch

from ..data.pipeline import pack_text_and_labels
from ..loss import MultiLabelSigLipLoss
from .label_passing import enable_label_passing

N_LABELS = 71  # PTB-XL's statements: the width of the packed multi-hot


class TrainingParts(NamedTuple):
    """A model built as training builds it, its loss and optimiser, and ``step(ecg, packed)``: one
    forward (under the precision's autocast), backward and optimiser step on a batch."""

    model: torch.nn.Module
    loss: MultiLabelSigLipLoss
    optimizer: torch.optim.Optimizer
    step: Callable[[torch.Tensor, torch.Tensor], None]


def training_parts(model_name: str, device="cpu", precision: str = "fp32",
                   compile_backend: Optional[Union[str, Callable]] = None, **model_kwargs) -> TrainingParts:
    """:class:`TrainingParts` of `model_name`; ``model_kwargs`` go to ``open_clip.create_model``.
    With `compile_backend` the step runs ``torch.compile(model, backend=...)``, as
    ``--torchcompile`` does (with inductor)."""
    from open_clip_train.precision import get_autocast

    model = enable_label_passing(open_clip.create_model(model_name, output_dict=True, device=device,
                                                        precision=precision, **model_kwargs))
    model.train()
    loss, optimizer = MultiLabelSigLipLoss(), torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = get_autocast(precision, device_type=torch.device(device).type)
    forward = torch.compile(model, backend=compile_backend) if compile_backend else model

    def step(ecg: torch.Tensor, packed: torch.Tensor) -> None:
        optimizer.zero_grad()
        with autocast():
            total = sum(loss(**forward(ecg, packed), output_dict=True).values())
        total.backward()
        optimizer.step()

    return TrainingParts(model, loss, optimizer, step)


def synthetic_training_step(model_name: str, batch_size: int, samples: int, device="cpu", precision: str = "fp32",
                            **model_kwargs) -> Tuple[torch.nn.Module, Callable[[], None]]:
    """(model, step): :func:`training_parts` of `model_name`, and a closure running one step on a
    fixed random batch of `batch_size` ECGs of `samples` samples (every channel the tower takes)
    with short texts and 10 % positive labels."""
    parts = training_parts(model_name, device, precision, **model_kwargs)
    tokens = open_clip.get_tokenizer(model_name)([f"sinus rhythm, report {i}" for i in range(batch_size)])
    labels = (torch.rand(batch_size, N_LABELS) < 0.1).float()
    packed = torch.stack([pack_text_and_labels(t, y) for t, y in zip(tokens, labels)]).to(device)
    ecg = torch.randn(batch_size, parts.model.visual.trunk.in_chans, samples, device=device)
    return parts.model, lambda: parts.step(ecg, packed)
