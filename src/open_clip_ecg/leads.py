"""Standard lead names, their spelling variants, and the reduced lead sets models are built for."""
from __future__ import annotations

import functools
import re
from typing import Dict, List, Sequence

STANDARD_LEADS: List[str] = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]

# Input channels derived from the leads rather than recorded (open_clip_ecg.data.rhythm): the
# current RR interval relative to the record's median, and the heart rate.
RR_CHANNELS: List[str] = ["RR-ratio", "HR"]

# Named lead sets; a model for a reduced set expects exactly these leads, in this order.
# "12+rr": the 12 leads followed by the RR channels (towers such as ecg_resnet1d18_rr).
LEAD_SETS: Dict[str, List[str]] = {
    "12": STANDARD_LEADS,
    "12+rr": STANDARD_LEADS + RR_CHANNELS,
    "6": ["I", "II", "III", "aVR", "aVL", "aVF"],  # limb leads
    "1": ["I"],
}

_ALIASES = {
    "1": "I", "2": "II", "3": "III",
    "AVR": "aVR", "AVL": "aVL", "AVF": "aVF",
    "MLI": "I", "MLII": "II", "MLIII": "III",
}


@functools.lru_cache(maxsize=4096)  # called dozens of times per record by the shard writer
def canonical_lead_name(name: str) -> str:
    """Map a spelling variant ('avr', 'AVR', 'lead_ii', 'MLII', 'v1') to the standard name.

    Unknown names come back stripped but otherwise unchanged, so callers can report them.
    """
    key = re.sub(r"^(lead)[\s_\-]*", "", name.strip(), flags=re.IGNORECASE).upper()
    if key in _ALIASES:
        return _ALIASES[key]
    if key in ("I", "II", "III"):
        return key
    if re.fullmatch(r"V[1-6]", key):
        return key
    return name.strip()


def lead_set(name_or_leads) -> List[str]:
    """Resolve '12' / '6' / '1' or an explicit sequence of lead names to canonical names."""
    if isinstance(name_or_leads, str):
        if name_or_leads not in LEAD_SETS:
            raise ValueError(f"unknown lead set {name_or_leads!r}; expected one of {sorted(LEAD_SETS)} "
                             "or a list of lead names")
        return list(LEAD_SETS[name_or_leads])
    leads = [canonical_lead_name(n) for n in name_or_leads]
    unknown = [n for n in leads if n not in STANDARD_LEADS]
    if unknown:
        raise ValueError(f"unknown lead names {unknown}; expected names among {STANDARD_LEADS}")
    return leads


def lead_indices(leads: Sequence[str], wanted: Sequence[str]) -> List[int]:
    """Positions of `wanted` leads inside `leads` (both canonicalised); ValueError if any is absent."""
    canon = [canonical_lead_name(n) for n in leads]
    missing = [w for w in wanted if canonical_lead_name(w) not in canon]
    if missing:
        raise ValueError(f"leads {missing} not present; have {canon}")
    return [canon.index(canonical_lead_name(w)) for w in wanted]
