"""Decoder-only language models (Qwen3, Llama, Gemma, Mistral, ...) as text encoders.

A causal LM has no pooler and no CLS token: a text's embedding is the hidden state of its last
token (which attends to the whole text) or the mean over its tokens. That is only right if the
last token is where we think it is, so this module owns the three things that must agree:

* :class:`DecoderLMTokenizer`: text -> ``[B, context_length]`` int64 ids, EOS appended to every
  text (truncated texts keep it), right padding marked with :data:`PAD` (-1) rather than a pad
  token id. Many decoder tokenizers have no pad token or reuse EOS as pad, so ``ids != pad_id``
  would drop the EOS the pooling reads; the sentinel carries the attention mask inside the ids
  (one int tensor is all open_clip's loop and our label packing pass around).
* :class:`DecoderLM`: the base model (``AutoModel``: no LM head) + pooling over the real tokens.
  Right padding keeps position ids and the causal prefix of every text unchanged, so pooling a
  padded batch equals pooling each text alone.
* :func:`check_special_tokens`: a tokenizer without EOS, or whose EOS/pad ids disagree with the
  model's config or vocabulary, is refused with the file to fix, never pooled silently wrong.

:func:`model_identity` fingerprints a model folder (config, tokenizer, weight files) plus the
pooling, for cache keys (:mod:`open_clip_ecg.text_cache`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import List, Sequence, Union

import torch
from torch import nn

__all__ = ["PAD", "POOLINGS", "DecoderLM", "DecoderLMTokenizer", "check_special_tokens", "is_decoder_lm_folder",
           "lm_dtype", "model_identity", "pool_hidden"]

PAD = -1  # padding marker in token ids (never a vocabulary id)
POOLINGS = ("last", "mean")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "tokenizer.model", "spiece.model")
_EDGE_BYTES = 1 << 20  # bytes hashed from each end of a weight file


def _read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def is_decoder_lm_folder(folder: Union[str, Path]) -> bool:
    """True for a causal-LM-only architecture (Qwen3, Llama, ...); False for BERT-like encoders.

    transformers lists BERT-likes under both causal and masked LM; decoder-only families only
    under causal LM.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = _read_config(Path(folder)).get("model_type")
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def lm_dtype(name: str) -> torch.dtype:
    """'auto' -> bfloat16 when a GPU is present (an 8B model is 16 GB there), else float32."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"LM dtype must be 'auto' or one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def _as_id_list(value) -> List[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def check_special_tokens(folder: Union[str, Path], tokenizer) -> int:
    """Validate EOS/pad of `tokenizer` against the model config in `folder`; returns the EOS id."""
    folder = Path(folder)
    config = _read_config(folder)
    text_config = config.get("text_config", config)  # multimodal folders nest the LM config
    vocab_size = text_config.get("vocab_size")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            f"{folder}: the tokenizer has no EOS token: set 'eos_token' in tokenizer_config.json. "
            "A decoder's text embedding is read at the EOS token appended to each text")
    model_eos = _as_id_list(text_config.get("eos_token_id", config.get("eos_token_id")))
    if model_eos and eos not in model_eos:
        raise ValueError(
            f"{folder}: the tokenizer's EOS {tokenizer.eos_token!r} (id {eos}) is not the model's EOS "
            f"(config.json eos_token_id {model_eos}); fix tokenizer_config.json 'eos_token' or config.json")
    ids = {"EOS": [eos], "tokenizer pad": _as_id_list(tokenizer.pad_token_id),
           "config.json pad_token_id": _as_id_list(text_config.get("pad_token_id"))}
    if vocab_size is not None:
        for what, values in ids.items():
            bad = [v for v in values if not 0 <= v < int(vocab_size)]
            if bad:
                raise ValueError(f"{folder}: {what} id {bad[0]} is outside the model's vocabulary "
                                 f"(config.json vocab_size {vocab_size})")
    return eos


class DecoderLMTokenizer:
    """Texts -> ``[B, context_length]`` ids: BOS as the tokenizer adds it, the text, EOS, then PAD."""

    def __init__(self, folder: Union[str, Path], context_length: int = 128, **_ignored):
        from open_clip.tokenizer import get_clean_fn
        from transformers import AutoTokenizer

        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (text + EOS), got {context_length}")
        self.folder = Path(folder)
        self.context_length = context_length
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        self.eos_id = check_special_tokens(self.folder, self.tokenizer)
        self.clean = get_clean_fn("whitespace")

    def __call__(self, texts: Union[str, Sequence[str]], context_length: int = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        encoded = self.tokenizer([self.clean(t) for t in texts], add_special_tokens=True,
                                 truncation=True, max_length=length - 1).input_ids
        out = torch.full((len(texts), length), PAD, dtype=torch.long)
        for row, ids in enumerate(encoded):
            if not ids or ids[-1] != self.eos_id:
                ids = ids + [self.eos_id]
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, T, H] hidden states, [B, T] right-padded mask -> [B, H]: last real token or masked mean."""
    if pooling == "last":
        last = mask.long().sum(1) - 1
        return hidden[torch.arange(len(hidden), device=hidden.device), last]
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers prints a load report for the LM head we leave out on purpose."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


class DecoderLM(nn.Module):
    """A decoder LM's base model + pooling: ids from :class:`DecoderLMTokenizer` -> float32 [B, H]."""

    def __init__(self, folder: Union[str, Path], pooling: str = "last", pretrained: bool = True,
                 dtype: str = "auto"):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if pooling not in POOLINGS:
            raise ValueError(f"decoder pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        torch_dtype = lm_dtype(dtype)
        with _quiet_transformers():
            if pretrained:
                self.transformer = AutoModel.from_pretrained(str(folder), dtype=torch_dtype)
            else:  # weights come from an open_clip checkpoint
                self.transformer = AutoModel.from_config(AutoConfig.from_pretrained(str(folder)), dtype=torch_dtype)
        self.hidden_size = int(self.transformer.config.get_text_config().hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != PAD
        width = int(mask.sum(1).max())  # right padding: columns past the longest text are all PAD
        ids, mask = ids[:, :width], mask[:, :width]
        hidden = self.transformer(input_ids=ids.clamp(min=0), attention_mask=mask.long(),
                                  use_cache=False).last_hidden_state  # no KV cache: one pass, no generation
        return pool_hidden(hidden, mask, self.pooling).float()


def model_identity(folder: Union[str, Path], pooling: str, context_length: int) -> str:
    """sha256 over the folder's config, tokenizer files and weight files (sizes and both ends:
    hashing 16 GB on every open is not an option), plus pooling and context length."""
    folder = Path(folder)
    digest = hashlib.sha256(f"pooling={pooling};context_length={context_length}".encode())
    for name in ("config.json", *_TOKENIZER_FILES):
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not weights:
        raise ValueError(f"{folder} has no weight files (*.safetensors / *.bin)")
    for path in weights:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(_EDGE_BYTES))
            f.seek(max(0, size - _EDGE_BYTES))
            digest.update(f.read(_EDGE_BYTES))
    return digest.hexdigest()
