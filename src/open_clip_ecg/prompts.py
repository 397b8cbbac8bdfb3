"""Zero-shot prompts: per finding its English name and synonyms; templates come from the user or
:data:`open_clip_ecg.zeroshot.DEFAULT_TEMPLATES`.

Shipped tables (``resources/``): ``prompts_scp.json`` (the 71 PTB-XL SCP statements, plus
``subclass:X`` / ``superclass:X`` for the benchmark's diagnostic aggregations) and
``prompts_snomed.json`` (the SNOMED CT codes of the PhysioNet/CinC Challenge mappings). Both, and
a user's override file, have one format::

    {"templates": ["an ECG showing {}.", ...],          # optional: replaces the default templates
     "findings": {"AFIB": {"name": "atrial fibrillation", "synonyms": ["AFib"]},
                  "MI": ["myocardial infarction", "infarct"],   # or simply a list of names
                  "NORM": "normal ECG"}}                         # or one name

A label's names are the user's entry for the label code (or for any of its prompt keys) if there
is one; otherwise the shipped entries of its prompt keys, merged; otherwise its task name.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

RESOURCES = Path(__file__).resolve().parent / "resources"
SCP_PROMPTS = RESOURCES / "prompts_scp.json"
SNOMED_PROMPTS = RESOURCES / "prompts_snomed.json"


def _entry_names(path, key: str, value) -> List[str]:
    if isinstance(value, str):
        names = [value]
    elif isinstance(value, list):
        names = value
    elif isinstance(value, Mapping) and isinstance(value.get("name"), str):
        names = [value["name"], *value.get("synonyms", [])]
    else:
        raise ValueError(f"{path}: finding {key!r} must be a name, a list of names or "
                         f"{{'name': ..., 'synonyms': [...]}}, got {value!r}")
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"{path}: finding {key!r} needs non-empty names, got {value!r}")
    return [n.strip() for n in names]


def load_prompt_file(path) -> Dict:
    """Read and check a prompt file: ``{"templates": list or None, "findings": {key: entry}}``.

    Entries keep their fields (``name``, ``synonyms``, ...); :func:`finding_names` turns one into
    its list of names. Raises ValueError naming the file on any format problem.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("findings", {}), Mapping):
        raise ValueError(f"{path}: expected an object with 'findings' (and optionally 'templates')")
    templates = data.get("templates")
    if templates is not None and (not isinstance(templates, list) or not templates
                                  or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates)):
        raise ValueError(f"{path}: 'templates' must be a non-empty list of strings with exactly one '{{}}'")
    findings = dict(data.get("findings", {}))
    for key, value in findings.items():
        _entry_names(path, key, value)
    if not findings and templates is None:
        raise ValueError(f"{path}: neither 'findings' nor 'templates' given")
    return {"templates": templates, "findings": findings}


def finding_names(entry) -> List[str]:
    """A prompt-file entry -> its names (name first)."""
    return _entry_names("prompt entry", "?", entry)


@lru_cache(maxsize=None)
def shipped_prompts() -> Dict[str, Tuple[str, ...]]:
    """Prompt key -> names, from both shipped tables (SCP keys are letters, SNOMED keys digits)."""
    table: Dict[str, Tuple[str, ...]] = {}
    for path in (SCP_PROMPTS, SNOMED_PROMPTS):
        for key, entry in load_prompt_file(path)["findings"].items():
            table[key] = tuple(finding_names(entry))
    return table


def _unique(names: Sequence[str]) -> List[str]:
    seen, out = set(), []
    for name in names:
        if name.casefold() not in seen:
            seen.add(name.casefold())
            out.append(name)
    return out


PROMPT_NAMES = ("shipped", "name", "vocabulary")


def task_prompts(labels, user_file=None, rule: str = "shipped", vocabulary_names: Optional[Mapping[str, str]] = None
                 ) -> Tuple[Dict[str, List[str]], Optional[List[str]], Dict[str, str]]:
    """Names per label code, the user's templates (None: use the defaults), and each label's source.

    `labels` are :class:`open_clip_ecg.tasks.TaskLabel` (``code``, ``name``, ``prompt_keys``).
    `rule` picks the names of labels the user's file does not name: ``shipped`` (the shipped
    entries of the label's prompt keys, name and synonyms), ``name`` (their first name only) or
    ``vocabulary`` (``vocabulary_names[code]``, the shards' own name for the code, else as ``name``).
    A label nothing names is prompted with its task name.
    """
    if rule not in PROMPT_NAMES:
        raise ValueError(f"unknown prompt names {rule!r}; expected one of {', '.join(PROMPT_NAMES)}")
    user = load_prompt_file(user_file) if user_file else {"templates": None, "findings": {}}
    shipped = shipped_prompts()
    vocabulary_names = vocabulary_names or {}
    names: Dict[str, List[str]] = {}
    sources: Dict[str, str] = {}
    for label in labels:
        user_key = next((k for k in (label.code, *label.prompt_keys) if k in user["findings"]), None)
        shipped_names = _unique([n for key in label.prompt_keys for n in shipped.get(key, ())])
        if user_key is not None:
            names[label.code], sources[label.code] = _unique(finding_names(user["findings"][user_key])), \
                f"user file ({user_key})"
        elif rule == "vocabulary" and label.code in vocabulary_names:
            names[label.code], sources[label.code] = [vocabulary_names[label.code]], "vocabulary"
        elif shipped_names:
            names[label.code] = shipped_names if rule == "shipped" else shipped_names[:1]
            sources[label.code] = "shipped" if rule == "shipped" else "shipped name"
        else:
            names[label.code], sources[label.code] = [label.name], "label name"
    return names, user["templates"], sources
