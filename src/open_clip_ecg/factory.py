"""``open_clip_ecg.create_model_and_transforms``: open_clip's familiar triple for ECG models.

Returns ``(model, preprocess_train, preprocess_val)`` where each preprocess is a callable
``(raw signal [leads, T], sampling rate, lead names) -> model input`` built from the ECG
preprocessing the model carries (:mod:`.model_preprocess`); open_clip's own transforms are for
images and do not apply to ECGs.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

from .model_preprocess import ECGPreprocess


def create_model_and_transforms(model_name: str, pretrained: Optional[str] = None, device="cpu",
                                preprocess_cfg: Optional[Dict] = None) -> Tuple[object, ECGPreprocess, ECGPreprocess]:
    """`model_name` is ``local-dir:DIR`` / ``hf-hub:org/repo`` (an :mod:`.export` folder) or a config
    name with `pretrained` a checkpoint. `preprocess_cfg` overrides what the model records and is
    required for checkpoints that record none. The model is in eval mode, ``model.ecg_preprocess`` set."""
    import open_clip
    from open_clip.factory import parse_model_name

    from .embed import load_model
    from .export import exported_preprocess

    schema, _ = parse_model_name(model_name)
    if schema is not None:
        model = open_clip.create_model(model_name, device=device).eval()
        model.ecg_preprocess = exported_preprocess(model_name)
    else:
        model, _ = load_model(model_name, pretrained, device=device)
    model.ecg_preprocess = preprocess_cfg or model.ecg_preprocess
    if model.ecg_preprocess is None:
        raise ValueError(f"{model_name} ({pretrained}) records no ECG preprocessing: pass preprocess_cfg="
                         "{'sampling_rate', 'seconds', 'eval_seconds', 'leads', 'normalize'}")
    return model, ECGPreprocess(model.ecg_preprocess, train=True), ECGPreprocess(model.ecg_preprocess, train=False)
