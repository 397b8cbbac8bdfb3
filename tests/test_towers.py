"""ECG towers: timm registration, any-length input, boundary checks, timm/open_clip tower features."""
import copy
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import open_clip_ecg  # noqa: E402,F401  (registers the towers)
from open_clip_ecg.leads import LEAD_SETS  # noqa: E402
from open_clip_ecg.towers import FrozenBatchNorm1d, freeze_batch_norm_1d, lock_image_tower  # noqa: E402
from open_clip_ecg.towers.vit1d import sincos_pos_embed_1d  # noqa: E402

RESNETS = {"ecg_resnet1d18": 12, "ecg_resnet1d34": 12, "ecg_resnet1d18_6lead": 6, "ecg_resnet1d18_1lead": 1}
VITS = {"ecg_vit1d_tiny": 12, "ecg_vit1d_small": 12}


def _ecg(batch, leads, samples, seed=0):
    return torch.randn(batch, leads, samples, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def rn18():
    return timm.create_model("ecg_resnet1d18").eval()


@pytest.fixture(scope="module")
def vit():
    return timm.create_model("ecg_vit1d_tiny").eval()


@pytest.mark.parametrize("name,leads", sorted({**RESNETS, **VITS}.items()))
def test_entrypoint_registered_with_lead_count_from_cfg(name, leads):
    assert timm.is_model(name)
    model = timm.create_model(name)
    assert model.in_chans == leads
    assert model.lead_names == LEAD_SETS[str(leads)]
    assert model.pretrained_cfg["input_size"] == (leads, 1, 5000)
    assert model.pretrained_cfg["pool_size"] is None  # TimmModel then treats features as vectors
    assert model.num_classes == 0
    with torch.no_grad():
        for samples in (5000, 1000, 1234):
            out = model.eval()(_ecg(2, leads, samples))
            assert out.shape == (2, model.num_features)
            assert torch.isfinite(out).all()


def test_resnet_architecture_sizes(rn18):
    assert rn18.num_features == 512
    assert rn18.conv1.kernel_size == (15,) and rn18.conv1.stride == (2,)
    assert rn18.layer1[0].conv1.kernel_size == (7,)
    assert [len(getattr(rn18, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    rn34 = timm.create_model("ecg_resnet1d34")
    assert [len(getattr(rn34, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    n18 = sum(p.numel() for p in rn18.parameters())
    n34 = sum(p.numel() for p in rn34.parameters())
    assert 8e6 < n18 < 9e6 and 16e6 < n34 < 17.5e6


@pytest.mark.parametrize("name", ["ecg_resnet1d18", "ecg_vit1d_tiny"])
def test_minimum_length_accepted_one_less_rejected(name):
    model = timm.create_model(name).train()  # train mode: BatchNorm needs > 1 value per channel
    assert model.min_samples == (32 if "resnet" in name else 50)
    out = model(_ecg(2, 12, model.min_samples))
    assert out.shape == (2, model.num_features)
    with pytest.raises(ValueError, match=rf"at least {model.min_samples} samples per lead, got {model.min_samples - 1}"):
        model(_ecg(2, 12, model.min_samples - 1))


def test_resnet_feature_length_is_ceil_of_total_stride(rn18):
    with torch.no_grad():
        for samples in (32, 33, 1000, 5000):
            assert rn18.forward_features(_ecg(1, 12, samples)).shape == (1, 512, math.ceil(samples / 32))


def test_num_classes_and_pool_variants():
    model = timm.create_model("ecg_resnet1d18", num_classes=5, global_pool="avgmax").eval()
    x = _ecg(2, 12, 1000)
    assert model(x).shape == (2, 5)
    model.reset_classifier(3, global_pool="catavgmax")
    assert model.fc.in_features == 1024 and model(x).shape == (2, 3)
    model.reset_classifier(0, global_pool="max")
    feats = model.forward_features(x)
    torch.testing.assert_close(model(x), feats.amax(dim=2))
    model.reset_classifier(0, global_pool="")
    assert model(x).shape == (2, 512, 32)  # unpooled passes through
    with pytest.raises(ValueError, match="unknown global_pool 'attn'"):
        model.reset_classifier(0, global_pool="attn")


def test_vit_pooling_and_classifier(vit):
    x = _ecg(2, 12, 1000)
    tokens = vit.forward_features(x)
    assert tokens.shape == (2, 1 + 1000 // 50, 192)
    torch.testing.assert_close(vit(x), tokens[:, 0])
    avg = timm.create_model("ecg_vit1d_tiny", global_pool="avg", num_classes=4).eval()
    assert avg(x).shape == (2, 4)
    torch.testing.assert_close(avg.forward_head(avg.forward_features(x), pre_logits=True),
                               avg.forward_features(x)[:, 1:].mean(1))
    with pytest.raises(ValueError, match="class_token=True"):
        timm.create_model("ecg_vit1d_tiny", class_token=False)  # default pool 'token' needs it


def test_vit_trailing_partial_patch_is_dropped(vit):
    x = _ecg(1, 12, 1049)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), vit(x[..., :1000]))


def test_vit_sincos_position_embedding_any_length():
    pe = sincos_pos_embed_1d(300, 192)
    assert pe.shape == (300, 192)
    torch.testing.assert_close(pe[:100], sincos_pos_embed_1d(100, 192))  # same positions, any length
    assert torch.allclose(pe[0, :96], torch.zeros(96)) and torch.allclose(pe[0, 96:], torch.ones(96))


def test_vit_learned_position_embedding_is_interpolated():
    model = timm.create_model("ecg_vit1d_tiny", pos_embed="learn", max_samples=5000).eval()
    assert model.pos_embed.shape == (1, 100, 192)
    assert model._position_embedding(100, model.pos_embed) is model.pos_embed
    assert model._position_embedding(20, model.pos_embed).shape == (1, 20, 192)
    with torch.no_grad():
        for samples in (5000, 1000, 7500):
            assert model(_ecg(2, 12, samples)).shape == (2, 192)
    with pytest.raises(ValueError, match="pos_embed must be"):
        timm.create_model("ecg_vit1d_tiny", pos_embed="rope")


@pytest.mark.parametrize("name", ["ecg_resnet1d18", "ecg_vit1d_tiny"])
def test_bad_input_raises_value_error_at_boundary(name):
    model = timm.create_model(name).eval()
    with pytest.raises(ValueError, match=r"model expects 12 leads \(I, II, III, aVR, aVL, aVF, V1, V2, V3, V4, "
                                         r"V5, V6\), got 11"):
        model(_ecg(2, 11, 1000))
    with pytest.raises(ValueError, match=r"\[batch, 12 leads, >= \d+ samples\], got a 2-D tensor"):
        model(torch.randn(12, 1000))
    with pytest.raises(ValueError, match="got a 4-D tensor"):
        model(torch.randn(2, 12, 1, 1000))
    with pytest.raises(ValueError, match="dtype torch.int64"):
        model(torch.ones(2, 12, 1000, dtype=torch.long))
    with pytest.raises(ValueError, match="got ndarray"):
        model(_ecg(2, 12, 1000).numpy())
    bad = _ecg(2, 12, 1000)
    bad[1, 3, 10] = float("nan")
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="2 non-finite"):
        model(bad)
    with pytest.raises(ValueError, match="non-finite"):
        model.forward_features(bad)
    with pytest.raises(ValueError, match="non-finite"):
        model.forward_intermediates(bad)


def test_finiteness_check_can_be_switched_off():
    model = timm.create_model("ecg_resnet1d18", check_finite=False).eval()
    bad = _ecg(2, 12, 1000)
    bad[0, 0, 0] = float("nan")
    with torch.no_grad():
        out = model(bad)
    assert torch.isnan(out[0]).any() and torch.isfinite(out[1]).all()  # NaN reaches only its own sample
    with pytest.raises(ValueError, match="got 11"):
        model(_ecg(2, 11, 1000))  # the shape checks stay


def test_reduced_lead_models_name_their_leads():
    six = timm.create_model("ecg_resnet1d18_6lead")
    with pytest.raises(ValueError, match=r"model expects 6 leads \(I, II, III, aVR, aVL, aVF\), got 12"):
        six(_ecg(2, 12, 1000))
    one = timm.create_model("ecg_resnet1d18_1lead")
    with pytest.raises(ValueError, match=r"model expects 1 leads \(I\), got 12"):
        one(_ecg(2, 12, 1000))


def test_resnet_forward_intermediates(rn18):
    x = _ecg(2, 12, 1000)
    with torch.no_grad():
        final, inter = rn18.forward_intermediates(x)
        assert [t.shape for t in inter] == [(2, 64, 500), (2, 64, 250), (2, 128, 125), (2, 256, 63), (2, 512, 32)]
        torch.testing.assert_close(final, rn18.forward_features(x))
        last2 = rn18.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(last2[0], inter[3])
        torch.testing.assert_close(last2[1], inter[4])
        early = rn18.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inter[1])
    with pytest.raises(ValueError, match="output_fmt"):
        rn18.forward_intermediates(x, output_fmt="NLC")


def test_vit_forward_intermediates(vit):
    x = _ecg(2, 12, 1000)
    with torch.no_grad():
        final, inter = vit.forward_intermediates(x)
        assert len(inter) == 6 and inter[0].shape == (2, 192, 20)
        torch.testing.assert_close(final, vit.forward_features(x))
        nlc = vit.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True, norm=True)
        torch.testing.assert_close(nlc[0], final[:, 1:])  # last block + final norm = final patch tokens
        pairs = vit.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True,
                                          return_prefix_tokens=True)
        torch.testing.assert_close(pairs[0][0], inter[0])
        assert pairs[0][1].shape == (2, 1, 192)


@pytest.mark.parametrize("model_name", ["ECG-RN18-CLIPText", "ECG-ViT1D-CLIPText"])
def test_open_clip_forward_intermediates(model_name):
    model = open_clip.create_model(model_name).eval()
    x = _ecg(2, 12, 1000)
    with torch.no_grad():
        out = model.visual.forward_intermediates(x)  # open_clip passes output_fmt='NCHW'
        torch.testing.assert_close(out["image_features"], model.encode_image(x))
        assert out["image_intermediates"][-1].shape[:2] == (2, model.visual.trunk.num_features)
        out = model.visual.forward_intermediates(x, indices=2, output_extra_tokens="ViT" in model_name)
        assert len(out["image_intermediates"]) == 2


@pytest.mark.parametrize("name", ["ecg_resnet1d18", "ecg_vit1d_tiny"])
def test_grad_checkpointing_same_outputs_and_grads(name):
    model = timm.create_model(name, drop_path_rate=0.).train()
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    x = _ecg(4, 12, 1000)
    out, out_ckpt = model(x), ckpt(x)
    torch.testing.assert_close(out, out_ckpt)
    out.square().sum().backward()
    out_ckpt.square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    inter = model.forward_intermediates(x, intermediates_only=True)
    inter_ckpt = ckpt.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(inter, inter_ckpt):
        torch.testing.assert_close(a, b)


def test_open_clip_set_grad_checkpointing_reaches_trunk():
    model = open_clip.create_model("ECG-RN18-CLIPText")
    model.set_grad_checkpointing(True)
    assert model.visual.trunk.grad_checkpointing


def test_drop_path_rate_increases_linearly():
    model = timm.create_model("ecg_resnet1d18", drop_path_rate=0.2)
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.
             for i in range(1, 5) for b in getattr(model, f"layer{i}")]
    assert rates[0] == 0. and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)


def test_timm_features_only():
    feats = timm.create_model("ecg_resnet1d18", features_only=True, out_indices=(2, 4))
    out = feats(_ecg(1, 12, 1000))
    assert [o.shape for o in out] == [(1, 128, 125), (1, 512, 32)]


def test_frozen_batch_norm_matches_eval_and_keeps_state_dict_keys():
    bn = nn.BatchNorm1d(8)
    bn.train()(torch.randn(16, 8, 50) * 3 + 1)  # non-trivial running stats
    bn.weight.data.uniform_(0.5, 2)
    frozen = freeze_batch_norm_1d(bn)
    assert isinstance(frozen, FrozenBatchNorm1d)
    x = torch.randn(4, 8, 30)
    torch.testing.assert_close(frozen.train()(x), bn.eval()(x))
    assert set(bn.state_dict()) - set(frozen.state_dict()) == {"num_batches_tracked"}
    fresh = FrozenBatchNorm1d(8)
    fresh.load_state_dict(bn.state_dict())  # num_batches_tracked accepted and dropped
    torch.testing.assert_close(fresh(x), bn.eval()(x))
    back = nn.BatchNorm1d(8)
    back.load_state_dict(frozen.state_dict())  # and the other way round
    torch.testing.assert_close(back.eval()(x), bn.eval()(x))


def _bn_buffers(module):
    return {n: b.clone() for n, b in module.named_buffers() if "running" in n}


def test_open_clip_freeze_bn_stats_alone_misses_batchnorm1d():
    """The gap lock_image_tower fills: open_clip's freeze_batch_norm_2d ignores BatchNorm1d."""
    model = open_clip.create_model("ECG-RN18-CLIPText")
    model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.visual.trunk.modules())
    before = _bn_buffers(model.visual.trunk)
    model.train().encode_image(_ecg(2, 12, 1000))
    assert any(not torch.equal(before[n], b) for n, b in _bn_buffers(model.visual.trunk).items())


def test_lock_image_tower_full_with_bn_freeze():
    model = open_clip.create_model("ECG-RN18-CLIPText")
    lock_image_tower(model, unlocked_groups=0, freeze_bn_stats=True)
    trunk = model.visual.trunk
    assert not any(p.requires_grad for p in trunk.parameters())
    assert all(p.requires_grad for p in model.visual.head.parameters())  # projection stays trainable
    assert not any(isinstance(m, nn.BatchNorm1d) for m in trunk.modules())
    before = _bn_buffers(trunk)
    model.train()
    out = model.encode_image(_ecg(2, 12, 1000))
    out.sum().backward()
    after = _bn_buffers(trunk)
    assert before.keys() == after.keys() and len(before) > 0
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert model.visual.head.proj.weight.grad is not None
    lock_image_tower(model, unlocked_groups=0, freeze_bn_stats=True)  # idempotent


def test_lock_image_tower_partial_leaves_last_group_trainable():
    model = open_clip.create_model("ECG-RN18-CLIPText")
    lock_image_tower(model, unlocked_groups=1, freeze_bn_stats=True)
    trunk = model.visual.trunk
    assert all(p.requires_grad for p in trunk.layer4[1].parameters())
    assert not any(p.requires_grad for p in trunk.layer4[0].parameters())
    assert not any(p.requires_grad for p in trunk.conv1.parameters())
    assert isinstance(trunk.layer4[1].bn1, nn.BatchNorm1d)  # unlocked group keeps learning its stats
    assert isinstance(trunk.layer4[0].bn1, FrozenBatchNorm1d)
    assert isinstance(trunk.bn1, FrozenBatchNorm1d)
    locked_before = _bn_buffers(trunk.layer1)
    unlocked_before = _bn_buffers(trunk.layer4[1])
    model.train().encode_image(_ecg(2, 12, 1000))
    assert all(torch.equal(locked_before[n], b) for n, b in _bn_buffers(trunk.layer1).items())
    assert any(not torch.equal(unlocked_before[n], b) for n, b in _bn_buffers(trunk.layer4[1]).items())


def test_lock_image_tower_vit_partial_and_bad_model():
    model = open_clip.create_model("ECG-ViT1D-CLIPText")
    lock_image_tower(model, unlocked_groups=1)  # timm convention: the final norm joins the last block
    trunk = model.visual.trunk
    assert all(p.requires_grad for p in trunk.norm.parameters())
    assert all(p.requires_grad for p in trunk.blocks[-1].parameters())
    assert not any(p.requires_grad for p in trunk.blocks[-2].parameters())
    assert not trunk.patch_embed.weight.requires_grad
    with pytest.raises(ValueError, match="timm image tower"):
        lock_image_tower(nn.Linear(2, 2))
