"""Every private or version-specific use of open_clip, open_clip_train, timm, wfdb and torch.

open_clip has no plugin API beyond ``add_model_config``, so the package reaches into upstream
modules at the few places listed in :data:`SEAMS`. Each entry names the module, the attribute and
why we need it. Nothing else in the package touches upstream internals: it imports them from here
(``from .compat import BYTES_PER_SAMPLE``) or swaps them through :func:`swapped` / :func:`install`.
When an attribute is missing, the error names it, the installed version and the supported one,
instead of a bare ``AttributeError`` from deep inside a training run.

Supported versions
------------------
open_clip_torch **3.3.x** (``setup.py`` pins ``>=3.3,<3.4``, so pip refuses others). Importing the
package with another version *warns* rather than refuses: a patch or minor release usually keeps
most seams, and each missing one fails with its own clear message when it is first used
(:class:`UpstreamChanged`). ``tests/test_compat.py`` checks that every seam exists in the installed
packages and that every flag ``training.options.REJECTED_FLAGS`` rejects is still one of open_clip_train's.

Seams per purpose (see :data:`SEAMS` for the exact list)
--------------------------------------------------------
* Training (:mod:`open_clip_ecg.training.seams`, swapped for one run and restored): ``open_clip_train.main``'s
  ``parse_args``, ``create_model_and_transforms``, ``create_loss`` and ``torch`` (checkpoint saves
  and DDP; see :func:`module_view` for why the name ``torch`` itself), ``open_clip_train.data.
  get_dataset_fn`` and ``open_clip_train.train.zero_shot_eval``; read only: ``open_clip_train.main.
  main`` (the loop), ``open_clip_train.precision.get_autocast``, ``open_clip_train.params.parse_args``
  (the flag list ``REJECTED_FLAGS`` is checked against) and the data helpers
  :mod:`open_clip_ecg.data.pipeline` reuses from ``open_clip_train.data``.
* Text towers (:mod:`open_clip_ecg.text_towers`, installed on import): ``open_clip.model.
  _build_text_tower`` and ``open_clip.factory.HFTokenizer``.
* Model configs (:mod:`open_clip_ecg.registry`): ``open_clip.factory._MODEL_CONFIG_PATHS`` and
  ``_rescan_model_configs``. The public ``open_clip.add_model_config`` appends its path on every
  call, so re-registering a changed config through it would grow open_clip's path list each time;
  with the two private names a folder is added once and rescanned afterwards.
  ``open_clip.factory._get_hf_config`` reads an exported model's config (:mod:`open_clip_ecg.exported_folder`).
* Exported folders (:mod:`open_clip_ecg.exported_folder`, installed on import):
  ``open_clip.factory._find_checkpoint_in_dir`` and ``load_checkpoint`` (check the folder, load strictly).
* Elsewhere: timm's ``feature_take_indices`` (towers' ``forward_intermediates``; timm exports it
  only from the private ``timm.models._features``), wfdb's ``BYTES_PER_SAMPLE`` (the size check
  of signal files), torch's ``_is_mkldnn_bf16_supported`` (does this CPU do bfloat16).

Imported directly elsewhere, because they are public (no underscore) names of upstream modules:
``open_clip.loss.SigLipLoss`` and its neighbour-exchange
functions (:mod:`open_clip_ecg.loss` subclasses the loss), ``open_clip.factory.load_state_dict``
and ``parse_model_name``, ``open_clip.tokenizer.get_clean_fn``, timm's model-building API.

Upstream's development branch (open_clip 4.2.0.dev0, not on PyPI)
-------------------------------------------------------------------
Read on GitHub (``mlfoundations/open_clip`` main: ``src/open_clip_train/main.py``, ``train.py``,
``src/open_clip/task/{base_task,clip_task,siglip_task,clap_task,checkpoint}.py``). There
``create_loss`` is gone: ``main`` calls ``create_task(args, model=..., dist_model=...)``, which
wraps model and loss in a ``TrainingTask`` (``SigLIPTask(model, loss=..., rank, world_size,
dist_impl)``; ``CLAPTask`` takes dict batches and names its inputs in ``data_keys``). Our seams map
onto it like this, so the move is this module plus the ECG task class:

=========================================== ====================================================
seam here (3.3)                             on 4.2.0.dev0
=========================================== ====================================================
``main.create_loss``                        ``main.create_task``: return an ``ECGSigLIPTask``, a
                                            ``SigLIPTask`` built with ``loss=MultiLabelSigLipLoss``
                                            whose ``training_forward(images, texts)`` unpacks the
                                            labels (today's label-carrying model forward) and
                                            whose ``compute_accum_loss`` passes the cached labels
``main.create_model_and_transforms``        unchanged name; only the logit init and the BatchNorm1d
                                            lock remain (label passing moves into the task)
``main.torch`` (DDP)                        gone: DDP is built in ``TrainingTask.
                                            prepare_distributed(device_ids=...)``, which the ECG
                                            task overrides to drop CPU device ids
``main.torch`` (save)                       ``main.save_checkpoint(task, ...)`` returns the dict
                                            (add the ``ecg_preprocess`` key there); ``main`` still
                                            calls ``torch.save`` itself, so the atomic write keeps
                                            a view of ``torch`` with only ``save`` replaced
``main.parse_args``                         unchanged
``data.get_dataset_fn``                     unchanged name; ``get_data`` also passes
                                            ``naflex_data_config`` (not verified for dataset fns)
``train.zero_shot_eval``                    unchanged name, now called with the task: unwrap with
                                            ``open_clip.task.get_model_from_task``
labels packed in the text rows              could become a dict batch (``{"ecg", "text",
                                            "labels", "text_labels"}``) read by the task's
                                            ``data_keys``, as ``CLAPTask`` does; not verified that
                                            ``train_one_epoch`` passes dicts for non-audio tasks
=========================================== ====================================================

Not verified there: ``open_clip.model._build_text_tower``, ``open_clip.factory.HFTokenizer``,
``_MODEL_CONFIG_PATHS``/``_rescan_model_configs``, ``_get_hf_config``, ``_find_checkpoint_in_dir``,
``load_checkpoint`` and the
``open_clip_train.data`` helpers (the files read did not cover them), and the exact
``train_one_epoch`` signature (it changed between the commits read).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import re
import types
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

SUPPORTED_OPEN_CLIP = (3, 3)  # the open_clip_torch minor series the seams are tested with
SUPPORTED = {"open_clip_torch": "3.3.x", "timm": ">=1.0.17,<2", "wfdb": ">=4.1,<5", "torch": ">=2.1"}


class UpstreamChanged(RuntimeError):
    """An upstream attribute open_clip_ecg relies on is missing from the installed version."""


def installed_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


@dataclass(frozen=True)
class Seam:
    """One upstream attribute we read or replace: ``module`` is importable, ``attribute`` may be dotted."""

    module: str
    attribute: str
    why: str
    package: str = "open_clip_torch"  # the distribution that provides it, for the error message

    @property
    def name(self) -> str:
        return f"{self.module}.{self.attribute}"

    def _owner(self) -> Tuple[Any, str]:
        """(object holding the last attribute component, that component)."""
        try:
            owner = importlib.import_module(self.module)
        except ImportError as e:
            raise self._missing(f" (cannot import {self.module}: {e})") from e
        *path, last = self.attribute.split(".")
        for part in path:
            if not hasattr(owner, part):
                raise self._missing()
            owner = getattr(owner, part)
        return owner, last

    def _missing(self, detail: str = "") -> UpstreamChanged:
        return UpstreamChanged(
            f"open_clip_ecg needs {self.name} ({self.why}), which {self.package} "
            f"{installed_version(self.package)} does not have{detail}; supported: {self.package} "
            f"{SUPPORTED[self.package]}")

    def get(self) -> Any:
        owner, last = self._owner()
        if not hasattr(owner, last):
            raise self._missing()
        return getattr(owner, last)

    def set(self, value: Any) -> None:
        owner, last = self._owner()
        if not hasattr(owner, last):
            raise self._missing()
        setattr(owner, last, value)


# --- open_clip_train: swapped for one training run by open_clip_ecg.training.seams -------------
PARSE_ARGS = Seam("open_clip_train.main", "parse_args",
                  "adds the --ecg-* options, forces SigLIP, rejects flags that cannot work with ECGs")
CREATE_MODEL_AND_TRANSFORMS = Seam("open_clip_train.main", "create_model_and_transforms",
                                   "logit init, label-carrying forward, BatchNorm1d-aware lock_image_tower")
CREATE_LOSS = Seam("open_clip_train.main", "create_loss", "the multi-label SigLIP loss")
MAIN_TORCH = Seam("open_clip_train.main", "torch",
                  "atomic checkpoint saves with the ECG preprocessing, DDP on CPUs (see module_view)")
GET_DATASET_FN = Seam("open_clip_train.data", "get_dataset_fn", "ECG shard loaders instead of image loaders")
ZERO_SHOT_EVAL = Seam("open_clip_train.train", "zero_shot_eval", "multi-label zero-shot on the val shards")
TRAINING_MAIN = Seam("open_clip_train.main", "main", "the training loop itself, run with the seams above")
GET_AUTOCAST = Seam("open_clip_train.precision", "get_autocast", "zero-shot validation under the run's --precision")
TRAIN_PARAMS_PARSE_ARGS = Seam("open_clip_train.params", "parse_args",
                               "the flag list REJECTED_FLAGS is checked against")
PIPELINE_HELPERS = tuple(
    Seam("open_clip_train.data", name, "reused by the ECG loaders: epoch sync, deterministic shard shuffling")
    for name in ("DataInfo", "ResampledShards2", "SharedEpoch", "detshuffle2", "expand_urls"))

# --- open_clip: text towers (installed on import by open_clip_ecg.text_towers) -----------------
BUILD_TEXT_TOWER = Seam("open_clip.model", "_build_text_tower",
                        "CustomTextCLIP builds its text tower through it: decoder-LLM and cached towers")
HF_TOKENIZER = Seam("open_clip.factory", "HFTokenizer",
                    "get_tokenizer builds HF tokenizers through it: decoder-LLM and cache tokenizers")

# --- open_clip: model config registry (open_clip_ecg.registry) and exported configs -------------
MODEL_CONFIG_PATHS = Seam("open_clip.factory", "_MODEL_CONFIG_PATHS",
                          "add the resolved config folder once instead of on every registration")
RESCAN_MODEL_CONFIGS = Seam("open_clip.factory", "_rescan_model_configs",
                            "re-read the config folder after a registration changed it")
GET_HF_CONFIG = Seam("open_clip.factory", "_get_hf_config", "read the open_clip_config.json of an hf-hub: model")
FIND_CHECKPOINT_IN_DIR = Seam("open_clip.factory", "_find_checkpoint_in_dir",
                              "check an exported ECG folder's config and weights file before anything is built")
LOAD_CHECKPOINT = Seam("open_clip.factory", "load_checkpoint",
                       "load an exported ECG folder's weights strictly (all tensors, finite)")

# --- timm, wfdb, torch --------------------------------------------------------------------------
FEATURE_TAKE_INDICES = Seam("timm.models._features", "feature_take_indices",
                            "the towers' forward_intermediates index handling, as timm's models do", "timm")
BYTES_PER_SAMPLE_SEAM = Seam("wfdb.io._signal", "BYTES_PER_SAMPLE",
                             "expected signal file sizes per WFDB format", "wfdb")
MKLDNN_BF16 = Seam("torch", "ops.mkldnn._is_mkldnn_bf16_supported",
                   "whether this CPU has native bfloat16 (quickstart's default precision)", "torch")

SEAMS: Tuple[Seam, ...] = (
    PARSE_ARGS, CREATE_MODEL_AND_TRANSFORMS, CREATE_LOSS, MAIN_TORCH, GET_DATASET_FN, ZERO_SHOT_EVAL,
    TRAINING_MAIN, GET_AUTOCAST, TRAIN_PARAMS_PARSE_ARGS, *PIPELINE_HELPERS, BUILD_TEXT_TOWER, HF_TOKENIZER, MODEL_CONFIG_PATHS,
    RESCAN_MODEL_CONFIGS, GET_HF_CONFIG, FIND_CHECKPOINT_IN_DIR, LOAD_CHECKPOINT, FEATURE_TAKE_INDICES,
    BYTES_PER_SAMPLE_SEAM, MKLDNN_BF16,
)

# Upstream values other modules import from here (resolved on first access: importing this module
# must not import wfdb or open_clip_train).
_EXPORTS: Dict[str, Seam] = {
    "BYTES_PER_SAMPLE": BYTES_PER_SAMPLE_SEAM,
    "feature_take_indices": FEATURE_TAKE_INDICES,
    "get_hf_config": GET_HF_CONFIG,
    **{seam.attribute: seam for seam in PIPELINE_HELPERS},
}


def __getattr__(name: str) -> Any:
    seam = _EXPORTS.get(name)
    if seam is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return seam.get()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN)."""
    return bool(MKLDNN_BF16.get()())


# --------------------------------------------------------------------------------------------
# Swapping seams
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def swapped(replacements: Sequence[Tuple[Seam, Any]]) -> Iterator[None]:
    """Replace each seam's attribute for the ``with`` block, restore the originals afterwards.

    Every seam is looked up before anything is replaced, so a missing one changes nothing."""
    originals = [(seam, seam.get()) for seam, _ in replacements]
    try:
        for seam, value in replacements:
            seam.set(value)
        yield
    finally:
        for seam, value in reversed(originals):
            seam.set(value)


def install(seam: Seam, value: Any) -> None:
    """Replace `seam` for the rest of the process (a delegating replacement reads the original first)."""
    seam.set(value)


def module_view(base: types.ModuleType, replacements: Mapping[str, Any]) -> types.ModuleType:
    """`base` as seen through one module's global name, with the dotted attribute paths in
    `replacements` answered differently and every other attribute being `base`'s own.

    Why this exists: open_clip_train 3.3's ``main()`` calls ``torch.save(...)`` for its checkpoints
    and ``torch.nn.parallel.DistributedDataParallel(model, device_ids=[device])`` directly on its
    module-global ``torch``, with no function of its own in between: that global name is the
    narrowest seam for both. Replacing ``torch.save`` or ``DistributedDataParallel`` in torch itself
    would change them for the whole process (our atomic save calls the real ``torch.save``).
    """
    nested: Dict[str, Dict[str, Any]] = {}
    direct: Dict[str, Any] = {}
    for path, value in replacements.items():
        head, _, rest = path.partition(".")
        if not hasattr(base, head):
            raise UpstreamChanged(f"{base.__name__}.{head} does not exist; cannot replace {path}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, inner in nested.items():
        direct[head] = module_view(getattr(base, head), inner)
    return _ModuleView(base, direct)


class _ModuleView(types.ModuleType):
    """A module answering with `overrides` first and `base` for everything else."""

    def __init__(self, base: types.ModuleType, overrides: Mapping[str, Any]):
        super().__init__(base.__name__, base.__doc__)
        self._base = base
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._base, name)


# --------------------------------------------------------------------------------------------
# Version check
# --------------------------------------------------------------------------------------------

def open_clip_version_problem(version: str) -> Optional[str]:
    """None for a supported open_clip_torch version, else what to expect with this one."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match and (int(match[1]), int(match[2])) == SUPPORTED_OPEN_CLIP:
        return None
    return (f"open_clip_ecg is tested with open_clip_torch {SUPPORTED['open_clip_torch']}, not {version}: "
            "the upstream names it relies on (open_clip_ecg.compat.SEAMS) may have moved; each is checked "
            "when first used and fails naming what is missing")


@functools.lru_cache(maxsize=None)
def check_open_clip_version(version: Optional[str] = None) -> None:
    """Warn (once) when the installed open_clip_torch is outside the tested series."""
    problem = open_clip_version_problem(version or installed_version("open_clip_torch"))
    if problem:
        warnings.warn(problem, stacklevel=2)
