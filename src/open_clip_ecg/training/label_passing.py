"""The model forward that carries each batch's labels from the loader to the loss.

open_clip_train's loop does ``images, texts = batch`` and calls ``loss(**model_out)``, so the only
per-sample channel from loader to loss is the batch itself. The multi-hot labels are packed into
each text row (:mod:`open_clip_ecg.data.pipeline`), which keeps them aligned through
``.to(device)``, DDP and ``--accum-freq`` caches; a fingerprint taken when the sample is read is
checked on every forward (the label-alignment contract), and the forward returns the labels as
``labels``/``text_labels`` next to the features. The same forward encodes texts without their
padding (:mod:`open_clip_ecg.unpadded_text`): exact, and most of a CPU step's text work saved.
"""
from __future__ import annotations

import types
from typing import Optional

import torch

from ..data.pipeline import fingerprint, unpack_text_and_labels
from ..unpadded_text import enable_unpadded_text
from .finding_texts import FindingTextTokens


class LabelAlignmentError(RuntimeError):
    """The labels in a batch are not those of the batch's texts."""


def check_label_alignment(tokens: torch.Tensor, labels: torch.Tensor, text_labels: torch.Tensor,
                          carried: torch.Tensor) -> None:
    """Raise LabelAlignmentError if any row's labels are not the ones read with its text."""
    mismatch = fingerprint(tokens, labels, text_labels) != carried
    if bool(mismatch.any()):
        rows = mismatch.nonzero().flatten().tolist()
        raise LabelAlignmentError(
            f"labels of {len(rows)}/{len(carried)} samples in this batch do not belong to their text "
            f"(rows {rows[:8]}): the data pipeline paired labels with the wrong samples")


def _labelled_forward(self, image=None, text=None, finding_tokens: Optional[FindingTextTokens] = None):
    """CLIP.forward for packed text rows: returns the batch's ECG and text labels with the features,
    and with `finding_tokens` the embedded finding texts of this step (``finding_features``)."""
    if text is None:
        return type(self).forward(self, image, None)
    packed = unpack_text_and_labels(text)
    check_label_alignment(packed.tokens, packed.labels, packed.text_labels, packed.fingerprint)
    out = type(self).forward(self, image, packed.tokens)
    out["labels"], out["text_labels"] = packed.labels, packed.text_labels
    if finding_tokens is not None and image is not None and self.training:  # only the loss uses them
        # inside forward, so DDP sees the text tower's use and --accum-freq caches them like features
        out["finding_features"] = self.encode_text(finding_tokens().to(packed.tokens.device), normalize=True)
    return out


def enable_label_passing(model: torch.nn.Module,
                         finding_tokens: Optional[FindingTextTokens] = None) -> torch.nn.Module:
    """Make `model` accept packed (labels + tokens) text rows (and embed the finding texts with
    each batch when given), encoding texts without their padding; weights and state_dict unchanged."""
    enable_unpadded_text(model)

    def forward(self, image=None, text=None):  # a plain function: torch.compile needs its source file
        return _labelled_forward(self, image, text, finding_tokens)

    model.forward = types.MethodType(forward, model)
    return model
