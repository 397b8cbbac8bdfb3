"""LLM text towers for open_clip: a live decoder LM, or its cached embeddings + a projection head.

open_clip 3.3 builds every HF text tower as ``HFTextEncoder`` (BERT-like: it passes
``add_pooling_layer``, which decoder models reject) and every HF tokenizer as ``HFTokenizer``.
It has no hook for other tower types, so importing this package replaces two names open_clip
looks up at call time (seams of :mod:`open_clip_ecg.compat`), each delegating to the original
unless the config asks for ours:

==================================== ===========================================================
seam                                 taken when
==================================== ===========================================================
``open_clip.model._build_text_tower`` ``text_cfg`` has ``ecg_text_tower`` (``CustomTextCLIP``
                                     builds its text tower through this name)
``open_clip.factory.HFTokenizer``    ``text_cfg.tokenizer_mode`` is ``ecg-decoder-lm`` or
                                     ``ecg-text-cache`` (``get_tokenizer`` passes it through)
==================================== ===========================================================

``text_cfg.ecg_text_tower`` = ``{"type": "decoder_lm" | "cached", "pooling", "dtype",
"text_cache", "hidden_size"}`` (written by :func:`open_clip_ecg.register_ecg_text_model`).

* ``decoder_lm``: :class:`DecoderLMTextTower`, the LLM runs on every forward (``--lock-text``
  freezes it, ``--lock-text-unlocked-layers N`` trains its last N blocks).
* ``cached``: :class:`CachedTextTower`; its "tokens" are ``[row, check]`` pairs into a
  :class:`~open_clip_ecg.text_cache.TextEmbeddingCache` made by :class:`CachedTextTokenizer`, so
  the label packing and its fingerprint work unchanged, and a step never touches the LLM. Only
  the projection head is a parameter; a checkpoint holds no LLM weights.

Where a cached tower's text cache may be (a config could name any path, and the tokenizer writes
to its cache):

* a cache registered in this process by :func:`open_clip_ecg.register_ecg_text_model` (the user
  named it): read, and texts it lacks are embedded with the LLM folder and appended;
* the cache inside an exported folder (``local-dir:DIR``; its config names it relative to DIR, see
  :mod:`open_clip_ecg.exported_folder`): only read. It holds the model's vocabulary prompts; a new
  prompt is a ValueError saying that it needs the LLM folder;
* anything else is refused: loading a model never reads or writes a folder the user did not name.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn

from . import compat
from .decoder_lm import DecoderLM, DecoderLMTokenizer
from .exported_folder import CONFIG_FILE, path_inside, take_loading_folder
from .text_cache import LMEmbedder, TextEmbeddingCache

__all__ = ["CachedTextTokenizer", "CachedTextTower", "DecoderLMTextTower", "TextsNotCachedError",
           "install_text_tower_seams", "trust_text_cache"]

DECODER_MODE, CACHED_MODE = "ecg-decoder-lm", "ecg-text-cache"
_upstream_build_text_tower = compat.BUILD_TEXT_TOWER.get()
_upstream_hf_tokenizer = compat.HF_TOKENIZER.get()
_user_caches = set()  # text cache folders the user registered in this process (register_ecg_text_model)


def trust_text_cache(folder: Union[str, Path]) -> None:
    """Let model configs of this process name the cache in `folder` (the user named it)."""
    _user_caches.add(Path(folder).expanduser().resolve())


def _user_cache(value, field: str) -> Path:
    """The registered cache a config names by absolute path; ValueError for any other path."""
    path = Path(value).expanduser().resolve() if isinstance(value, str) and value else None
    if path is None or path not in _user_caches:
        raise ValueError(f"{field} {value!r} is neither inside the model's exported folder (load it with "
                         "local-dir:) nor a text cache registered in this process with "
                         "open_clip_ecg.register_ecg_text_model(..., text_cache=...); it is not opened")
    return path


class TextsNotCachedError(ValueError):
    """Texts a read-only cache lacks, or that a DataLoader worker may not embed.

    Raised in a DataLoader worker, torch re-raises it in the main process as
    ``TextsNotCachedError(<the worker's whole traceback>)``: the constructor keeps only the original
    message, so the main process reports one line."""

    def __init__(self, message: str):
        marker = f"{type(self).__name__}: "
        if message.startswith(f"Caught {type(self).__name__}") and marker in message:
            message = message.rsplit(marker, 1)[1].strip() + " (raised in a DataLoader worker)"
        super().__init__(message)


def _project(proj: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Apply the head in its own dtype (float32 features into a head cast by --precision)."""
    weight = next(proj.parameters(), None)
    return proj(features if weight is None else features.to(weight.dtype))


def _projection(proj_type: str, width: int, embed_dim: int) -> nn.Module:
    """open_clip's HF text projections: 'mlp' (width -> (width+embed)/2 -> embed), 'linear', 'none'."""
    if proj_type == "mlp":
        hidden = (width + embed_dim) // 2
        return nn.Sequential(nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, embed_dim, bias=False))
    if proj_type == "linear":
        return nn.Linear(width, embed_dim, bias=False)
    if proj_type == "none":
        if width != embed_dim:
            raise ValueError(f"hf_proj_type 'none' needs the LLM width {width} to equal embed_dim {embed_dim}")
        return nn.Identity()
    raise ValueError(f"hf_proj_type must be 'mlp', 'linear' or 'none', got {proj_type!r}")


class DecoderLMTextTower(nn.Module):
    """A decoder LM (pooled) + projection to ``embed_dim``; the LLM runs without autograd while frozen."""

    def __init__(self, folder: str, embed_dim: int, pooling: str = "last", proj_type: str = "mlp",
                 context_length: int = 128, pretrained: bool = True, dtype: str = "auto"):
        super().__init__()
        self.lm = DecoderLM(folder, pooling, pretrained=pretrained, dtype=dtype)
        self.proj = _projection(proj_type, self.lm.hidden_size, embed_dim)
        self.context_length = context_length
        self.vocab_size = int(self.lm.transformer.config.get_text_config().vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        frozen = not any(p.requires_grad for p in self.lm.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            pooled = self.lm(ids)
        return _project(self.proj, pooled)

    def lock(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze the LLM, except its last `unlocked_layers` blocks and final norm when > 0."""
        for p in self.lm.parameters():
            p.requires_grad = False
        if unlocked_layers:
            blocks = self.lm.transformer.layers
            if not 0 < unlocked_layers <= len(blocks):
                raise ValueError(f"--lock-text-unlocked-layers {unlocked_layers}: the LLM has {len(blocks)} blocks")
            for module in [*blocks[-unlocked_layers:], self.lm.transformer.norm]:
                for p in module.parameters():
                    p.requires_grad = True

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.lm.transformer.gradient_checkpointing_enable()
        else:
            self.lm.transformer.gradient_checkpointing_disable()


class CachedTextTower(nn.Module):
    """Cached pooled LLM embeddings + projection head: per-step cost independent of the LLM's size.

    The cache is opened on first use, so a checkpoint loads without it; encoding text needs it
    (and the tokenizer needs the LLM folder for texts the cache lacks).
    """

    def __init__(self, text_cache: Union[str, Path], hidden_size: int, embed_dim: int, proj_type: str = "mlp",
                 context_length: int = 128):
        super().__init__()
        self.text_cache = str(text_cache)
        self._cache: Optional[TextEmbeddingCache] = None  # opened on first forward
        self.proj = _projection(proj_type, hidden_size, embed_dim)
        self.context_length = context_length
        self.vocab_size = 0  # no token embedding: "tokens" are cache rows

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] != 2:
            raise ValueError(f"a cached text tower takes [batch, 2] (row, check) from its CachedTextTokenizer, "
                             f"got shape {tuple(tokens.shape)}: use open_clip.get_tokenizer(<this model>)")
        if self._cache is None:
            self._cache = TextEmbeddingCache.open(self.text_cache)
        embeddings = self._cache.lookup(tokens[:, 0], tokens[:, 1])
        return _project(self.proj, embeddings.to(tokens.device))

    def lock(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Nothing to freeze: the LLM is not part of the model. Unfreezing its layers needs the live tower."""
        if unlocked_layers:
            raise ValueError("--lock-text-unlocked-layers > 0 needs the live LLM (the cache holds its final "
                             "output): train with --ecg-text-model and without --ecg-text-cache")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass  # no transformer to checkpoint


class CachedTextTokenizer:
    """Texts -> ``[B, 2]`` ``(row, check)`` into the text cache; texts it lacks are embedded and added.

    `folder` is the LLM folder (a registered model) or the exported model folder (``local-dir:``,
    whose cache is only read). Adding needs the LLM folder; in DataLoader workers it is refused
    (workers must not race to load an LLM): training texts belong in the cache before training, via
    ``text-cache``.
    """

    def __init__(self, folder: str, context_length: int = 128, text_cache: str = "", pooling: str = "last",
                 **_ignored):
        self.folder = Path(folder)
        self.context_length, self.pooling = context_length, pooling
        self.read_only = (self.folder / CONFIG_FILE).is_file() and not Path(text_cache).is_absolute()
        if self.read_only:  # an exported folder: its config names its own cache
            self.text_cache = path_inside(self.folder, text_cache, "model_cfg.text_cfg.tokenizer_kwargs.text_cache")
        else:
            self.text_cache = _user_cache(text_cache, "the tokenizer's text_cache")
        self._embedder: Optional[LMEmbedder] = None
        self._opened: Optional[TextEmbeddingCache] = None

    def _cache(self) -> TextEmbeddingCache:
        if self._opened is None:
            if self.read_only or Path(self.text_cache, "index.json").is_file():
                self._opened = TextEmbeddingCache.open(self.text_cache)
            else:
                self._opened = TextEmbeddingCache.create(self.text_cache,
                                                         self._lm(self.pooling, self.context_length).cache_model())
        return self._opened

    def _lm(self, pooling: str, context_length: int) -> LMEmbedder:
        if self._embedder is None:
            if not (self.folder / "config.json").is_file():
                raise ValueError(f"the LLM folder {self.folder} is missing: it is needed to embed texts "
                                 f"(e.g. zero-shot prompts) that the text cache {self.text_cache} lacks")
            self._embedder = LMEmbedder(self.folder, pooling, context_length)
        return self._embedder

    def _add_missing(self, cache: TextEmbeddingCache, texts: Sequence[str], keys) -> None:
        if all(cache.row(k) is not None for k in keys):
            return
        cache.refresh()  # another process may have added them
        missing = list(dict.fromkeys(t for t, k in zip(texts, keys) if cache.row(k) is None))
        if not missing:
            return
        if self.read_only:
            model = cache.model
            raise TextsNotCachedError(
                f"{len(missing)} text(s) are not in the text cache {cache.folder} of the exported model "
                f"{self.folder}, e.g. {missing[0]!r}: it holds the prompts of the model's own findings; new "
                f"prompts need the LLM folder the model was trained with ({model['folder']} on the machine that "
                f"exported it): add them with open_clip_ecg.text_cache.build_text_cache(texts, LMEmbedder("
                f"LLM_FOLDER, {model['pooling']!r}, {model['context_length']}), {str(cache.folder)!r})")
        if torch.utils.data.get_worker_info() is not None:
            raise TextsNotCachedError(
                f"{len(missing)} text(s) are not in the text cache {cache.folder}, e.g. {missing[0]!r}: run "
                f"`open-clip-ecg text-cache --text-model {self.folder} --shards <train and val shards> "
                f"--out {cache.folder}` first")
        embedder = self._lm(cache.model["pooling"], cache.model["context_length"])
        if embedder.cache_model()["identity"] != cache.identity:
            raise ValueError(f"the text cache {cache.folder} was built with another model than {self.folder}; "
                             "rebuild it with `open-clip-ecg text-cache`")
        cache.append([cache.key(t) for t in missing], embedder.embed(missing))

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        cache = self._cache()
        keys = [cache.key(t) for t in texts]
        self._add_missing(cache, texts, keys)
        return torch.tensor([[cache.row(k), cache.check_value(k)] for k in keys], dtype=torch.long)


def build_ecg_text_tower(embed_dim: int, text_cfg: Dict, exported: Optional[Path] = None) -> nn.Module:
    """The tower ``text_cfg['ecg_text_tower']`` asks for; `exported` is the folder a config loaded
    with ``local-dir:`` came from (its text cache is inside it)."""
    spec = text_cfg["ecg_text_tower"]
    common = dict(embed_dim=embed_dim, proj_type=text_cfg.get("hf_proj_type", "mlp"),
                  context_length=text_cfg.get("context_length", 128))
    if spec["type"] == "decoder_lm":
        return DecoderLMTextTower(text_cfg["hf_model_name"], pooling=spec.get("pooling", "last"),
                                  pretrained=text_cfg.get("hf_model_pretrained", True),
                                  dtype=spec.get("dtype", "auto"), **common)
    if spec["type"] == "cached":
        field = "text_cfg.ecg_text_tower.text_cache"
        cache = (_user_cache(spec.get("text_cache"), field) if exported is None
                 else path_inside(exported, spec.get("text_cache"), field))
        return CachedTextTower(cache, spec["hidden_size"], **common)
    raise ValueError(f"text_cfg.ecg_text_tower.type must be 'decoder_lm' or 'cached', got {spec['type']!r}")


def _inside_exported(text_cfg: Dict, folder: Path) -> Dict:
    """`text_cfg` of an exported folder with its HF model paths made absolute inside the folder. A
    Hub id (``--hf-repo``) becomes the folder too when the text model's files are in it, as
    open_clip's ``get_tokenizer`` does for ``local-dir:``: the folder then loads offline."""
    text_cfg = dict(text_cfg)
    for key in ("hf_model_name", "hf_tokenizer_name"):
        value = text_cfg.get(key)
        if isinstance(value, str) and (folder / value).exists():
            text_cfg[key] = str(path_inside(folder, value, f"model_cfg.text_cfg.{key}"))
        elif isinstance(value, str) and (folder / "config.json").is_file():
            text_cfg[key] = str(folder)
    return text_cfg


def _build_text_tower(embed_dim, text_cfg, quick_gelu=False, cast_dtype=None):
    exported = take_loading_folder(text_cfg) if isinstance(text_cfg, dict) else None
    if exported is not None:
        text_cfg = _inside_exported(text_cfg, exported)
    if isinstance(text_cfg, dict) and "ecg_text_tower" in text_cfg:
        return build_ecg_text_tower(embed_dim, text_cfg, exported)
    return _upstream_build_text_tower(embed_dim, text_cfg, quick_gelu, cast_dtype)


def _hf_tokenizer(tokenizer_name, context_length=None, cache_dir=None, tokenizer_mode=None, **kwargs):
    if tokenizer_mode == DECODER_MODE:
        return DecoderLMTokenizer(tokenizer_name, context_length or 128)
    if tokenizer_mode == CACHED_MODE:
        return CachedTextTokenizer(tokenizer_name, context_length or 128, **kwargs)
    return _upstream_hf_tokenizer(tokenizer_name, context_length=context_length, cache_dir=cache_dir,
                                  tokenizer_mode=tokenizer_mode, **kwargs)


def install_text_tower_seams() -> None:
    """Route ECG LLM text configs to our towers and tokenizers (idempotent; see module docstring)."""
    compat.check_open_clip_version()
    compat.install(compat.BUILD_TEXT_TOWER, _build_text_tower)
    compat.install(compat.HF_TOKENIZER, _hf_tokenizer)
