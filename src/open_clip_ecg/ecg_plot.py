"""The standard clinical 12-lead printout of one ECG, as a PNG (matplotlib).

Layout as on paper: 3 rows x 4 columns of 2.5 s each (I, II, III | aVR, aVL, aVF | V1, V2, V3 |
V4, V5, V6; the columns follow one another in time, the leads of a column are simultaneous), and a
10 s lead II rhythm strip below, at 25 mm/s and 10 mm/mV on a millimetre grid (1 mm minor, 5 mm
major lines) with a 1 mV calibration pulse at the start of each row. Axes are in millimetres with
equal aspect and the figure is sized in millimetres, so the printed scale is true at 100 %.

PyPI's ECG plotting packages were considered: ``ecg-plot`` 0.3 is an SVG/pandas chart library without
this layout, ``dicom-ecg-plot`` reads DICOM only, and wfdb's ``plot_wfdb`` draws one lead per row.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .atomic import write_atomic
from .leads import STANDARD_LEADS, canonical_lead_name

PAPER_SPEED = 25.0  # mm/s
GAIN = 10.0  # mm/mV
COLUMN_SECONDS = 2.5
RHYTHM_SECONDS = 10.0
ROW_HEIGHT = 30.0  # mm between row baselines (3 mV)
LAYOUT = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"), ("III", "aVF", "V3", "V6"))
RHYTHM_LEAD = "II"
CALIBRATION = 5.0  # mm: the 1 mV, 0.2 s pulse at the start of each row
GRID_COLOUR, TRACE_COLOUR = "#f4a8a8", "black"


def _baseline_mv(x: np.ndarray) -> np.ndarray:
    """The lead with its median removed (the isoelectric line sits on the row's baseline)."""
    finite = x[np.isfinite(x)]
    return x - (np.median(finite) if finite.size else 0.0)


def plot_12lead(signal: np.ndarray, sampling_rate: float, lead_names: Sequence[str], path,
                title: str = "", subtitle: Optional[str] = None) -> None:
    """Write the 12-lead printout of `signal` ``[leads, T]`` (mV) at `sampling_rate` to `path` (PNG,
    atomically). Leads are found by name in any spelling; absent leads leave their place empty and
    labelled ``(absent)``. The first 10 s are drawn; shorter records leave the rest of the paper blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    signal = np.asarray(signal, dtype=np.float64)
    rate = float(sampling_rate)
    by_name = {canonical_lead_name(n): i for i, n in enumerate(lead_names)}
    width = RHYTHM_SECONDS * PAPER_SPEED + CALIBRATION + 4
    height = ROW_HEIGHT * (len(LAYOUT) + 1) + 5
    margin_top, margin = 22.0, 6.0  # mm for the title; around the paper
    fig = plt.figure(figsize=((width + 2 * margin) / 25.4, (height + margin_top + margin) / 25.4), dpi=150)
    ax = fig.add_axes([margin / (width + 2 * margin), margin / (height + margin_top + margin),
                       width / (width + 2 * margin), height / (height + margin_top + margin)])
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_aspect("equal")
    ax.axis("off")
    for step, lw in ((1.0, 0.2), (5.0, 0.6)):  # the millimetre grid, then its 5 mm lines
        ax.vlines(np.arange(0, width + 0.01, step), 0, height, colors=GRID_COLOUR, lw=lw, zorder=0)
        ax.hlines(np.arange(0, height + 0.01, step), 0, width, colors=GRID_COLOUR, lw=lw, zorder=0)

    def trace(lead: str, start_s: float, seconds: float, x0: float, y0: float) -> None:
        ax.text(x0 + 1, y0 + 9, lead if lead in by_name else f"{lead} (absent)", fontsize=7, zorder=3)
        if lead not in by_name:
            return
        first, last = int(round(start_s * rate)), int(round((start_s + seconds) * rate))
        values = _baseline_mv(signal[by_name[lead]])[first:last]
        if values.size:
            t = np.arange(values.size) / rate
            ax.plot(x0 + t * PAPER_SPEED, y0 + values * GAIN, color=TRACE_COLOUR, lw=0.6, zorder=2)

    def calibration(y0: float) -> None:
        pulse = np.array([[0, 0], [1, 0], [1, GAIN], [1 + CALIBRATION, GAIN], [1 + CALIBRATION, 0], [CALIBRATION + 2, 0]])
        ax.plot(pulse[:, 0], y0 + pulse[:, 1], color=TRACE_COLOUR, lw=0.8, zorder=2)

    x_start = CALIBRATION + 2
    for row, leads in enumerate(LAYOUT):
        y0 = height - ROW_HEIGHT * (row + 0.5) - 5
        calibration(y0)
        for column, lead in enumerate(leads):
            trace(lead, column * COLUMN_SECONDS, COLUMN_SECONDS, x_start + column * COLUMN_SECONDS * PAPER_SPEED, y0)
    y0 = ROW_HEIGHT * 0.5
    calibration(y0)
    trace(RHYTHM_LEAD, 0.0, RHYTHM_SECONDS, x_start, y0)
    fig.text(0.01, 0.985, title, fontsize=9, va="top", ha="left", weight="bold")
    if subtitle:
        fig.text(0.01, 0.95, subtitle, fontsize=7.5, va="top", ha="left")
    fig.text(0.99, 0.985, f"{PAPER_SPEED:g} mm/s, {GAIN:g} mm/mV", fontsize=7, va="top", ha="right")
    missing = [lead for lead in STANDARD_LEADS if lead not in by_name]
    if missing:
        fig.text(0.99, 0.965, f"absent leads: {', '.join(missing)}", fontsize=7, va="top", ha="right")
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
