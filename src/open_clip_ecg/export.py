"""``open-clip-ecg export``: a trained checkpoint -> open_clip's own shareable folder.

``open-clip-ecg export --model M --pretrained CKPT --out DIR`` writes

- ``open_clip_config.json``: ``{"model_cfg": <M's config>, "preprocess_cfg": {"ecg": <the ECG
  preprocessing the checkpoint records>}}`` (open_clip reads ``model_cfg`` and ignores the
  ``ecg`` entry; :func:`open_clip_ecg.create_model_and_transforms` reads it);
- ``open_clip_model.safetensors``: the weights, no pickle;
- for Hugging Face text towers, the text model's ``config.json`` and tokenizer files, so
  ``open_clip.get_tokenizer('local-dir:DIR')`` needs nothing else. ``hf_model_name`` then points at
  DIR itself (absolute), or at ``--hf-repo`` when the folder is meant for the Hub.

After ``import open_clip_ecg`` (which registers the timm ECG towers), ``open_clip.create_model(
'local-dir:DIR')`` and ``open_clip.get_tokenizer('local-dir:DIR')`` load it; uploaded as a Hugging
Face Hub repository, the same folder loads with ``hf-hub:org/repo``.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Dict, Optional

from .atomic import write_atomic, write_json_atomic
from .factory import load_model

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def export_model(model_name: str, pretrained: str, out_dir, hf_repo: Optional[str] = None) -> Path:
    """Write `pretrained` (a checkpoint of `model_name`) as an open_clip folder; returns the folder."""
    import open_clip
    from safetensors.torch import save_file

    model, _ = load_model(model_name, pretrained)
    if model.ecg_preprocess is None:
        raise ValueError(f"checkpoint {pretrained!r} records no ECG preprocessing (it predates it): retrain, or "
                         "evaluate it with its shards instead of exporting it")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_cfg = copy.deepcopy(open_clip.get_model_config(model_name))
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name"):
        _copy_hf_text_files(text_cfg["hf_tokenizer_name"] or text_cfg["hf_model_name"], text_cfg["hf_model_name"],
                            out_dir)
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = hf_repo or str(out_dir.resolve())
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(out_dir / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"ecg": model.ecg_preprocess}}
    write_json_atomic(out_dir / CONFIG_FILE, config, final_newline=True, indent=2, sort_keys=True)
    return out_dir


def _copy_hf_text_files(tokenizer_source: str, model_source: str, out_dir: Path) -> None:
    """The HF text model's config and tokenizer, saved into `out_dir` (weights are in the safetensors)."""
    from transformers import AutoConfig, AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(out_dir)
    AutoConfig.from_pretrained(model_source).save_pretrained(out_dir)


def exported_preprocess(model_name: str) -> Optional[Dict]:
    """The ECG preprocessing of a ``local-dir:`` or ``hf-hub:`` model (None when it records none)."""
    from open_clip.factory import parse_model_name

    from .compat import get_hf_config

    schema, identifier = parse_model_name(model_name)
    if schema == "local-dir":
        path = os.path.join(identifier, CONFIG_FILE)
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    else:
        config = get_hf_config(identifier)
    return (config.get("preprocess_cfg") or {}).get("ecg")


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model config name the checkpoint was trained with")
    parser.add_argument("--pretrained", required=True, help="checkpoint (open_clip_train's epoch_N.pt)")
    parser.add_argument("--out", required=True, help="output folder (open_clip's local-dir:/hf-hub: layout)")
    parser.add_argument("--hf-repo", default=None,
                        help="Hub repository id the folder will be uploaded to (HF text towers load their "
                             "config and tokenizer from it); default: the folder itself")


def run(args) -> int:
    out = export_model(args.model, args.pretrained, args.out, hf_repo=args.hf_repo)
    print(f"exported {args.model} ({args.pretrained}) to {out}: open_clip.create_model('local-dir:{out}') "
          "after `import open_clip_ecg`")
    return 0
