"""A text-embedding cache for frozen LLM text towers: each distinct text goes through the LLM once.

``open-clip-ecg text-cache --text-model FOLDER --shards DIR --out CACHE`` embeds every distinct
report in the shards (plus the zero-shot prompts for their label vocabulary); training with
``--ecg-text-cache CACHE`` then reads rows instead of running the LLM, so a step costs the same
for a 0.6B or an 8B model. Reports repeat heavily (PTB-XL's texts are mostly label sentences),
so the cache is far smaller than the dataset.

Layout of a cache folder:

* ``index.json``: format, the LLM (folder, :func:`~open_clip_ecg.decoder_lm.model_identity`,
  pooling, context length, hidden size, dtype) and the list of part files in row order;
* ``part-NNNNN.safetensors``: ``embeddings`` [n, hidden] (the LLM's pooled output, in its dtype)
  and ``keys`` [n, 32] uint8, ``sha256(identity + NUL + text)``.

Parts are written atomically before the index names them, so a crash loses at most the part in
flight and a re-run embeds only the missing texts (and removes the temporaries a killed writer
left). Appends take a file lock (``CACHE/lock``), so processes sharing a cache (prompts embedded at
evaluation) never lose each other's rows.

A cache may come from someone else (inside an exported model folder), so everything read is
checked before use, each failure one ValueError naming the file: the index's fields and types, part
names (plain ``part-NNNNN.safetensors`` names: nothing outside the folder is ever read), each
part's safetensors header, tensor shapes and dtypes, and that every row is finite.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import remove_stale_temps, write_atomic, write_json_atomic
from .decoder_lm import POOLINGS, DecoderLM, DecoderLMTokenizer, model_identity

__all__ = ["CACHE_FORMAT", "TextEmbeddingCache", "build_text_cache", "read_safetensors", "add_arguments", "run"]

CACHE_FORMAT = "open_clip_ecg.text_cache/1"
_INDEX = "index.json"
_LOCK = "lock"
_PART_NAME = re.compile(r"^part-\d{5}\.safetensors$")
_DTYPES = ("float32", "bfloat16", "float16")
# index.json's "model" entry: field -> (type, what a valid value is)
_MODEL_FIELDS = {"folder": str, "identity": str, "pooling": str, "context_length": int, "hidden_size": int,
                 "dtype": str}
_open_caches: Dict[Path, "TextEmbeddingCache"] = {}


class TextEmbeddingCache:
    """Rows of pooled LLM embeddings keyed by ``sha256(model identity + text)``.

    :meth:`open` returns one shared instance per folder and process, so a model's cached text
    tower and its tokenizer see the same rows (rows the tokenizer appends are found by the tower).
    """

    def __init__(self, folder: Path, model: Dict):
        self.folder = folder
        self.model = model
        self.identity = model["identity"]
        self.parts: List[str] = []
        self.dtype = getattr(torch, model["dtype"])  # rows added later (other device) are stored alike
        self.embeddings = torch.empty(0, model["hidden_size"], dtype=self.dtype)
        self.checks = torch.empty(0, dtype=torch.long)
        self._rows: Dict[bytes, int] = {}

    # ---------------------------------------------------------------- opening and creating
    @classmethod
    def open(cls, folder: Union[str, Path]) -> "TextEmbeddingCache":
        """The cache in `folder` (ValueError naming the folder if there is none)."""
        folder = Path(folder).expanduser().resolve()
        cache = _open_caches.get(folder)
        if cache is None:
            index = cls.read_index(folder)
            cache = cls(folder, index["model"])
            _open_caches[folder] = cache
        cache.refresh()
        return cache

    @classmethod
    def create(cls, folder: Union[str, Path], model: Dict) -> "TextEmbeddingCache":
        """Open the cache in `folder`, or start an empty one for `model` there.

        An existing cache of another model (identity differs) is refused, never mixed.
        """
        folder = Path(folder).expanduser().resolve()
        if (folder / _INDEX).is_file():
            cache = cls.open(folder)
            if cache.identity != model["identity"]:
                raise ValueError(f"{folder} caches another text model ({cache.model['folder']}, pooling "
                                 f"{cache.model['pooling']}); use a new --out folder for {model['folder']}")
            with cache._locked():
                remove_stale_temps(folder)  # parts a killed writer left behind
            return cache
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / _INDEX, {"format": CACHE_FORMAT, "model": model, "parts": []}, indent=2)
        cache = cls.open(folder)
        with cache._locked():
            remove_stale_temps(folder)  # parts a killed writer left behind
        return cache

    @staticmethod
    def read_index(folder: Path) -> Dict:
        """The checked index of the cache in `folder` (ValueError naming the file and field)."""
        path = folder / _INDEX
        if not path.is_file():
            raise ValueError(f"{folder} is not a text cache ({_INDEX} missing): build it with "
                             "`open-clip-ecg text-cache --text-model FOLDER --shards DIR --out CACHE`")
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(index, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(index).__name__}")
        if index.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path}: format {index.get('format')!r}, expected {CACHE_FORMAT!r}")
        model = index.get("model")
        if not isinstance(model, dict):
            raise ValueError(f"{path}: 'model' must be an object describing the LLM, got {model!r}")
        for field, kind in _MODEL_FIELDS.items():
            value = model.get(field)
            if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
                raise ValueError(f"{path}: model.{field} must be a {'positive integer' if kind is int else 'string'}, "
                                 f"got {value!r}")
        if model["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: model.dtype {model['dtype']!r} is not one of {_DTYPES}")
        if model["pooling"] not in POOLINGS:
            raise ValueError(f"{path}: model.pooling {model['pooling']!r} is not one of {POOLINGS}")
        parts = index.get("parts")
        if not isinstance(parts, list):
            raise ValueError(f"{path}: 'parts' must be a list of part file names, got {parts!r}")
        for name in parts:
            if not isinstance(name, str) or not _PART_NAME.match(name):
                raise ValueError(f"{path}: part {name!r} is not a part-NNNNN.safetensors file name inside the cache "
                                 "folder; a cache never names files elsewhere")
        return index

    # ---------------------------------------------------------------- keys and rows
    def key(self, text: str) -> bytes:
        return hashlib.sha256(self.identity.encode() + b"\0" + text.encode("utf-8")).digest()

    @staticmethod
    def check_value(key: bytes) -> int:
        """31 bits of a key, carried beside its row so a lookup can prove it hit the right text."""
        return int.from_bytes(key[:4], "big") & 0x7FFFFFFF

    def row(self, key: bytes) -> Optional[int]:
        return self._rows.get(key)

    def __len__(self) -> int:
        return len(self.checks)

    def refresh(self) -> None:
        """Load parts another process (or an earlier run) added since this instance last looked."""
        parts = self.read_index(self.folder)["parts"]
        if parts[:len(self.parts)] != self.parts:
            raise ValueError(f"{self.folder / _INDEX} was rewritten under this process; reopen the cache")
        self._load_parts(parts[len(self.parts):])

    def _load_parts(self, names: Sequence[str]) -> None:
        embeddings, checks = [self.embeddings], [self.checks]
        start = len(self.checks)
        for name in names:
            path = self.folder / name
            if path.is_symlink() or not path.is_file():
                raise ValueError(f"{path}: cache part missing (or a link); remove it from {_INDEX} and re-run "
                                 "text-cache")
            tensors = read_safetensors(path, "cache part")
            part, keys = tensors.get("embeddings"), tensors.get("keys")
            if part is None or keys is None:
                raise ValueError(f"{path}: a cache part holds 'embeddings' and 'keys', this one {sorted(tensors)}")
            if (part.ndim != 2 or keys.ndim != 2 or part.shape != (len(keys), self.model["hidden_size"])
                    or keys.shape[1:] != (32,) or keys.dtype != torch.uint8 or not part.is_floating_point()):
                raise ValueError(f"{path}: embeddings {tuple(part.shape)} {part.dtype} / keys {tuple(keys.shape)} "
                                 f"{keys.dtype} do not match hidden size {self.model['hidden_size']} (uint8 keys)")
            finite = torch.isfinite(part).all(dim=1)
            if not bool(finite.all()):
                raise ValueError(f"{path}: {int((~finite).sum())} of {len(part)} rows hold NaN or inf values (first: row "
                                 f"{int((~finite).nonzero()[0])}); rebuild the cache with text-cache")
            key_bytes = [bytes(k) for k in keys.tolist()]
            self._rows.update((k, start + i) for i, k in enumerate(key_bytes))
            start += len(key_bytes)
            embeddings.append(part.to(self.dtype))
            checks.append(torch.tensor([self.check_value(k) for k in key_bytes], dtype=torch.long))
            self.parts.append(name)
        if names:  # one concatenation per refresh, not one per part
            self.embeddings, self.checks = torch.cat(embeddings), torch.cat(checks)

    @contextmanager
    def _locked(self):
        with open(self.folder / _LOCK, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def append(self, keys: Sequence[bytes], embeddings: torch.Tensor) -> None:
        """Add rows (atomically: a new part, then the index); keys already present are skipped."""
        with self._locked():
            self.refresh()
            first = {k: i for i, k in reversed(list(enumerate(keys)))}  # each key once
            new = sorted(i for k, i in first.items() if k not in self._rows)
            if not new:
                return
            name = f"part-{len(self.parts):05d}.safetensors"
            tensors = {"embeddings": embeddings[new].detach().to("cpu", self.dtype).contiguous(),
                       "keys": torch.tensor([list(keys[i]) for i in new], dtype=torch.uint8)}
            write_atomic(self.folder / name, lambda tmp: save_file(tensors, tmp))
            index = self.read_index(self.folder)
            index["parts"].append(name)
            write_json_atomic(self.folder / _INDEX, index, indent=2)
            self._load_parts([name])

    def lookup(self, rows: torch.Tensor, checks: torch.Tensor) -> torch.Tensor:
        """Embeddings of `rows`; ValueError if a row is unknown or holds another text than expected."""
        if len(rows) and int(rows.max()) >= len(self):
            self.refresh()
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(self)):
            raise ValueError(f"text cache {self.folder} has {len(self)} rows; asked for row {int(rows.max())}")
        rows_cpu = rows.cpu()
        if bool((self.checks[rows_cpu] != checks.cpu()).any()):
            raise ValueError(f"text cache {self.folder}: rows do not hold the texts the tokenizer saw; "
                             "the cache was rebuilt since these tokens were made")
        return self.embeddings[rows_cpu]


def read_safetensors(path: Path, what: str) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file; one ValueError naming `path` (a `what`) when it is not one
    (truncated, random bytes, a pickle under that name: safetensors only parses, never unpickles)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: unreadable {what}, not a safetensors file ({str(e).splitlines()[0]})") from e


# -------------------------------------------------------------------------------------------------
# Building
# -------------------------------------------------------------------------------------------------

class LMEmbedder:
    """Texts -> pooled LLM embeddings in batches, loading the LLM only when first needed."""

    def __init__(self, folder: Union[str, Path], pooling: str = "last", context_length: int = 128,
                 device: Union[str, torch.device, None] = None, batch_size: int = 16):
        self.folder = Path(folder).expanduser().resolve()
        if not (self.folder / "config.json").is_file():
            raise ValueError(f"LLM folder {self.folder} does not exist or has no config.json")
        self.pooling, self.context_length, self.batch_size = pooling, context_length, batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.tokenizer = DecoderLMTokenizer(self.folder, context_length)
        self._lm = None
        self._cache_model = None

    @property
    def lm(self):
        if self._lm is None:
            self._lm = DecoderLM(self.folder, self.pooling, dtype=self.dtype).to(self.device).eval()
        return self._lm

    def cache_model(self) -> Dict:
        """The cache index's ``model`` entry (the identity hashes the weight files once)."""
        from transformers import AutoConfig

        if self._cache_model is None:
            hidden = AutoConfig.from_pretrained(str(self.folder)).get_text_config().hidden_size
            self._cache_model = {
                "folder": str(self.folder), "identity": model_identity(self.folder, self.pooling, self.context_length),
                "pooling": self.pooling, "context_length": self.context_length, "hidden_size": int(hidden),
                "dtype": self.dtype}
        return self._cache_model

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(texts))
        return torch.cat([self.lm(ids[i:i + self.batch_size].to(self.device)).cpu()
                          for i in range(0, len(ids), self.batch_size)])


def build_text_cache(texts: Iterable[str], embedder: LMEmbedder, out: Union[str, Path],
                     part_size: int = 4096, progress: bool = True) -> Dict[str, int]:
    """Embed the distinct `texts` missing from the cache in `out`; returns counts.

    Texts are embedded shortest first (little padding per batch) and written every `part_size`
    texts, so an interrupted build resumes where it stopped.
    """
    from tqdm import tqdm

    cache = TextEmbeddingCache.create(out, embedder.cache_model())
    distinct = list(dict.fromkeys(texts))
    keyed = {cache.key(t): t for t in distinct}
    missing = sorted((k for k in keyed if cache.row(k) is None), key=lambda k: len(keyed[k]))
    bar = tqdm(total=len(missing), desc="text-cache", unit="text", disable=not progress)
    for start in range(0, len(missing), part_size):
        keys = missing[start:start + part_size]
        chunk = [keyed[k] for k in keys]
        embeddings = []
        for i in range(0, len(chunk), embedder.batch_size):
            embeddings.append(embedder.embed(chunk[i:i + embedder.batch_size]))
            bar.update(len(embeddings[-1]))
        cache.append(keys, torch.cat(embeddings))
    bar.close()
    return {"distinct": len(distinct), "embedded": len(missing), "rows": len(cache)}


def _shard_texts(shard_specs: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(every report text, the zero-shot prompts of each shard folder's label vocabulary)."""
    from .data.manifest import read_shard_info
    from .data.pipeline import expand_shards, iterate_samples
    from .zeroshot import prompt_texts

    texts, prompts = [], []
    for spec in shard_specs:
        shards = expand_shards(spec)
        texts.extend(sample["text"] for sample in iterate_samples(shards))
        prompts.extend(prompt_texts([v["name"] for v in read_shard_info(shards)["vocabulary"]])[0])
    return texts, prompts


# -------------------------------------------------------------------------------------------------
# `open-clip-ecg text-cache`
# -------------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--text-model", required=True, metavar="FOLDER",
                        help="local Hugging Face decoder LM folder (Qwen3, Llama, Gemma, Mistral, ...)")
    parser.add_argument("--shards", required=True, nargs="+", metavar="SHARDS",
                        help="shard folder(s), globs or brace patterns whose texts to embed")
    parser.add_argument("--out", required=True, metavar="CACHE", help="cache folder (created or resumed)")
    parser.add_argument("--pooling", choices=("last", "mean"), default="last",
                        help="last real token (EOS; default) or mean over the text's tokens")
    parser.add_argument("--context-length", type=int, default=128, help="tokens per text incl. EOS (default 128)")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per LLM forward (default 16)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--no-prompts", action="store_true",
                        help="skip the zero-shot prompts of the shards' label vocabulary")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    embedder = LMEmbedder(args.text_model, args.pooling, args.context_length, args.device, args.batch_size)
    if (Path(args.out) / _INDEX).is_file():
        TextEmbeddingCache.open(args.out)  # a broken cache fails now, not after reading every shard
    texts, prompts = _shard_texts(args.shards)
    counts = build_text_cache(texts + ([] if args.no_prompts else prompts), embedder, args.out,
                              progress=not args.no_progress)
    print(f"text cache {os.path.abspath(args.out)}: {counts['distinct']} distinct texts "
          f"({len(texts)} reports + {0 if args.no_prompts else len(prompts)} prompts), "
          f"{counts['embedded']} embedded now, {counts['rows']} rows in total")
    return 0
