"""preprocess_record: resampling, lead order, missing-lead / non-finite / flat / length policies."""

import numpy as np
import pytest

from open_clip_ecg.data.preprocess import fix_length, preprocess_record, resample, to_float16
from open_clip_ecg.data.record import ECGRecord, RecordEntry, RecordError
from open_clip_ecg.leads import LEAD_SETS, STANDARD_LEADS

def make_record(signal, fs=500, leads=STANDARD_LEADS, record_id="rec1"):
    entry = RecordEntry(record_id=record_id, path=f"/data/{record_id}", patient_id="p1")
    return ECGRecord(entry=entry, signal=np.asarray(signal, dtype=np.float32), sampling_rate=fs,
                     lead_names=list(leads))


def lead_signals(n_leads=12, seconds=10.0, fs=500, seed=0):
    """Distinct per-lead sines plus noise (mV), so rows can be told apart."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * fs))) / fs
    freqs = np.linspace(1.0, 6.5, n_leads)[:, None]
    return (np.sin(2 * np.pi * freqs * t) * np.linspace(0.3, 1.5, n_leads)[:, None]
            + 0.01 * rng.standard_normal((n_leads, t.size))).astype(np.float32)


def dominant_frequency(x, fs):
    spectrum = np.abs(np.fft.rfft(x - x.mean()))
    return np.fft.rfftfreq(x.size, 1 / fs)[spectrum.argmax()]


@pytest.mark.parametrize("source_fs, target_fs", [(500, 100), (100, 500), (257, 500), (1000, 250)])
def test_resampling_preserves_a_sines_frequency(source_fs, target_fs):
    t = np.arange(10 * source_fs) / source_fs
    sine = np.sin(2 * np.pi * 7.0 * t)
    out = preprocess_record(make_record(np.tile(sine, (12, 1)), fs=source_fs), target_fs, 10)
    assert out.shape == (12, 10 * target_fs) and out.dtype == np.float16
    lead = out[0].astype(np.float64)
    assert dominant_frequency(lead, target_fs) == pytest.approx(7.0, abs=0.1)
    interior = lead[target_fs:-target_fs]  # away from the filter's edge transients
    assert np.abs(interior).max() == pytest.approx(1.0, abs=0.02)
    expected = np.sin(2 * np.pi * 7.0 * np.arange(10 * target_fs) / target_fs)[target_fs:-target_fs]
    np.testing.assert_allclose(interior, expected, atol=0.02)


def test_resample_helper_keeps_float32_and_rational_length():
    x = np.ones((3, 257 * 4), dtype=np.float32)
    y = resample(x, 257, 500)
    assert y.dtype == np.float32 and y.shape == (3, 2000)
    assert resample(x, 500, 500) is x


def test_leads_with_variant_names_are_renamed_and_reordered():
    signal = lead_signals()
    variants = ["lead_i", "2", "III", "avr", "AVL", "aVF", "v1", "V2", "Lead V3", "v4", "V5", "V6"]
    order = np.random.default_rng(3).permutation(12)
    shuffled = make_record(signal[order], leads=[variants[i] for i in order])
    out = preprocess_record(shuffled, 500, 10).astype(np.float32)
    np.testing.assert_allclose(out, signal, atol=2e-3)


def test_reduced_lead_set_output():
    signal = lead_signals()
    out = preprocess_record(make_record(signal), 500, 10, leads=LEAD_SETS["6"]).astype(np.float32)
    assert out.shape == (6, 5000)
    np.testing.assert_allclose(out, signal[:6], atol=2e-3)
    assert np.array_equal(preprocess_record(make_record(signal), 500, 10, leads="1"), out[:1].astype(np.float16))
    with pytest.raises(ValueError, match="unknown lead names"):
        preprocess_record(make_record(signal), 500, 10, leads=["I", "V7"])


def test_missing_leads_policies():
    signal = lead_signals()
    i, ii = signal[0], signal[1]
    limb_only = make_record(signal[[0, 1, 6, 7, 8, 9, 10, 11]], leads=["I", "II"] + STANDARD_LEADS[6:])
    with pytest.raises(RecordError) as err:
        preprocess_record(limb_only, 500, 10)
    assert err.value.reason == "missing_leads" and "/data/rec1" in str(err.value)
    assert "aVR" in err.value.detail
    out = preprocess_record(limb_only, 500, 10, missing_leads="derive").astype(np.float32)
    for row, expected in zip(out[2:6], [ii - i, -(i + ii) / 2, i - ii / 2, ii - i / 2]):
        np.testing.assert_allclose(row, expected, atol=3e-3)
    np.testing.assert_allclose(out[6:], signal[6:], atol=2e-3)
    no_v1 = make_record(np.delete(signal, 6, axis=0), leads=STANDARD_LEADS[:6] + STANDARD_LEADS[7:])
    with pytest.raises(RecordError) as err:
        preprocess_record(no_v1, 500, 10, missing_leads="derive")
    assert err.value.reason == "missing_leads" and "V1" in err.value.detail
    zero_filled = preprocess_record(no_v1, 500, 10, missing_leads="zero").astype(np.float32)
    assert not zero_filled[6].any()
    np.testing.assert_allclose(zero_filled[7:], signal[7:], atol=2e-3)
    with pytest.raises(ValueError, match="missing_leads"):
        preprocess_record(no_v1, 500, 10, missing_leads="guess")


def test_duplicate_and_mismatched_leads_are_lead_count():
    signal = lead_signals()
    with pytest.raises(RecordError) as err:
        preprocess_record(make_record(signal, leads=STANDARD_LEADS[:11] + ["v1"]), 500, 10)
    assert err.value.reason == "lead_count" and "V1" in err.value.detail
    with pytest.raises(RecordError) as err:
        preprocess_record(make_record(signal[:11]), 500, 10)
    assert err.value.reason == "lead_count"


def test_short_non_finite_runs_are_interpolated():
    signal = lead_signals()
    holed = signal.copy()
    holed[2, 2000:2040] = np.nan  # 0.8 % of lead III
    holed[5, :3] = np.inf         # at the edge: nearest finite value
    out = preprocess_record(make_record(holed), 500, 10).astype(np.float32)
    expected = np.interp(np.arange(2000, 2040), [1999, 2040], signal[2, [1999, 2040]])
    np.testing.assert_allclose(out[2, 2000:2040], expected, atol=2e-3)
    np.testing.assert_allclose(out[5, :3], signal[5, 3], atol=2e-3)
    np.testing.assert_allclose(np.delete(out, [2, 5], axis=0), np.delete(signal, [2, 5], axis=0), atol=2e-3)


def test_too_many_non_finite_samples_are_rejected_unless_the_lead_is_unused():
    signal = lead_signals()
    signal[9, :100] = np.nan  # 2 % of V4
    with pytest.raises(RecordError) as err:
        preprocess_record(make_record(signal), 500, 10)
    assert err.value.reason == "non_finite" and "V4" in err.value.detail and "rec1" in str(err.value)
    out = preprocess_record(make_record(signal), 500, 10, leads=LEAD_SETS["6"])
    assert np.isfinite(out.astype(np.float32)).all()
    assert preprocess_record(make_record(signal), 500, 10, max_non_finite=0.05).shape == (12, 5000)
    signal[0] = np.nan  # lead I gone: derived limb leads cannot be computed
    record = make_record(np.delete(signal, [2, 3, 4, 5], axis=0), leads=["I", "II"] + STANDARD_LEADS[6:])
    with pytest.raises(RecordError) as err:
        preprocess_record(record, 500, 10, missing_leads="derive", max_non_finite=0.05)
    assert err.value.reason == "non_finite"


def test_flat_record_rejected_single_flat_lead_kept():
    with pytest.raises(RecordError) as err:
        preprocess_record(make_record(np.full((12, 5000), 0.3)), 500, 10)
    assert err.value.reason == "flat" and "/data/rec1" in str(err.value)
    for flat_lead in (4, 0):  # the first lead too: the check looks at it first
        signal = lead_signals()
        signal[flat_lead] = 0.0
        out = preprocess_record(make_record(signal), 500, 10).astype(np.float32)
        assert not out[flat_lead].any() and out[1].std() > 0.1


def test_length_rule_crop_start_or_center_and_pad_at_end():
    long = lead_signals(seconds=12.0)
    start = preprocess_record(make_record(long), 500, 10).astype(np.float32)
    np.testing.assert_allclose(start, long[:, :5000], atol=2e-3)
    center = preprocess_record(make_record(long), 500, 10, crop="center").astype(np.float32)
    np.testing.assert_allclose(center, long[:, 500:5500], atol=2e-3)
    short = lead_signals(seconds=9.0)
    with pytest.raises(RecordError) as err:
        preprocess_record(make_record(short), 500, 10)
    assert err.value.reason == "too_short" and "9.00 s" in err.value.detail
    padded = preprocess_record(make_record(short), 500, 10, min_seconds=8).astype(np.float32)
    np.testing.assert_allclose(padded[:, :4500], short, atol=2e-3)
    assert not padded[:, 4500:].any()
    with pytest.raises(ValueError, match="crop"):
        fix_length(long, 5000, crop="random")


def test_float16_output_and_overflow_check():
    signal = lead_signals()
    out = preprocess_record(make_record(signal), 500, 10)
    assert out.dtype == np.float16
    assert np.abs(out.astype(np.float32) - signal).max() < 1e-3  # float16 keeps ~µV resolution at 1 mV
    signal[3, 100] = 1e6  # e.g. a header in the wrong units
    with pytest.raises(RecordError) as err:
        preprocess_record(make_record(signal), 500, 10)
    assert err.value.reason == "non_finite" and "float16" in err.value.detail


def test_float16_cast_is_numpys_bit_for_bit():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 3, 40000), rng.normal(0, 1e-6, 30000),  # subnormals
                             rng.uniform(-7e4, 7e4, 30000),  # beyond the range: inf
                             [np.nan, np.inf, -np.inf, 0.0, -0.0, 65504, 65520, 2 ** -25, 1 + 2 ** -11]])
    signal = values.astype(np.float32).reshape(1, -1)  # more elements than one torch grain
    with np.errstate(over="ignore"):
        expected = signal.astype(np.float16)
    got = to_float16(signal)
    assert got.dtype == np.float16 and got.shape == signal.shape
    assert np.array_equal(got.view(np.uint16), expected.view(np.uint16))
    strided = signal[:, 1:].reshape(2, -1)[:, ::3]  # not contiguous
    with np.errstate(over="ignore"):
        assert np.array_equal(to_float16(strided).view(np.uint16), strided.astype(np.float16).view(np.uint16))


def test_ptbxl_100hz_upsampled_matches_500hz_record(ptbxl_dir):
    from open_clip_ecg.data.readers.ptbxl import PTBXLReader
    low, high = PTBXLReader(ptbxl_dir, 100), PTBXLReader(ptbxl_dir, 500)
    for entry_low, entry_high, _ in zip(low.entries(), high.entries(), range(5)):
        up = preprocess_record(low.load(entry_low), 500, 10).astype(np.float32)
        down = preprocess_record(high.load(entry_high), 100, 10).astype(np.float32)
        reference_high = preprocess_record(high.load(entry_high), 500, 10).astype(np.float32)
        reference_low = low.load(entry_low).signal
        for a, b in ((up, reference_high), (down, reference_low)):
            correlation = [np.corrcoef(x[50:-50], y[50:-50])[0, 1] for x, y in zip(a, b)]
            assert min(correlation) > 0.95, entry_low.record_id
