"""Text encoding that skips the padding: the same features and gradients for a fraction of the work.

open_clip runs every text through all ``context_length`` positions (77 for its own text
transformer, 128 for ``ECG-RN18-MiniLM``), padding included. Two tower kinds provably ignore the
trailing padding, so a batch can be cut after its last position that matters:

* open_clip's own text transformer (``CLIP``) under its causal mask: position i attends only to
  positions <= i, and the pooled position (the end-of-text token for ``argmax``/``eos`` pooling,
  position 0 for ``first``) is the only output used, so the positions after a batch's last pooled
  one change neither a feature nor a gradient;
* Hugging Face encoders (``CustomTextCLIP`` with ``HFTextEncoder``): the attention mask hides the
  pad tokens from every other token and from the pooler (mean, max, CLS), so trailing columns
  that are padding in every row change nothing either.

ECG reports and finding texts are short (PTB-XL's fill about a quarter of the 77), and the text
tower was about three quarters of a CPU training step of the PTB-XL recipe
(``scripts/benchmarks/bench_training.py`` measures the step both ways). The cut is rounded up to
a multiple of 8, which keeps the shapes few for ``torch.compile`` and aligned for tensor cores.
:func:`enable_unpadded_text` leaves every other model as it is (no causal mask, ``last``
pooling, towers that also return their token features, LLM towers).
"""
from __future__ import annotations

import types

import open_clip
import torch
import torch.nn.functional as F
from open_clip.hf_model import HFTextEncoder
from open_clip.transformer import text_global_pool

LENGTH_MULTIPLE = 8
POOLS_BEFORE_PADDING = ("argmax", "eos", "first")  # pooled position known from the tokens alone


def unpadded_length(text: torch.Tensor, pool_type: str, eos_id=None, multiple: int = LENGTH_MULTIPLE) -> int:
    """The number of leading positions of `text` (batch, context) that decide its pooled features."""
    if pool_type == "first":
        last = 0
    elif pool_type == "argmax":
        last = int(text.argmax(dim=-1).max())
    else:  # eos: text_global_pool's index (the first eos; 0 when a row has none)
        last = int((text == eos_id).int().argmax(dim=-1).max())
    return _rounded_up(last + 1, multiple, text.shape[1])


def unpadded_hf_length(text: torch.Tensor, pad_id: int, multiple: int = LENGTH_MULTIPLE) -> int:
    """The number of leading columns of `text` that are not padding in every row."""
    used = (text != pad_id).any(dim=0).nonzero()
    return _rounded_up(int(used.max()) + 1 if len(used) else 1, multiple, text.shape[1])


def _rounded_up(length: int, multiple: int, context_length: int) -> int:
    return min(context_length, -(-length // multiple) * multiple)


def _encode_text_unpadded(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``CLIP.encode_text`` on the positions up to the batch's last pooled one."""
    eos_id = getattr(self, "text_eos_id", None)
    length = unpadded_length(text, self.text_pool_type, eos_id)
    text = text[:, :length]
    cast_dtype = self.transformer.get_cast_dtype()
    x = self.token_embedding(text).to(cast_dtype) + self.positional_embedding[:length].to(cast_dtype)
    x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask[:length, :length]))
    x = text_global_pool(x, text, self.text_pool_type, eos_token_id=eos_id)
    if self.text_projection is not None:
        x = self.text_projection(x) if isinstance(self.text_projection, torch.nn.Linear) else x @ self.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def _encode_hf_text_unpadded(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``CustomTextCLIP.encode_text`` of an HF encoder on the columns that are not all padding."""
    features = self.text(text[:, :unpadded_hf_length(text, self.text.config.pad_token_id)])
    return F.normalize(features, dim=-1) if normalize else features


def enable_unpadded_text(model: torch.nn.Module) -> torch.nn.Module:
    """Give `model` the padding-skipping ``encode_text`` when its text tower allows it (see the
    module docstring); weights and state_dict unchanged. Returns `model`."""
    if (type(model) is open_clip.CLIP and getattr(model, "attn_mask", None) is not None
            and model.text_pool_type in POOLS_BEFORE_PADDING):
        model.encode_text = types.MethodType(_encode_text_unpadded, model)
    elif (type(model) is open_clip.CustomTextCLIP and type(model.text) is HFTextEncoder
          and not model.text.output_tokens and model.text.config.pad_token_id is not None):
        model.encode_text = types.MethodType(_encode_hf_text_unpadded, model)
    return model
