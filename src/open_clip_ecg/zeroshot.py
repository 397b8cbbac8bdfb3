"""Zero-shot multi-label ECG classification: finding prompts -> classifier -> per-finding probabilities.

Works on any open_clip model (``CLIP`` / ``CustomTextCLIP``) with an ECG tower, through its public
surface only (``encode_image``, ``encode_text``, ``logit_scale``, ``logit_bias``), so it needs no
training code. Unlike ``open_clip.build_zero_shot_classifier`` (softmax over exclusive classes),
each finding is scored on its own with the SigLIP pair probability

    p(finding k | ECG i) = sigmoid(exp(logit_scale) * cos(ecg_i, text_k) + logit_bias),

the quantity the sigmoid loss trains, so findings co-occur freely.
"""
from contextlib import contextmanager
from typing import Callable, List, Mapping, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .data.text import FINDING_TEMPLATES

Template = Union[str, Callable[[str], str]]

# Reports in PTB-XL and similar sets are terse statements ("sinus rhythm. left axis deviation."),
# so the bare finding name is one prompt; the others phrase it as a description of a recording.
# They are the phrasings training texts use too (--ecg-text sampled).
DEFAULT_TEMPLATES = FINDING_TEMPLATES


def build_zeroshot_classifier(
        model,
        tokenizer,
        findings: Union[Sequence[str], Mapping[str, Sequence[str]]],
        templates: Sequence[Template] = DEFAULT_TEMPLATES,
        device: Union[str, torch.device, None] = None,
        batch_size: int = 256,
) -> torch.Tensor:
    """Text embedding per finding, ``[n_findings, embed_dim]``, L2-normalised.

    Args:
        model: open_clip model with ``encode_text``.
        tokenizer: the model's tokenizer (``open_clip.get_tokenizer(name)``).
        findings: finding names, or ``{finding: [name, synonym, ...]}``; rows follow this order.
        templates: ``str.format`` strings with one ``{}`` or callables ``name -> text``.
        device: where to run the text tower; default the model's device.
        batch_size: prompts per text-tower forward.

    Each prompt (template x name/synonym) is encoded and normalised; a finding's embedding is the
    mean over all its prompts, renormalised (open_clip's prompt ensembling, equal weight per prompt).
    """
    synonyms = _finding_synonyms(findings)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device

    texts, owners = prompt_texts(findings, templates)

    with _inference(model):
        embeddings = torch.cat([
            model.encode_text(tokenizer(texts[start:start + batch_size]).to(device), normalize=True).float()
            for start in range(0, len(texts), batch_size)
        ])
    owners = torch.tensor(owners, device=embeddings.device)
    summed = embeddings.new_zeros(len(synonyms), embeddings.shape[1]).index_add_(0, owners, embeddings)
    return F.normalize(summed, dim=-1)


class PromptEmbeddingCache:
    """`model`, with ``encode_text`` remembering each token row: choosing scoring rules on validation
    data scores the same prompts under many rules, and each prompt is encoded once."""

    def __init__(self, model):
        self.model, self.cache = model, {}

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode_text(self, tokens, normalize: bool = False):
        keys = [(normalize, tuple(row.tolist())) for row in tokens]
        missing = [i for i, key in enumerate(keys) if key not in self.cache]
        if missing:
            for i, embedding in zip(missing, self.model.encode_text(tokens[missing], normalize=normalize)):
                self.cache[keys[i]] = embedding
        return torch.stack([self.cache[key] for key in keys])


def prompt_texts(
        findings: Union[Sequence[str], Mapping[str, Sequence[str]]],
        templates: Sequence[Template] = DEFAULT_TEMPLATES,
) -> Tuple[List[str], List[int]]:
    """Every prompt (template x name/synonym) and the finding index it belongs to, in order.

    Also what ``open-clip-ecg text-cache`` embeds ahead of time for a label vocabulary.
    """
    templates = _checked_templates(templates)
    texts, owners = [], []
    for index, names in enumerate(_finding_synonyms(findings)):
        for name in names:
            for template in templates:
                texts.append(template.format(name) if isinstance(template, str) else template(name))
                owners.append(index)
    return texts, owners


def encode_ecg(
        model,
        ecg: Union[torch.Tensor, np.ndarray],
        batch_size: int = 64,
        normalize: bool = True,
) -> torch.Tensor:
    """ECG embeddings ``[N, embed_dim]`` (float32, on the model's device) in eval mode, without grad.

    ``ecg`` is ``[N, leads, samples]`` floating point (a float16 array read from shards is fine; each
    batch is cast to the model's dtype). Lead count, length and finiteness are checked by the tower.
    """
    ecg = torch.as_tensor(ecg)
    if ecg.ndim != 3 or ecg.shape[0] == 0 or not ecg.is_floating_point():
        raise ValueError(
            f"ecg must be a non-empty floating tensor [N, leads, samples], got shape {tuple(ecg.shape)} "
            f"and dtype {ecg.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    parameter = next(model.parameters())
    with _inference(model):
        return torch.cat([
            model.encode_image(
                ecg[start:start + batch_size].to(parameter.device, parameter.dtype), normalize=normalize).float()
            for start in range(0, ecg.shape[0], batch_size)
        ])


def predict_proba(model, classifier: torch.Tensor, ecg: Union[torch.Tensor, np.ndarray], batch_size: int = 64):
    """Per-finding probabilities ``[N, n_findings]`` for a batch of ECGs.

    The model must have a ``logit_bias`` (trained with a sigmoid loss): without one, the
    ``sigmoid(scale * cos)`` of a softmax-trained CLIP is no probability, so that raises ValueError.
    """
    if getattr(model, "logit_bias", None) is None:
        raise ValueError(
            "model has no logit_bias: it was not trained with a sigmoid (SigLIP) loss, so "
            "sigmoid(logit_scale * cos) is not a calibrated probability; use a model config with "
            "init_logit_bias (all ECG configs have one) trained with --siglip")
    embeddings = encode_ecg(model, ecg, batch_size=batch_size)
    with torch.no_grad():
        return predict_proba_from_embeddings(embeddings, classifier, model.logit_scale.exp(), model.logit_bias)


def predict_proba_from_embeddings(
        ecg_embeddings: torch.Tensor,
        classifier: torch.Tensor,
        logit_scale: Union[float, torch.Tensor],
        logit_bias: Union[float, torch.Tensor],
) -> torch.Tensor:
    """``sigmoid(logit_scale * cos + logit_bias)``, ``[N, n_findings]``, from precomputed embeddings.

    ``logit_scale`` is the multiplier itself, i.e. ``model.logit_scale.exp()`` (what the model's
    forward returns as ``logit_scale``), not the log-parameter. Both inputs are L2-normalised here.
    """
    if ecg_embeddings.ndim != 2 or classifier.ndim != 2 or ecg_embeddings.shape[1] != classifier.shape[1]:
        raise ValueError(
            f"expected ecg_embeddings [N, embed_dim] and classifier [n_findings, embed_dim], got "
            f"{tuple(ecg_embeddings.shape)} and {tuple(classifier.shape)}")
    cos = F.normalize(ecg_embeddings.float(), dim=-1) @ F.normalize(classifier.float(), dim=-1).T.to(ecg_embeddings.device)
    return torch.sigmoid(torch.as_tensor(logit_scale).float() * cos + torch.as_tensor(logit_bias).float())


def _finding_synonyms(findings) -> List[Sequence[str]]:
    if isinstance(findings, str):
        raise ValueError(f"findings must be a list of names or a dict of synonyms, got the string {findings!r}")
    synonyms = list(findings.values()) if isinstance(findings, Mapping) else [[name] for name in findings]
    if not synonyms:
        raise ValueError("findings is empty: give at least one finding name")
    for finding, names in zip(findings, synonyms):
        if isinstance(names, str) or len(names) == 0:
            raise ValueError(f"finding {finding!r} needs a non-empty list of names, got {names!r}")
        if not all(isinstance(name, str) and name.strip() for name in names):
            raise ValueError(f"finding {finding!r}: names must be non-empty strings, got {names!r}")
    return synonyms


def _checked_templates(templates) -> Sequence[Template]:
    if isinstance(templates, str) or len(templates) == 0:
        raise ValueError(f"templates must be a non-empty sequence of '{{}}' strings or callables, got {templates!r}")
    for template in templates:
        if isinstance(template, str) and template.count("{}") != 1:
            raise ValueError(f"template {template!r} must contain exactly one '{{}}' for the finding name")
    return templates


@contextmanager
def _inference(model):
    """Eval mode and no grad for the duration; the model's train/eval state is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
