"""open_clip_ecg: ECG-language models for open_clip.

Importing the package is registration: the 1-D ECG towers enter timm's registry (open_clip's
``TimmModel`` builds them) and the ECG model configs enter open_clip's config registry, so
``open_clip.create_model('ECG-...')`` and ``open_clip.get_tokenizer('ECG-...')`` just work, and
decoder-LLM text towers (live or cached) are routed to :mod:`open_clip_ecg.text_towers`, and exported
ECG folders (``local-dir:``) are checked and loaded strictly (:mod:`open_clip_ecg.exported_folder`).
Registration is idempotent.
"""
from . import towers  # noqa: F401  (importing registers the timm entrypoints)
from .exported_folder import install_exported_folder_seams
from .factory import create_model_and_transforms
from .leads import LEAD_SETS, STANDARD_LEADS
from .loss import MultiLabelSigLipLoss
from .registry import list_ecg_models, register_ecg_text_model, register_model_configs
from .text_towers import install_text_tower_seams
from .zeroshot import build_zeroshot_classifier, encode_ecg, predict_proba

install_text_tower_seams()
install_exported_folder_seams()
register_model_configs()

__version__ = "0.1.0"

__all__ = [
    "LEAD_SETS",
    "STANDARD_LEADS",
    "MultiLabelSigLipLoss",
    "build_zeroshot_classifier",
    "create_model_and_transforms",
    "encode_ecg",
    "list_ecg_models",
    "predict_proba",
    "register_ecg_text_model",
    "register_model_configs",
]
