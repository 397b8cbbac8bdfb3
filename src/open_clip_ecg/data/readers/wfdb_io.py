"""WFDB loading shared by every reader: header parsing with one documented repair, signal
loading for `.dat` and Challenge `.mat` records, and size checks that turn a bad file into a
:class:`RecordError` with a precise reason instead of a numpy reshape error.

Reasons raised here (see ``record.SKIP_REASONS``):

- ``unreadable``: header or signal file missing, header not parseable even after the repair,
  unknown physical units, or wfdb/scipy failing on the file;
- ``truncated``: a signal file holds fewer samples than the header promises;
- ``lead_count``: the signal file holds a whole number of frames of a *different* lead count
  than the header lists (e.g. the header names 12 leads, the data has 11 x ``sig_len``).
  For interleaved `.dat` files this is inferred from the file size, so a file truncated to
  exactly ``k * sig_len`` samples would be reported as ``lead_count``; that is the only
  ambiguity.
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np
import scipy.io
import wfdb
from wfdb.io.header import HeaderSyntaxError

from ...compat import BYTES_PER_SAMPLE  # wfdb's own table of bytes per sample and format
from ..record import RecordError

PathLike = Union[str, os.PathLike]

# Multipliers from a header's physical units to millivolts. WFDB's default unit is mV.
# (wfdb reads headers as ASCII, so "uV" is the only spelling of microvolts that reaches us.)
_TO_MILLIVOLTS = {"mv": 1.0, "uv": 1e-3, "v": 1e3}

# Digital value WFDB reserves for "no sample" in 16-bit formats; becomes NaN like wfdb does.
_INVALID_INT16 = -32768


def record_base(path: PathLike) -> str:
    """The WFDB record name wfdb expects: the path without a `.hea`/`.dat`/`.mat` suffix."""
    path = os.fspath(path)
    root, ext = os.path.splitext(path)
    return root if ext.lower() in (".hea", ".dat", ".mat") else path


def read_header(path: PathLike, record_id: str = "") -> wfdb.Record:
    """Parse a WFDB header with wfdb; repair one known quirk; RecordError('unreadable') otherwise.

    The repair: PhysioNet/CinC 2020 Georgia headers put the data file name (``E00009.mat``) in the
    record line where the record name belongs, which wfdb rejects ("invalid syntax in record
    line"). Only the first token of the first line is changed (the extension is dropped), the
    repaired text is written to a temporary ``.hea`` and parsed by wfdb, so every other field
    still goes through wfdb's own parser.
    """
    base = record_base(path)
    hea = base + ".hea"
    if not os.path.isfile(hea):
        raise RecordError("unreadable", hea, "header file not found", record_id)
    try:
        return wfdb.rdheader(base)
    except HeaderSyntaxError as err:
        repaired = _repair_record_line(Path(hea).read_text(encoding="ascii", errors="ignore"))
        if repaired is None:
            raise RecordError("unreadable", hea, f"invalid WFDB header: {err}", record_id) from err
        try:
            with tempfile.TemporaryDirectory() as tmp:
                tmp_base = os.path.join(tmp, os.path.basename(base))
                Path(tmp_base + ".hea").write_text(repaired, encoding="ascii")
                return wfdb.rdheader(tmp_base)
        except Exception as err2:  # wfdb raises several types for malformed headers
            raise RecordError("unreadable", hea, f"invalid WFDB header even after repairing the "
                              f"record line: {err2}", record_id) from err2
    except Exception as err:
        raise RecordError("unreadable", hea, f"invalid WFDB header: {err}", record_id) from err


def _repair_record_line(text: str):
    """Drop a file extension from the record name in the record line; None if nothing to fix."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, _, rest = stripped.partition(" ")
        fixed = os.path.splitext(name)[0]
        if fixed == name:
            return None
        lines[i] = f"{fixed} {rest}"
        return "\n".join(lines) + "\n"
    return None


def header_comments(header: wfdb.Record) -> Dict[str, str]:
    """``#Key: value`` header comments (Challenge style: Age, Sex, Dx, ...) as a dict."""
    out = {}
    for comment in header.comments or []:
        key, sep, value = comment.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def read_wfdb(path: PathLike, record_id: str = "") -> Tuple[np.ndarray, float, List[str]]:
    """Load a WFDB record: (signal float32 [leads, samples] in mV, possibly a transposed view,
    sampling rate, lead names).

    Lead names are returned as written in the header. Invalid samples (WFDB's reserved digital
    value) come back as NaN; the preprocessing policy decides what to do with them.
    Challenge records (header naming ``.mat`` signal files, variable ``val``) are read with
    ``scipy.io.loadmat`` after :func:`read_header`; everything else with ``wfdb.rdrecord``
    directly (one header parse), and only a failed read is diagnosed from the file sizes.
    """
    base = record_base(path)
    header = read_header(base, record_id) if os.path.isfile(base + ".mat") else None
    if header is not None and header.file_name and all(f.lower().endswith(".mat") for f in header.file_name):
        signal = _read_challenge_mat(header, base, record_id)
    else:
        header = _read_dat(base, record_id)
        # a view, not a copy: every consumer selects (copies) the leads it uses in its own order
        signal = header.p_signal.T.astype(np.float32, copy=False)
    scale = _millivolt_scale(header, base, record_id)
    if not np.all(scale == 1.0):
        signal *= scale[:, None]
    return signal, float(header.fs), list(header.sig_name)


def _millivolt_scale(header: wfdb.Record, base: str, record_id: str) -> np.ndarray:
    units = header.units or ["mV"] * header.n_sig
    scale = []
    for name, unit in zip(header.sig_name, units):
        factor = _TO_MILLIVOLTS.get((unit or "mV").strip().lower())
        if factor is None:
            raise RecordError("unreadable", base + ".hea",
                              f"lead {name!r} has physical units {unit!r}; expected mV, uV or V", record_id)
        scale.append(factor)
    return np.asarray(scale, dtype=np.float32)


def _diagnose_dat_sizes(header: wfdb.Record, base: str, record_id: str) -> None:
    """Raise `truncated`/`lead_count` when a signal file is smaller than the header promises."""
    directory = os.path.dirname(os.path.abspath(base))
    sig_len = header.sig_len or 0
    per_file = Counter(header.file_name)
    first_signal = {name: header.file_name.index(name) for name in per_file}
    for file_name, i in first_signal.items():
        file_path = os.path.join(directory, file_name)
        fmt = header.fmt[i]
        if fmt not in BYTES_PER_SAMPLE or not sig_len or not os.path.isfile(file_path):
            continue  # compressed (FLAC) formats, or no length in the header: let wfdb decide
        spf = int(header.samps_per_frame[i] or 1) if header.samps_per_frame else 1
        offset = int(header.byte_offset[i] or 0) if header.byte_offset else 0
        n_sig = per_file[file_name]
        expected = offset + int(np.ceil(sig_len * n_sig * spf * BYTES_PER_SAMPLE[fmt]))
        size = os.path.getsize(file_path)
        if size >= expected:
            continue
        held = (size - offset) / (BYTES_PER_SAMPLE[fmt] * spf)
        frames_of = held / sig_len
        if held > 0 and float(frames_of).is_integer() and int(frames_of) != n_sig:
            raise RecordError("lead_count", file_path, f"header lists {n_sig} signals of {sig_len} "
                              f"samples in {file_name} but the file holds {int(frames_of)} x {sig_len}",
                              record_id)
        raise RecordError("truncated", file_path, f"{size} bytes on disk, the header needs {expected} "
                          f"({n_sig} signals x {sig_len} samples, format {fmt})", record_id)


def _read_dat(base: str, record_id: str) -> wfdb.Record:
    if not os.path.isfile(base + ".hea"):
        raise RecordError("unreadable", base + ".hea", "header file not found", record_id)
    try:
        record = wfdb.rdrecord(base, return_res=32)
    except HeaderSyntaxError as err:
        raise RecordError("unreadable", base + ".hea", f"invalid WFDB header: {err}", record_id) from err
    except FileNotFoundError as err:
        raise RecordError("unreadable", base, f"missing file: {err}", record_id) from err
    except Exception as err:  # wfdb surfaces short or malformed data as ValueError/IndexError/...
        _diagnose_dat_sizes(read_header(base, record_id), base, record_id)
        raise RecordError("unreadable", base, f"wfdb could not read the signal: {err}", record_id) from err
    if record.p_signal is None or record.n_sig == 0:
        raise RecordError("unreadable", base + ".hea", "header lists no signals", record_id)
    return record


def _read_challenge_mat(header: wfdb.Record, base: str, record_id: str) -> np.ndarray:
    """Challenge `.mat`: ``val`` int16 [leads, samples]; mV = (val - baseline) / gain per lead."""
    if not header.file_name or not header.n_sig:
        raise RecordError("unreadable", base + ".hea", "header lists no signals", record_id)
    mat_path = os.path.join(os.path.dirname(os.path.abspath(base)), header.file_name[0])
    if not os.path.isfile(mat_path):
        raise RecordError("unreadable", mat_path, "signal file not found", record_id)
    try:
        val = scipy.io.loadmat(mat_path, variable_names=["val"]).get("val")
    except Exception as err:  # scipy raises ValueError/TypeError/MatReadError on damaged files
        offset = header.byte_offset[0] if header.byte_offset and header.byte_offset[0] else 0
        expected = offset + 2 * header.n_sig * (header.sig_len or 0)
        size = os.path.getsize(mat_path)
        if size < expected:
            raise RecordError("truncated", mat_path, f"{size} bytes on disk, the header needs at least "
                              f"{expected}: {err}", record_id) from err
        raise RecordError("unreadable", mat_path, f"scipy.io.loadmat failed: {err}", record_id) from err
    if val is None or val.ndim != 2:
        raise RecordError("unreadable", mat_path, "no 2-D variable 'val' in the .mat file", record_id)
    if val.shape[0] != header.n_sig:
        raise RecordError("lead_count", mat_path, f"header lists {header.n_sig} leads, 'val' holds "
                          f"{val.shape[0]} (shape {val.shape})", record_id)
    if header.sig_len:
        if val.shape[1] < header.sig_len:
            raise RecordError("truncated", mat_path, f"'val' holds {val.shape[1]} samples, the header "
                              f"promises {header.sig_len}", record_id)
        val = val[:, : header.sig_len]  # the header is the contract, as wfdb.rdrecord treats it
    gain = np.asarray([g if g else 200.0 for g in header.adc_gain], dtype=np.float32)  # WFDB default gain
    baseline = np.asarray(header.baseline or [0] * header.n_sig, dtype=np.float32)
    signal = (val.astype(np.float32) - baseline[:, None]) / gain[:, None]
    if val.dtype == np.int16:
        signal[val == _INVALID_INT16] = np.nan
    return signal
