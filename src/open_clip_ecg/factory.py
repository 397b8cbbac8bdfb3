"""Trained ECG models from their names and checkpoints: the one place models are loaded.

- :func:`load_model`: ``(model, tokenizer)`` of a config name and an open_clip_train checkpoint,
  with a diagnosis naming both when the checkpoint belongs to another model
  (:func:`raise_if_checkpoint_does_not_fit`, which training uses for ``--pretrained`` too).
- :func:`create_model_and_transforms`: open_clip's familiar triple for ECG models,
  ``(model, preprocess_train, preprocess_val)`` where each preprocess is a callable
  ``(raw signal [leads, T], sampling rate, lead names) -> model input`` built from the ECG
  preprocessing the model carries (:mod:`.model_preprocess`); open_clip's own transforms are for
  images and do not apply to ECGs.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from .exported_folder import exported_preprocess
from .model_preprocess import ECGPreprocess, read_checkpoint_preprocess
from .unpadded_text import enable_unpadded_text


def load_model(name: str, pretrained: Optional[str] = None, device="cpu"):
    """``(model, tokenizer)`` for an ECG model config, in eval mode, weights from `pretrained`; or of
    an exported folder (``local-dir:DIR``, ``hf-hub:org/repo``, :mod:`.export`), which holds both.

    `pretrained` is a checkpoint file: open_clip_train's ``epoch_N.pt`` (``{'epoch', 'name',
    'state_dict', ...}``; a DDP 'module.' prefix is stripped) or a bare state dict, loaded by
    ``open_clip.create_model(name, pretrained=path)``, which reads it with
    ``torch.load(weights_only=True)`` and loads it strictly. open_clip fails in several ways on a
    checkpoint of another architecture (a RuntimeError listing hundreds of keys, or an
    AttributeError while resizing positional embeddings); any failure is diagnosed here and, if the
    tensors do not fit the model, becomes a ValueError naming both and the differing tensors.
    ``None`` gives fresh initial weights. The checkpoint's recorded ECG preprocessing (or None) becomes
    ``model.ecg_preprocess``. Texts are encoded without their padding (:mod:`.unpadded_text`), as in
    training.
    """
    import open_clip
    from open_clip.factory import parse_model_name

    from .registry import list_ecg_models

    if parse_model_name(name)[0] is not None:  # an exported folder: weights and preprocessing inside
        if pretrained is not None:
            raise ValueError(f"{name} holds its weights: give no --pretrained checkpoint with it")
        ecg_preprocess = exported_preprocess(name)  # checked before anything is built from the folder
        model = open_clip.create_model(name, device=device).eval()
        model.ecg_preprocess = ecg_preprocess
        return enable_unpadded_text(model), open_clip.get_tokenizer(name)
    if name not in open_clip.list_models():
        raise ValueError(f"unknown model {name!r}; ECG models: {', '.join(list_ecg_models())}")
    if pretrained is not None and not os.path.isfile(pretrained):
        raise ValueError(f"checkpoint {pretrained!r} does not exist")
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device=device)
    except Exception as err:
        if pretrained is None:
            raise
        raise_if_checkpoint_does_not_fit(name, pretrained, err)
        raise
    model.eval()
    model.ecg_preprocess = read_checkpoint_preprocess(pretrained) if pretrained is not None else None
    return enable_unpadded_text(model), open_clip.get_tokenizer(name)


def state_dict_mismatch(state: Dict, expected: Dict) -> List[str]:
    """What keeps `state` from loading into a model whose state dict is `expected`: counts of missing,
    unexpected and resized tensors, with examples (empty when it fits)."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    resized = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
               for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != tuple(expected[k].shape)]
    return [f"{len(items)} {label} (e.g. {', '.join(items[:3])})"
            for label, items in (("missing", missing), ("unexpected", extra), ("shape mismatches", resized)) if items]


def raise_if_checkpoint_does_not_fit(name: str, pretrained: str, err: Exception) -> None:
    """ValueError when `pretrained` is unreadable or its tensors are missing, extra or resized for `name`."""
    import open_clip
    from open_clip.factory import load_state_dict

    try:
        state = load_state_dict(pretrained, weights_only=True)
    except Exception as load_err:  # not a checkpoint: torch's unpickler fails in many ways (IndexError, EOFError...)
        raise ValueError(f"cannot read checkpoint {pretrained!r} (for model {name!r}): {load_err}") from err
    problems = state_dict_mismatch(state, open_clip.create_model(name, pretrained_text=False).state_dict())
    if problems:
        raise ValueError(f"checkpoint {pretrained!r} does not match model {name!r}: {'; '.join(problems)}. "
                         "Pass the --model the checkpoint was trained with.") from err


def create_model_and_transforms(model_name: str, pretrained: Optional[str] = None, device="cpu",
                                preprocess_cfg: Optional[Dict] = None) -> Tuple[object, ECGPreprocess, ECGPreprocess]:
    """`model_name` is ``local-dir:DIR`` / ``hf-hub:org/repo`` (an :mod:`.export` folder) or a config
    name with `pretrained` a checkpoint. `preprocess_cfg` overrides what the model records and is
    required for checkpoints that record none. The model is in eval mode, ``model.ecg_preprocess`` set."""
    model, _ = load_model(model_name, pretrained, device=device)
    model.ecg_preprocess = preprocess_cfg or model.ecg_preprocess
    if model.ecg_preprocess is None:
        raise ValueError(f"{model_name} ({pretrained}) records no ECG preprocessing: pass preprocess_cfg="
                         "{'sampling_rate', 'seconds', 'eval_seconds', 'leads', 'normalize'}")
    return model, ECGPreprocess(model.ecg_preprocess, train=True), ECGPreprocess(model.ecg_preprocess, train=False)


def add_model_arguments(parser) -> None:
    """The options that name a trained model, shared by every command that loads one."""
    parser.add_argument("--model", required=True,
                        help="an exported folder (local-dir:DIR, hf-hub:org/repo) or a model config name "
                             "with --pretrained (e.g. ECG-RN18-MiniLM)")
    parser.add_argument("--pretrained", default=None,
                        help="checkpoint of a model config name (open_clip_train's epoch_N.pt)")
    parser.add_argument("--ecg-text-model", default=None, metavar="HF_FOLDER",
                        help="the local text model the checkpoint was trained with (train's --ecg-text-model)")
    parser.add_argument("--ecg-text-cache", default=None, metavar="CACHE",
                        help="the text cache the checkpoint was trained with (train's --ecg-text-cache)")


def load_model_from_args(args, device="cpu"):
    """``(model, tokenizer)`` named by :func:`add_model_arguments`' options; a text model or cache
    pairs with the --model's ECG tower under the name training gave it (:func:`.registry.pair_text_model`)."""
    from open_clip.factory import parse_model_name

    from .registry import pair_text_model

    name = args.model
    if parse_model_name(name)[0] is not None:
        if args.ecg_text_model or args.ecg_text_cache:
            raise ValueError(f"{name} is an exported folder, which holds its text tower: --ecg-text-model and "
                             "--ecg-text-cache pair a model config name with a text model")
    elif args.pretrained is None:
        raise ValueError(f"--model {name} is a config name: give its trained weights with --pretrained CKPT "
                         "(or an exported folder as --model local-dir:DIR)")
    else:
        name = pair_text_model(name, args.ecg_text_model, args.ecg_text_cache)
    return load_model(name, args.pretrained, device=device)
