"""Loading an exported model folder (``local-dir:DIR``, written by :mod:`.export`) without trusting it.

A folder may come from anyone (a download, a colleague), so nothing it declares is used unchecked,
and plain ``open_clip.create_model('local-dir:DIR')`` gets the same checks as our own loaders:

* paths in its config (``hf_model_name``, ``hf_tokenizer_name``, the text cache of a cached-text
  model) are relative to the folder and must stay inside it; anything else is refused (a Hub id in
  ``hf_model_name`` of a folder exported with ``--hf-repo`` is left to Hugging Face). Loading never
  writes: the folder's text cache is only read (:mod:`.text_towers`);
* ``preprocess_cfg.ecg`` and ``embed_dim`` are checked before anything is sized from them
  (:func:`~open_clip_ecg.model_preprocess.check_preprocess_cfg`);
* the weights load strictly: the file must exist and parse as safetensors, hold exactly the model's
  tensors in their shapes, all finite. (open_clip alone returns a random model when the file is
  missing and a zero ``logit_bias`` when that tensor is.)

Each failure is one ValueError or FileNotFoundError naming the file and the field.

Seams (:mod:`open_clip_ecg.compat`), installed on import: ``open_clip.factory._find_checkpoint_in_dir``
(create_model calls it with the folder before building anything: the config is checked there and the
folder remembered, so the text tower built next resolves its relative paths inside it) and
``open_clip.factory.load_checkpoint`` (strict loading of an exported folder's weights).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

from . import compat
from .model_preprocess import check_preprocess_cfg
from .text_cache import TextEmbeddingCache, read_safetensors

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
TEXT_CACHE_DIR = "text_cache"  # a cached-text model's cache rows, inside its exported folder
_HF_PATH_KEYS = ("hf_model_name", "hf_tokenizer_name")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_upstream_find_checkpoint = compat.FIND_CHECKPOINT_IN_DIR.get()
_upstream_load_checkpoint = compat.LOAD_CHECKPOINT.get()
_loading: Optional[Tuple[Path, Dict]] = None  # (folder, its text_cfg) between config check and tower build


def path_inside(folder: Path, value, field: str) -> Path:
    """`value`, a path a config in `folder` declares (relative to it), resolved; ValueError naming
    `field` when it is not a string or leads outside `folder` (absolute, ``..``, a link out)."""
    folder = Path(folder).resolve()
    if not isinstance(value, str) or not value:
        raise ValueError(f"{folder / CONFIG_FILE}: {field} must be a path inside the folder, got {value!r}")
    path = (folder / value).resolve()
    if path != folder and folder not in path.parents:
        raise ValueError(f"{folder / CONFIG_FILE}: {field} {value!r} points outside the model folder {folder}; "
                         "paths in an exported model's config must stay inside it")
    return path


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_exported_config(folder) -> Dict:
    """The checked ``open_clip_config.json`` of an exported folder (see the module docstring)."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not an exported model folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    model_cfg = config.get("model_cfg") if isinstance(config, dict) else None
    if not isinstance(model_cfg, dict):
        raise ValueError(f"{path}: model_cfg must be an object (the open_clip model config)")
    if not _positive_int(model_cfg.get("embed_dim")):
        raise ValueError(f"{path}: model_cfg.embed_dim must be a positive integer, got {model_cfg.get('embed_dim')!r}")
    for key in ("vision_cfg", "text_cfg"):
        if not isinstance(model_cfg.get(key), dict):
            raise ValueError(f"{path}: model_cfg.{key} must be an object, got {model_cfg.get(key)!r}")
    preprocess_cfg = config.get("preprocess_cfg", {})
    if not isinstance(preprocess_cfg, dict):
        raise ValueError(f"{path}: preprocess_cfg must be an object, got {type(preprocess_cfg).__name__}")
    if "ecg" in preprocess_cfg:
        check_preprocess_cfg(preprocess_cfg["ecg"], f"{path}: preprocess_cfg.ecg")
    _check_text_paths(folder, model_cfg["text_cfg"])
    return config


def _check_text_paths(folder: Path, text_cfg: Dict) -> None:
    for key in _HF_PATH_KEYS:
        value = text_cfg.get(key)
        if value is not None and not (isinstance(value, str) and _HUB_ID.match(value)
                                      and not (folder / value).exists()):
            path_inside(folder, value, f"model_cfg.text_cfg.{key}")
    tower = text_cfg.get("ecg_text_tower")
    if tower is None:
        return
    if not isinstance(tower, dict) or tower.get("type") not in ("decoder_lm", "cached"):
        raise ValueError(f"{folder / CONFIG_FILE}: model_cfg.text_cfg.ecg_text_tower must be an object of type "
                         f"'decoder_lm' or 'cached', got {tower!r}")
    if tower["type"] != "cached":
        return
    cache = path_inside(folder, tower.get("text_cache"), "model_cfg.text_cfg.ecg_text_tower.text_cache")
    kwargs = text_cfg.get("tokenizer_kwargs", {})
    if not isinstance(kwargs, dict) or path_inside(folder, kwargs.get("text_cache"),
                                                   "model_cfg.text_cfg.tokenizer_kwargs.text_cache") != cache:
        raise ValueError(f"{folder / CONFIG_FILE}: model_cfg.text_cfg.tokenizer_kwargs.text_cache must name the "
                         "tower's text cache")
    hidden = TextEmbeddingCache.read_index(cache)["model"]["hidden_size"]
    if tower.get("hidden_size") != hidden:
        raise ValueError(f"{folder / CONFIG_FILE}: model_cfg.text_cfg.ecg_text_tower.hidden_size "
                         f"{tower.get('hidden_size')!r} differs from its text cache's {hidden}")


def is_ecg_export(folder) -> bool:
    """Whether `folder` holds an ECG model's config (an ECG tower or ECG preprocessing), however broken."""
    try:
        config = json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))
        vision = config["model_cfg"]["vision_cfg"]
        return "ecg" in config.get("preprocess_cfg", {}) or str(vision.get("timm_model_name", "")).startswith("ecg_")
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        return False


def exported_preprocess(model_name: str) -> Optional[Dict]:
    """The checked ECG preprocessing of a ``local-dir:`` or ``hf-hub:`` model (None when it records none)."""
    from open_clip.factory import parse_model_name

    schema, identifier = parse_model_name(model_name)
    if schema == "local-dir":
        config = read_exported_config(identifier)
        where = os.path.join(identifier, CONFIG_FILE)
    else:
        config, where = compat.get_hf_config(identifier), f"hf-hub:{identifier} {CONFIG_FILE}"
    preprocess_cfg = config.get("preprocess_cfg") or {}
    if not isinstance(preprocess_cfg, dict) or preprocess_cfg.get("ecg") is None:
        return None
    return check_preprocess_cfg(preprocess_cfg["ecg"], f"{where}: preprocess_cfg.ecg")


def take_loading_folder(text_cfg: Dict) -> Optional[Path]:
    """The exported folder whose config holds `text_cfg`, when open_clip is building its model now
    (its relative paths resolve there); None for every other model. Consumed by the one tower build."""
    global _loading
    if _loading is None:
        return None
    folder, expected = _loading
    _loading = None
    ignored = ("hf_model_pretrained", "context_length")  # open_clip's own overrides
    same = ({k: v for k, v in text_cfg.items() if k not in ignored}
            == {k: v for k, v in expected.items() if k not in ignored})
    return folder if same else None


def _find_checkpoint_in_dir(dir_path):
    folder = Path(dir_path)
    if not is_ecg_export(folder):
        return _upstream_find_checkpoint(dir_path)
    config = read_exported_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: an exported model loads only with its weights")
    global _loading
    _loading = (folder.resolve(), config["model_cfg"]["text_cfg"])
    return str(weights)


def load_exported_weights(model, path: Path):
    """Load `path` into `model` strictly: every tensor present, in shape, finite (ValueError naming the file)."""
    state = read_safetensors(path, "model weights file")
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    resized = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
               for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    problems = [f"{len(items)} {label} (e.g. {', '.join(items[:3])})"
                for label, items in (("missing", missing), ("unexpected", extra), ("shape mismatches", resized))
                if items]
    if problems:
        raise ValueError(f"{path} does not hold the model's weights: {'; '.join(problems)}")
    non_finite = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if non_finite:
        raise ValueError(f"{path}: {len(non_finite)} tensor(s) hold NaN or inf values (e.g. "
                         f"{', '.join(non_finite[:3])})")
    return model.load_state_dict(state, strict=True)


def _load_checkpoint(model, checkpoint_path, strict=True, weights_only=True, device="cpu"):
    path = Path(checkpoint_path)
    if path.name == WEIGHTS_FILE and is_ecg_export(path.parent):
        return load_exported_weights(model, path)
    return _upstream_load_checkpoint(model, checkpoint_path, strict=strict, weights_only=weights_only, device=device)


def install_exported_folder_seams() -> None:
    """Check exported ECG folders when open_clip loads them (idempotent; see module docstring)."""
    compat.install(compat.FIND_CHECKPOINT_IN_DIR, _find_checkpoint_in_dir)
    compat.install(compat.LOAD_CHECKPOINT, _load_checkpoint)
