"""Random-weight decoder LM folders (any transformers causal-LM family) for tests and benchmarks.

Nothing downloads: the tokenizer is a byte-level BPE trained here on a few ECG sentences (any
text encodes), the weights are random, and the folder has the layout of a downloaded model
(``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

__all__ = ["write_random_decoder_lm"]

_CORPUS = (
    "sinus rhythm. normal ecg. left axis deviation. atrial fibrillation with rapid ventricular response.",
    "an ECG showing first degree av block, left bundle branch block, inferior myocardial infarction.",
    "the electrocardiogram demonstrates sinus tachycardia, st depression and t wave inversion.",
)
PAD_TOKEN, EOS_TOKEN = "<|pad|>", "<|endoftext|>"


def write_random_decoder_lm(folder: Union[str, Path], model_type: str = "qwen3", hidden_size: int = 64,
                            layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate_size: int = 128,
                            vocab_size: int = 320, eos_token: Optional[str] = EOS_TOKEN,
                            pad_token: Optional[str] = PAD_TOKEN, seed: int = 0, dtype: torch.dtype = torch.float32,
                            **config_overrides) -> Path:
    """Write a random `model_type` ('qwen3', 'llama', 'mistral', ...) causal LM to `folder`.

    `eos_token` / `pad_token` None leave them out of the tokenizer (to test refusals);
    `config_overrides` go into the model config (e.g. a wrong ``eos_token_id``); `dtype` of the
    saved weights (bfloat16 halves an 8B-shaped folder to 16 GB).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD_TOKEN, EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos_token, pad_token=pad_token)
    tokenizer.save_pretrained(str(folder))
    settings = dict(vocab_size=bpe.get_vocab_size(), hidden_size=hidden_size, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate_size,
                    head_dim=hidden_size // heads, max_position_embeddings=512,
                    eos_token_id=bpe.token_to_id(EOS_TOKEN), pad_token_id=bpe.token_to_id(PAD_TOKEN),
                    bos_token_id=None, tie_word_embeddings=True)
    settings.update(config_overrides)
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(str(folder))
    return folder
