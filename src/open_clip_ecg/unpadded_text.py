"""Text encoding that skips the padding: the same features and gradients for a fraction of the work.

open_clip runs every text through all ``context_length`` positions (77 for its own text
transformer, 128 for ``ECG-RN18-MiniLM``), padding included. Two tower kinds provably ignore a
text's trailing padding, so each text can be cut after its last position that matters:

* open_clip's own text transformer (``CLIP``) under its causal mask: position i attends only to
  positions <= i, and the pooled position (the end-of-text token for ``argmax``/``eos`` pooling,
  position 0 for ``first``) is the only output used, so the positions after it change neither a
  feature nor a gradient;
* Hugging Face encoders (``CustomTextCLIP`` with ``HFTextEncoder``): the attention mask hides the
  pad tokens from every other token and from the pooler (mean, max, CLS), so trailing padding
  changes nothing either.

Texts never interact inside a text tower, so a batch is encoded in buckets of texts of similar
length, each cut to its longest text rounded up to a multiple of 16 (at most five shapes for 77
positions: few for ``torch.compile``, aligned for tensor cores; a lone text is encoded with a copy
of itself, so no bucket is a batch of one), and the features are put back in the batch's order.
One long report no longer makes a whole batch of short texts pay for 77 positions. ECG reports
and finding texts are short (sampled PTB-XL texts: 20-24 tokens on average), and the text tower
was about three quarters of a CPU training step of the PTB-XL recipe with finding texts
(``scripts/benchmarks/bench_training.py`` measures the step both ways).
:func:`enable_unpadded_text` leaves every other model as it is (no causal mask, ``last``
pooling, towers that also return their token features, LLM towers).
"""
from __future__ import annotations

import types
from typing import Callable

import open_clip
import torch
import torch.nn.functional as F
from open_clip.hf_model import HFTextEncoder
from open_clip.transformer import text_global_pool

BUCKET_MULTIPLE = 16
POOLS_BEFORE_PADDING = ("argmax", "eos", "first")  # pooled position known from the tokens alone


def pooled_lengths(text: torch.Tensor, pool_type: str, eos_id=None) -> torch.Tensor:
    """Per row of `text` (batch, context): how many leading positions decide its pooled features
    under a causal mask (up to and including the pooled position, as ``text_global_pool`` finds it)."""
    if pool_type == "first":
        last = torch.zeros(len(text), dtype=torch.long, device=text.device)
    elif pool_type == "argmax":
        last = text.argmax(dim=-1)
    else:  # eos: the first eos; 0 when a row has none
        last = (text == eos_id).int().argmax(dim=-1)
    return last + 1


def unpadded_lengths(text: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Per row of `text`: the position after its last token that is not padding (at least 1)."""
    positions = torch.arange(1, text.shape[1] + 1, device=text.device)
    return ((text != pad_id) * positions).amax(dim=-1).clamp(min=1)


def bucket_lengths(lengths: torch.Tensor, context_length: int, multiple: int = BUCKET_MULTIPLE) -> torch.Tensor:
    """The length each row is encoded at: its own rounded up to `multiple`, at most the context."""
    return ((lengths + multiple - 1) // multiple * multiple).clamp(max=context_length)


# torch.compile (open_clip_train --torchcompile) skips this frame only: the bucketing is data-dependent
# and its bucket count varies, which would recompile the reassembly every few steps; each bucket's
# encode_prefix is still compiled (dynamic in batch and length after its first recompile).
@torch.compiler.disable(recursive=False)
def encode_in_length_buckets(encode_prefix: Callable[[torch.Tensor], torch.Tensor], text: torch.Tensor,
                             lengths: torch.Tensor, multiple: int = BUCKET_MULTIPLE) -> torch.Tensor:
    """``encode_prefix`` of each row's first `lengths` tokens, rows grouped by their
    :func:`bucket_lengths`, features returned in the rows' order."""
    buckets = bucket_lengths(lengths, text.shape[1], multiple)
    sizes = buckets.unique().tolist()
    if len(sizes) == 1:  # contiguous as the buckets' copies are (dynamo guards the strides too)
        return encode_prefix(text[:, :sizes[0]].contiguous())
    rows = [(buckets == size).nonzero().flatten() for size in sizes]
    # a lone text goes in beside a copy of itself, whose features are dropped: torch.compile
    # specialises a batch of one, and would compile one more graph whenever a lone text first appears
    features = torch.cat([encode_prefix(text[r.repeat(2) if len(r) == 1 else r, :size])[:len(r)]
                          for r, size in zip(rows, sizes)])
    return features[torch.cat(rows).argsort()]


def _clip_encode_prefix(self, text: torch.Tensor) -> torch.Tensor:
    """``CLIP.encode_text`` (unnormalised) of texts cut to ``text.shape[1]`` positions. Its steps,
    written out because open_clip's adds all 77 positional embeddings and the 77 x 77 mask."""
    length = text.shape[1]
    cast_dtype = self.transformer.get_cast_dtype()
    x = self.token_embedding(text).to(cast_dtype) + self.positional_embedding[:length].to(cast_dtype)
    x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask[:length, :length]))
    x = text_global_pool(x, text, self.text_pool_type, eos_token_id=getattr(self, "text_eos_id", None))
    if self.text_projection is None:
        return x
    return self.text_projection(x) if isinstance(self.text_projection, torch.nn.Linear) else x @ self.text_projection


def _encode_text_unpadded(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``CLIP.encode_text``, each text cut after its pooled position."""
    lengths = pooled_lengths(text, self.text_pool_type, getattr(self, "text_eos_id", None))
    x = encode_in_length_buckets(lambda prefix: _clip_encode_prefix(self, prefix), text, lengths)
    return F.normalize(x, dim=-1) if normalize else x


def _encode_hf_text_unpadded(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``CustomTextCLIP.encode_text`` of an HF encoder, each text cut after its last real token."""
    x = encode_in_length_buckets(self.text, text, unpadded_lengths(text, self.text.config.pad_token_id))
    return F.normalize(x, dim=-1) if normalize else x


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
