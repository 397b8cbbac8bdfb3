"""ECG transforms: crops, normalisation modes, augmentations, torch RNG seeding."""
import numpy as np
import pytest
import torch

from open_clip_ecg.data.transforms import (AmplitudeScale, CenterCrop, LeadDropout, Normalize, RandomCrop,
                                           build_ecg_transform)


def ramp(leads=12, length=100):
    return torch.arange(leads * length, dtype=torch.float32).reshape(leads, length)


def test_random_crop_takes_a_contiguous_window_and_follows_torch_seed():
    signal = ramp()
    torch.manual_seed(0)
    first = [RandomCrop(30)(signal) for _ in range(20)]
    torch.manual_seed(0)
    again = [RandomCrop(30)(signal) for _ in range(20)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    starts = {int(c[0, 0]) for c in first}
    assert len(starts) > 5 and all(0 <= s <= 70 for s in starts)
    for crop in first:
        assert crop.shape == (12, 30)
        start = int(crop[0, 0])
        assert torch.equal(crop, signal[:, start:start + 30])


def test_random_crop_pads_short_signals_with_zeros_at_random_offsets():
    signal = torch.ones(12, 10)
    gen = torch.Generator().manual_seed(1)
    crops = [RandomCrop(16, generator=gen)(signal) for _ in range(30)]
    assert all(c.shape == (12, 16) and c.sum() == 12 * 10 for c in crops)
    offsets = {int(torch.nonzero(c[0])[0]) for c in crops}
    assert offsets <= set(range(7)) and len(offsets) > 2


def test_center_crop_and_center_pad():
    signal = ramp(length=100)
    assert torch.equal(CenterCrop(40)(signal), signal[:, 30:70])
    padded = CenterCrop(13)(torch.ones(12, 10))
    assert padded.shape == (12, 13)
    assert padded[:, 0].sum() == 0 and padded[:, 1:11].eq(1).all() and padded[:, 11:].sum() == 0
    assert CenterCrop(11)(torch.ones(12, 10))[:, :10].eq(1).all()


def test_numpy_and_float16_inputs_become_float32_tensors():
    out = CenterCrop(50)(np.ones((12, 60), dtype=np.float16))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (12, 50)
    with pytest.raises(ValueError, match=r"\[leads, samples\]"):
        CenterCrop(5)(np.ones(10))


def test_center_normalisation_keeps_millivolts():
    t = torch.linspace(0, 1, 500)
    baseline = torch.arange(12, dtype=torch.float32)[:, None]
    qrs = torch.zeros(12, 500)
    qrs[:, 100:105] = 3.0       # a 3 mV spike, e.g. LVH voltage
    out = Normalize("center")(baseline + qrs + 0 * t)
    assert torch.allclose(out[:, 0], torch.zeros(12))            # baseline removed
    assert torch.allclose(out.amax(dim=1), torch.full((12,), 3.0))  # amplitude kept
    low = Normalize("center")(baseline + 0.1 * qrs)
    assert out.amax() / low.amax() == pytest.approx(10.0)          # voltage differences survive


def test_zscore_and_none_modes():
    signal = torch.randn(12, 400) * 3 + 5
    z = Normalize("zscore")(signal)
    assert torch.allclose(z.mean(dim=1), torch.zeros(12), atol=1e-5)
    assert torch.allclose(z.std(dim=1, unbiased=False), torch.ones(12), atol=1e-4)
    assert torch.equal(Normalize("none")(signal), signal)
    with pytest.raises(ValueError, match="unknown normalisation"):
        Normalize("minmax")


def test_amplitude_scale_scales_all_leads_by_one_factor():
    signal = torch.randn(12, 50)
    gen = torch.Generator().manual_seed(3)
    factors = []
    for _ in range(50):
        out = AmplitudeScale(0.8, 1.2, p=1.0, generator=gen)(signal)
        ratio = out / signal
        assert torch.allclose(ratio, ratio[0, 0].expand_as(ratio), atol=1e-5)
        factors.append(float(ratio[0, 0]))
    assert 0.8 <= min(factors) < 0.9 and 1.1 < max(factors) <= 1.2
    assert torch.equal(AmplitudeScale(0.5, 2.0, p=0.0)(signal), signal)


def test_lead_dropout_zeroes_leads_but_never_all():
    signal = torch.ones(12, 20)
    gen = torch.Generator().manual_seed(4)
    dropped = [12 - int(LeadDropout(0.3, generator=gen)(signal).abs().sum(dim=1).gt(0).sum()) for _ in range(200)]
    assert 2.0 < np.mean(dropped) < 5.0
    for _ in range(50):
        out = LeadDropout(1.0, generator=gen)(signal)
        assert int(out.abs().sum(dim=1).gt(0).sum()) == 1


def test_build_ecg_transform_train_and_eval():
    signal = np.random.default_rng(0).normal(size=(12, 5000)).astype(np.float16)
    evaluate = build_ecg_transform(train=False, n_samples=2500)
    a, b = evaluate(signal), evaluate(signal)
    assert a.shape == (12, 2500) and torch.equal(a, b)
    train = build_ecg_transform(train=True, n_samples=2500, amplitude_scale=(0.9, 1.1), lead_dropout=0.1,
                                generator=torch.Generator().manual_seed(0))
    outs = [train(signal) for _ in range(5)]
    assert all(o.shape == (12, 2500) and o.dtype == torch.float32 for o in outs)
    assert not all(torch.equal(outs[0], o) for o in outs[1:])
    names = [type(step).__name__ for step in train.transforms]
    assert names == ["Normalize", "RandomCrop", "AmplitudeScale", "LeadDropout"]
