"""``open-clip-ecg export``: a trained checkpoint -> open_clip's own shareable folder.

``open-clip-ecg export --model M --pretrained CKPT --out DIR`` writes

- ``open_clip_config.json``: ``{"model_cfg": <M's config>, "preprocess_cfg": {"ecg": <the ECG
  preprocessing the checkpoint records>}}`` (open_clip reads ``model_cfg`` and ignores the
  ``ecg`` entry; :func:`open_clip_ecg.create_model_and_transforms` reads it);
- ``open_clip_model.safetensors``: the weights, no pickle;
- for Hugging Face text towers, the text model's ``config.json`` and tokenizer files, so
  ``open_clip.get_tokenizer('local-dir:DIR')`` needs nothing else. ``hf_model_name`` is then ``.``
  (the folder itself: paths in the config are relative to it, so the folder can be moved), or
  ``--hf-repo`` when the folder is meant for the Hub;
- for a model trained with ``--ecg-text-cache`` (export it with the same ``--ecg-text-cache``),
  ``text_cache/``: the cached LLM embeddings of the prompts of the model's own findings, so it
  classifies them without the LLM. New prompts need the LLM folder it was trained with.

After ``import open_clip_ecg`` (which registers the timm ECG towers and checks exported folders,
:mod:`.exported_folder`), ``open_clip.create_model('local-dir:DIR')`` and
``open_clip.get_tokenizer('local-dir:DIR')`` load it; uploaded as a Hugging Face Hub repository, the
same folder loads with ``hf-hub:org/repo`` (except the text cache of a cached-text model, which is
read from a local folder only).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

from .atomic import write_atomic, write_json_atomic
from .exported_folder import CONFIG_FILE, TEXT_CACHE_DIR, WEIGHTS_FILE
from .factory import load_model
from .registry import pair_text_model

__all__ = ["export_model", "add_arguments", "run"]


def export_model(model_name: str, pretrained: str, out_dir, hf_repo: Optional[str] = None) -> Path:
    """Write `pretrained` (a checkpoint of `model_name`) as an open_clip folder; returns the folder."""
    import open_clip
    from safetensors.torch import save_file

    model, tokenizer = load_model(model_name, pretrained)
    if model.ecg_preprocess is None:
        raise ValueError(f"checkpoint {pretrained!r} records no ECG preprocessing (it predates it): retrain, or "
                         "evaluate it with its shards instead of exporting it")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_cfg = copy.deepcopy(open_clip.get_model_config(model_name))
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("ecg_text_tower", {}).get("type") == "cached":
        _export_cache_rows(tokenizer, text_cfg["ecg_text_tower"]["text_cache"],
                           [v["name"] for v in model.ecg_preprocess.get("vocabulary", [])], out_dir / TEXT_CACHE_DIR)
        text_cfg["ecg_text_tower"]["text_cache"] = text_cfg["tokenizer_kwargs"]["text_cache"] = TEXT_CACHE_DIR
        text_cfg["hf_tokenizer_name"] = hf_repo or "."
    elif text_cfg.get("hf_model_name"):
        _copy_hf_text_files(text_cfg["hf_tokenizer_name"] or text_cfg["hf_model_name"], text_cfg["hf_model_name"],
                            out_dir)
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = hf_repo or "."
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(out_dir / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"ecg": model.ecg_preprocess}}
    write_json_atomic(out_dir / CONFIG_FILE, config, final_newline=True, indent=2, sort_keys=True)
    return out_dir


def _export_cache_rows(tokenizer, source_cache: str, findings, out: Path) -> int:
    """Copy the rows of `source_cache` (the training cache) for the zero-shot prompts of `findings`
    into a new cache at `out`; `tokenizer` (the model's) first embeds the prompts the training cache
    lacks, with its LLM folder. Returns the number of prompts."""
    from .text_cache import TextEmbeddingCache
    from .zeroshot import prompt_texts

    prompts = list(dict.fromkeys(prompt_texts(findings)[0])) if findings else []
    tokens = tokenizer(prompts)
    source = TextEmbeddingCache.open(source_cache)
    target = TextEmbeddingCache.create(out, source.model)
    if prompts:
        target.append([source.key(t) for t in prompts], source.lookup(tokens[:, 0], tokens[:, 1]))
    return len(prompts)


def _copy_hf_text_files(tokenizer_source: str, model_source: str, out_dir: Path) -> None:
    """The HF text model's config and tokenizer, saved into `out_dir` (weights are in the safetensors)."""
    from transformers import AutoConfig, AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(out_dir)
    AutoConfig.from_pretrained(model_source).save_pretrained(out_dir)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model config name the checkpoint was trained with")
    parser.add_argument("--pretrained", required=True, help="checkpoint (open_clip_train's epoch_N.pt)")
    parser.add_argument("--out", required=True, help="output folder (open_clip's local-dir:/hf-hub: layout)")
    parser.add_argument("--hf-repo", default=None,
                        help="Hub repository id the folder will be uploaded to (HF text towers load their "
                             "config and tokenizer from it); default: the folder itself")
    parser.add_argument("--ecg-text-model", default=None, metavar="HF_FOLDER",
                        help="the --ecg-text-model the checkpoint was trained with (as for train)")
    parser.add_argument("--ecg-text-cache", default=None, metavar="CACHE",
                        help="the --ecg-text-cache the checkpoint was trained with: the folder gets the cached "
                             "embeddings of its findings' prompts (new prompts need the LLM folder)")


def run(args) -> int:
    model = pair_text_model(args.model, args.ecg_text_model, args.ecg_text_cache)
    out = export_model(model, args.pretrained, args.out, hf_repo=args.hf_repo)
    print(f"exported {model} ({args.pretrained}) to {out}: open_clip.create_model('local-dir:{out}') "
          "after `import open_clip_ecg`")
    if args.ecg_text_cache:
        print(f"{out / TEXT_CACHE_DIR} holds the LLM embeddings of the prompts of the model's own findings: it "
              "classifies them without the LLM; new prompts need the LLM folder it was trained with")
    return 0
