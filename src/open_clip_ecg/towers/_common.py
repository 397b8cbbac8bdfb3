"""What every ECG tower shares: the input check at its boundary and its timm pretrained cfg.

A wrong lead count or a NaN would otherwise surface as a conv shape error or as NaN losses several
layers down; checking here turns both into a ValueError that names the expected input.
"""
from typing import Dict, List, Optional, Sequence

import torch

from ..leads import LEAD_SETS


def default_lead_names(num_leads: int) -> Optional[List[str]]:
    """Lead names a model with `num_leads` inputs expects: the 12-lead, 6 limb-lead or lead-I set."""
    names = LEAD_SETS.get(str(num_leads))
    return list(names) if names is not None else None


def check_ecg_input(
        x: torch.Tensor,
        num_leads: int,
        min_samples: int,
        lead_names: Optional[Sequence[str]] = None,
        check_finite: bool = True,
) -> None:
    """Raise ValueError unless `x` is a finite floating [batch, leads, samples] tensor the tower can take.

    The finiteness check costs one reduction and, on GPU, a host sync per forward; it keeps a
    corrupt record from silently turning a whole training step into NaN. Towers built with
    ``check_finite=False`` skip it (for pipelines that already validate their signals).
    """
    expected = f"a float tensor [batch, {num_leads} leads, >= {min_samples} samples]"
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"ECG tower expects {expected}, got {type(x).__name__}")
    if x.ndim != 3:
        raise ValueError(f"ECG tower expects {expected}, got a {x.ndim}-D tensor of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"ECG tower expects {expected}, got dtype {x.dtype}")
    if x.shape[1] != num_leads:
        names = f" ({', '.join(lead_names)})" if lead_names else ""
        raise ValueError(
            f"model expects {num_leads} leads{names}, got {x.shape[1]} (input shape {tuple(x.shape)}, "
            f"expected [batch, leads, samples])")
    if x.shape[2] < min_samples:
        raise ValueError(
            f"ECG too short: model needs at least {min_samples} samples per lead, got {x.shape[2]} "
            f"(input shape {tuple(x.shape)})")
    if check_finite and not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"ECG input contains {n_bad} non-finite (NaN/Inf) values (input shape {tuple(x.shape)})")


def ecg_pretrained_cfg(first_conv: str, classifier: str, leads: int = 12, **kwargs) -> Dict:
    """timm pretrained cfg of an ECG tower. No weights are published: url stays empty and the
    open_clip configs set timm_model_pretrained false. ``input_size`` is (leads, 1, samples), 10 s
    at 500 Hz; its first entry is the lead count timm passes as ``in_chans``; pool_size None marks
    the features as 1-D for open_clip's TimmModel."""
    return {
        "url": "",
        "num_classes": 0,
        "input_size": (leads, 1, 5000),
        "pool_size": None,
        "first_conv": first_conv,
        "classifier": classifier,
        "license": "mit",
        **kwargs,
    }
