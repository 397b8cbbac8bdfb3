"""RR channels (open_clip_ecg.data.rhythm): beats found where they are, the channel values against a
hand computation, augmentations that leave the derived channels alone, clear errors, and the
detector's beats against wfdb's XQRS on real PTB-XL records."""
import numpy as np
import pytest
import torch

from open_clip_ecg.data.pipeline import ECGSamplePreparer
from open_clip_ecg.data.rhythm import AppendRRChannels, detect_beats, rr_channels, split_channels
from open_clip_ecg.data.transforms import Normalize, build_ecg_transform
from open_clip_ecg.leads import LEAD_SETS, RR_CHANNELS, STANDARD_LEADS

# R peaks of a sinus arrhythmia: RR 0.8, 0.9, 1.0, 0.9, 0.8 ... s
BEAT_TIMES = np.cumsum([0.5, 0.8, 0.9, 1.0, 0.9, 0.8, 0.9, 1.0, 0.9, 0.8, 0.9])


def synthetic_ecg(rate: float, seconds: float = 10.0, seed: int = 0) -> np.ndarray:
    """12 leads: a QRS (20 ms half-width, 1 mV), a P and a T wave per beat, baseline wander, noise."""
    t = np.arange(int(rate * seconds)) / rate
    one = np.zeros_like(t)
    for beat in BEAT_TIMES[BEAT_TIMES < seconds]:
        one += np.exp(-0.5 * ((t - beat) / 0.012) ** 2)
        one += 0.15 * np.exp(-0.5 * ((t - beat + 0.16) / 0.03) ** 2)
        one += 0.3 * np.exp(-0.5 * ((t - beat - 0.3) / 0.06) ** 2)
    rng = np.random.default_rng(seed)
    gains = rng.uniform(0.3, 1.5, size=(12, 1)) * rng.choice([-1, 1], size=(12, 1))
    wander = 0.2 * np.sin(2 * np.pi * 0.3 * t)
    return (gains * one + wander + 0.02 * rng.standard_normal((12, t.size))).astype(np.float32)


@pytest.mark.parametrize("rate", [100, 250, 500])
def test_beats_are_found_where_they_are(rate):
    beats = detect_beats(synthetic_ecg(rate), rate) / rate
    expected = BEAT_TIMES[BEAT_TIMES < 10]
    assert len(beats) == len(expected)
    assert np.abs(beats - expected).max() <= 0.02  # within 20 ms


def test_channel_values_match_a_hand_computation():
    rate = 100
    channels = rr_channels(synthetic_ecg(rate), rate)
    assert channels.shape == (2, 1000) and channels.dtype == np.float32
    rr = np.diff(BEAT_TIMES[BEAT_TIMES < 10])  # 0.8 0.9 1.0 0.9 0.8 0.9 1.0 0.9 0.8
    median = np.median(rr)  # 0.9
    # at 2.6 s the current beat (2.2 s) ends at 3.2 s: RR 1.0 s, 60 bpm
    ratio, heart_rate = channels[:, int(2.6 * rate)]
    # the detector finds these beats to the sample at 100 Hz, so the values are exact (to float32)
    assert ratio == pytest.approx((1.0 / median - 1) * 5, abs=1e-6)  # 0.5556
    assert heart_rate == pytest.approx((60.0 / 1.0 - 70) / 30, abs=1e-6)  # -0.3333
    # the slowest beat reads above the median, the fastest below
    assert channels[0].max() > 0.4 and channels[0].min() < -0.4


def test_flat_or_short_records_get_zero_channels():
    assert not rr_channels(np.zeros((12, 1000), np.float32), 100).any()
    assert not rr_channels(synthetic_ecg(100)[:, :150], 100).any()  # 1.5 s: no RR interval worth a channel
    assert len(detect_beats(np.zeros((12, 1000)), 100)) == 0


def test_transform_appends_channels_before_the_crop_and_keeps_them_out_of_augmentations():
    """The channels of a 5 s crop of a 10 s record are the crop of the whole record's channels (a
    crop's own channels differ at its edges and in its median RR), in training and evaluation; the
    training augmentations scale the leads and leave the channels alone."""
    signal = torch.from_numpy(synthetic_ecg(100))
    full = AppendRRChannels(100)(Normalize("center")(signal))  # the whole record's channels
    plain = build_ecg_transform(train=True, n_samples=500, rr_sampling_rate=100,
                                generator=torch.Generator().manual_seed(3))(signal)
    scaled = build_ecg_transform(train=True, n_samples=500, rr_sampling_rate=100, amplitude_scale=(2.0, 2.0, 1.0),
                                 lead_dropout=0.5, generator=torch.Generator().manual_seed(3))(signal)
    assert plain.shape == scaled.shape == (14, 500)
    offsets = [k for k in range(501) if torch.equal(plain[:12], full[:12, k:k + 500])]
    assert len(offsets) == 1, "the training crop is not a window of the record"
    torch.testing.assert_close(plain[12:], full[12:, offsets[0]:offsets[0] + 500])
    torch.testing.assert_close(scaled[12:], plain[12:])  # RR channels untouched by scaling and dropout
    kept = scaled[:12].abs().sum(dim=1) > 0
    assert 0 < int(kept.sum()) < 12  # some leads dropped, some kept
    torch.testing.assert_close(scaled[:12][kept], 2 * plain[:12][kept])  # the leads were scaled
    evaluation = build_ecg_transform(train=False, n_samples=500, rr_sampling_rate=100)(signal)
    torch.testing.assert_close(evaluation, full[:, 250:750])  # the centre crop of the whole record's channels


def test_input_channel_names_and_errors():
    assert LEAD_SETS["12+rr"] == STANDARD_LEADS + RR_CHANNELS
    assert split_channels(LEAD_SETS["12+rr"]) == (STANDARD_LEADS, True)
    assert split_channels(["I", "II"]) == (["I", "II"], False)
    with pytest.raises(ValueError, match="must come last"):
        split_channels(["HR", "I", "RR-ratio"])
    with pytest.raises(ValueError, match="sampling_rate is needed"):
        ECGSamplePreparer(500, 3, train=True, leads=LEAD_SETS["12+rr"])
    preparer = ECGSamplePreparer(500, 3, train=False, leads=LEAD_SETS["12+rr"], sampling_rate=100)
    ecg = preparer.ecg({"ecg": synthetic_ecg(100)})
    assert ecg.shape == (14, 500) and ecg[13].abs().sum() > 0


@pytest.mark.slow
def test_beats_agree_with_wfdb_xqrs_on_real_ptbxl_records(ptbxl_dir):
    """On real 500 Hz PTB-XL records, where XQRS works at its design rate, and on the same records
    at 100 Hz: at least 95 % of XQRS's beats (500 Hz) have one of ours within 50 ms, and at least 90 %
    of ours one of XQRS's (all 353 records: 99.8 % / 94.4 % at 500 Hz, 99.7 % / 94.3 % at 100 Hz)."""
    import wfdb
    from wfdb.processing import xqrs_detect

    records = sorted((ptbxl_dir / "records500").rglob("*_hr.hea"))[:40]
    assert records, f"no 500 Hz records under {ptbxl_dir}"
    matched = total = ours_matched = ours_total = 0
    for header in records:
        signal = wfdb.rdrecord(str(header.with_suffix(""))).p_signal.T
        reference = xqrs_detect(signal[1], fs=500, verbose=False) / 500
        for rate, ecg in ((500, signal), (100, signal[:, ::5])):
            ours = detect_beats(ecg, rate) / rate
            if len(ours) == 0:
                continue
            distance = np.abs(reference[:, None] - ours[None, :])
            matched += int((distance.min(axis=1) <= 0.05).sum())
            ours_matched += int((distance.min(axis=0) <= 0.05).sum())
            ours_total += len(ours)
        total += 2 * len(reference)
    assert matched >= 0.95 * total, f"{matched} of {total} XQRS beats matched"
    assert ours_matched >= 0.90 * ours_total, f"{ours_matched} of our {ours_total} beats are XQRS beats"
