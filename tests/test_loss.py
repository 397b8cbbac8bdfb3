"""MultiLabelSigLipLoss against a plain float64 reference, open_clip's SigLipLoss and bad input."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from open_clip_ecg.loss import MultiLabelSigLipLoss, exact_match_targets, jaccard_targets

MODES = ("jaccard", "exact", "identity")


def reference_target(labels, i, j, mode, text_labels=None):
    text_labels = labels if text_labels is None else text_labels
    a, b = set(np.flatnonzero(labels[i])), set(np.flatnonzero(text_labels[j]))
    if mode == "identity":
        return float(i == j)
    if mode == "exact":
        return float(a == b)
    return len(a & b) / len(a | b) if a | b else 1.0


def reference_loss_and_grads(image, text, scale, bias, labels, mode, text_labels=None):
    """The loss of the module docstring and its analytic gradients, pair by pair in float64 numpy.

    dL/dz_ij = (sigmoid(z_ij) - t_ij) / B, chained through z_ij = scale * <x_i, y_j> + bias.
    """
    batch = image.shape[0]
    loss = 0.0
    grad_image, grad_text = np.zeros_like(image), np.zeros_like(text)
    grad_scale = grad_bias = 0.0
    for i in range(batch):
        for j in range(batch):
            cos = float(np.dot(image[i], text[j]))
            z = scale * cos + bias
            t = reference_target(labels, i, j, mode, text_labels)
            log_sig_pos, log_sig_neg = -np.logaddexp(0.0, -z), -np.logaddexp(0.0, z)
            loss -= (t * log_sig_pos + (1 - t) * log_sig_neg) / batch
            dz = (1.0 / (1.0 + math.exp(-z)) - t) / batch
            grad_image[i] += dz * scale * text[j]
            grad_text[j] += dz * scale * image[i]
            grad_scale += dz * cos
            grad_bias += dz
    return loss, grad_image, grad_text, grad_scale, grad_bias


def random_batch(batch=9, dim=6, n_labels=5, dtype=torch.float64, seed=0):
    """Normalised features plus labels with empty rows and repeated sets, as reports have."""
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator, dtype=dtype), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=generator, dtype=dtype), dim=-1)
    labels = (torch.rand(batch, n_labels, generator=generator) < 0.35).to(torch.float32)
    labels[0] = 0
    labels[1] = 0
    labels[3] = labels[2]
    return image, text, labels


@pytest.mark.parametrize("mode", MODES)
def test_loss_and_gradients_match_float64_reference(mode):
    image, text, labels = random_batch()
    image.requires_grad_(True)
    text.requires_grad_(True)
    scale = torch.tensor(7.5, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)

    loss = MultiLabelSigLipLoss(targets=mode)(image, text, scale, bias, labels=labels)
    grads = torch.autograd.grad(loss, (image, text, scale, bias))

    expected = reference_loss_and_grads(
        image.detach().numpy(), text.detach().numpy(), 7.5, -2.0, labels.numpy(), mode)
    assert loss.item() == pytest.approx(expected[0], rel=1e-12)
    for got, want in zip(grads, expected[1:]):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_identity_matches_open_clip_siglip():
    image, text, _ = random_batch(batch=64, dim=32, dtype=torch.float32, seed=1)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    inputs = [t.clone().requires_grad_(True) for t in (image, text, scale, bias)]
    ours = MultiLabelSigLipLoss(targets="identity")(*inputs)
    ours_grads = torch.autograd.grad(ours, inputs)
    theirs_inputs = [t.clone().requires_grad_(True) for t in (image, text, scale, bias)]
    theirs = SigLipLoss()(*theirs_inputs)
    theirs_grads = torch.autograd.grad(theirs, theirs_inputs)
    assert abs(ours.item() - theirs.item()) <= 1e-6
    for got, want in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_distinct_single_findings_reduce_to_siglip():
    """With one distinct finding per ECG, Jaccard and exact targets are the identity: SigLIP exactly."""
    image, text, _ = random_batch(batch=16, dim=8, dtype=torch.float32, seed=2)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    one_finding_each = torch.eye(16)
    expected = SigLipLoss()(image, text, scale, bias)
    for mode in ("jaccard", "exact"):
        got = MultiLabelSigLipLoss(targets=mode)(image, text, scale, bias, labels=one_finding_each)
        assert abs(got.item() - expected.item()) <= 1e-6


def test_targets_of_hand_made_label_sets():
    #                       findings: 0  1  2
    labels = torch.tensor([[0, 0, 0],  # {}
                           [0, 0, 0],  # {}
                           [1, 1, 0],  # {0, 1}
                           [0, 0, 1],  # {2}
                           [1, 0, 1],  # {0, 2}
                           [1, 1, 0]], dtype=torch.float32)  # {0, 1}
    jaccard = jaccard_targets(labels, labels)
    assert jaccard[0, 1] == 1.0  # two empty sets are identical
    assert jaccard[0, 2] == 0.0  # empty vs non-empty
    assert jaccard[2, 3] == 0.0  # disjoint
    assert jaccard[2, 4] == pytest.approx(1 / 3)  # {0} of {0, 1, 2}
    assert jaccard[3, 4] == pytest.approx(1 / 2)  # {2} of {0, 2}
    assert jaccard[2, 5] == 1.0  # same set on different rows
    assert torch.equal(jaccard, jaccard.T)
    assert torch.all(jaccard.diagonal() == 1)

    exact = exact_match_targets(labels, labels)
    expected_exact = torch.zeros(6, 6)
    for i, j in [(0, 1), (2, 5)]:
        expected_exact[i, j] = expected_exact[j, i] = 1
    expected_exact.fill_diagonal_(1)
    assert torch.equal(exact, expected_exact)


def test_label_dtypes_and_output_dict():
    image, text, labels = random_batch(dtype=torch.float32)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    loss_fn = MultiLabelSigLipLoss()
    reference = loss_fn(image, text, scale, bias, labels=labels)
    for as_dtype in (torch.bool, torch.uint8, torch.int64, torch.float16):
        assert torch.equal(loss_fn(image, text, scale, bias, labels=labels.to(as_dtype)), reference)
    out = loss_fn(image, text, scale, bias, labels=labels, output_dict=True)
    assert set(out) == {"contrastive_loss"} and torch.equal(out["contrastive_loss"], reference)


def test_bfloat16_features_keep_exact_soft_targets():
    """Low-precision features: the loss is computed in float32 and stays close to the float32 loss."""
    image, text, labels = random_batch(batch=32, dim=16, n_labels=40, dtype=torch.float32, seed=3)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    full = MultiLabelSigLipLoss()(image, text, scale, bias, labels=labels)
    low = MultiLabelSigLipLoss()(image.bfloat16(), text.bfloat16(), scale.bfloat16(), bias.bfloat16(),
                                 labels=labels)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(full.item(), rel=2e-2)


def _bad_call(**overrides):
    image, text, labels = random_batch(batch=4, dtype=torch.float32)
    kwargs = dict(image_features=image, text_features=text, logit_scale=torch.tensor(10.0),
                  logit_bias=torch.tensor(-10.0), labels=labels)
    kwargs.update(overrides)
    return kwargs


@pytest.mark.parametrize("overrides, message", [
    (dict(labels=None), r"needs labels: a \[batch=4, n_labels\]"),
    (dict(labels=torch.ones(5, 5)), r"\[batch=4, n_labels\].*got shape \(5, 5\)"),
    (dict(labels=torch.ones(4)), r"got shape \(4,\)"),
    (dict(labels=torch.full((4, 5), 2.0)), "values other than 0 and 1"),
    (dict(labels=torch.full((4, 5), 0.5)), "values other than 0 and 1"),
    (dict(labels=[[0, 1]] * 4), "got list"),
    (dict(labels=torch.ones(4, 5, dtype=torch.complex64)), "dtype torch.complex64"),
    (dict(text_features=torch.randn(5, 6)), r"must have the same \[batch, embed_dim\] shape"),
    (dict(image_features=torch.randn(4, 6, 1)), r"image_features must be a \[batch, embed_dim\] tensor"),
])
def test_bad_input_raises_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        MultiLabelSigLipLoss()(**_bad_call(**overrides))


def test_identity_needs_no_labels_and_unknown_mode_is_rejected():
    kwargs = _bad_call(labels=None)
    assert torch.isfinite(MultiLabelSigLipLoss(targets="identity")(**kwargs))
    with pytest.raises(ValueError, match="targets must be one of"):
        MultiLabelSigLipLoss(targets="cosine")


@pytest.mark.parametrize("mode", ("jaccard", "exact"))
def test_text_labels_set_the_targets_of_the_text_side(mode):
    """Texts that state a subset of their record's findings: t_ij compares ECG i with text j's findings."""
    image, text, labels = random_batch()
    text_labels = labels.clone()
    text_labels[2, :] = 0
    text_labels[2, 0] = 1  # text 2 names one finding only
    text_labels[4] = labels[4] * (torch.arange(labels.shape[1]) % 2)
    scale, bias = 7.0, -3.0
    expected, *_ = reference_loss_and_grads(image.numpy(), text.numpy(), scale, bias, labels.numpy(), mode,
                                            text_labels.numpy())
    loss = MultiLabelSigLipLoss(targets=mode)(image, text, torch.tensor(scale, dtype=torch.float64),
                                              torch.tensor(bias, dtype=torch.float64), labels=labels,
                                              text_labels=text_labels)
    assert float(loss) == pytest.approx(expected, rel=1e-9)
    same = MultiLabelSigLipLoss(targets=mode)(image, text, torch.tensor(scale, dtype=torch.float64),
                                              torch.tensor(bias, dtype=torch.float64), labels=labels)
    assert float(same) != pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="text_labels"):
        MultiLabelSigLipLoss(targets=mode)(image, text, torch.tensor(scale), torch.tensor(bias), labels=labels,
                                           text_labels=text_labels[:, :2])


def test_mean_pair_target_by_hand():
    from open_clip_ecg.loss import mean_pair_target

    labels = torch.tensor([[1, 0], [1, 0], [0, 1]], dtype=torch.float32)
    assert mean_pair_target(labels, "identity", 4) == pytest.approx(1 / 4)
    # off-diagonal Jaccard/exact over distinct rows: 2 of 6 ordered pairs are 1 -> 1/3
    assert mean_pair_target(labels, "jaccard", 4) == pytest.approx((1 + 3 / 3) / 4)
    assert mean_pair_target(labels, "exact", 4) == pytest.approx((1 + 3 / 3) / 4)
    with pytest.raises(ValueError):
        mean_pair_target(labels, "nope", 4)


def test_finding_text_targets_by_hand():
    """ECG x finding-text pairs: Jaccard of the ECG's set with {f}, or membership (`contains`); a group
    text counts as one finding, present when any member is."""
    from open_clip_ecg.loss import finding_jaccard_targets, present_targets

    #                       findings: 0  1  2
    labels = torch.tensor([[1, 1, 0],  # {0, 1}
                           [0, 0, 1],  # {2}
                           [0, 0, 0]], dtype=torch.float64)  # {}
    statements = torch.eye(3, dtype=torch.float64)
    assert torch.equal(finding_jaccard_targets(labels, statements),
                       torch.tensor([[0.5, 0.5, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.float64))
    assert torch.equal(finding_jaccard_targets(labels, statements), jaccard_targets(labels, statements))
    assert torch.equal(present_targets(labels, statements),
                       torch.tensor([[1, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.float64))
    groups = torch.tensor([[1, 1, 0],  # G = {0, 1}
                           [0, 1, 1]], dtype=torch.float64)  # G = {1, 2}
    # contains: any member present
    assert present_targets(labels, groups).tolist() == [[1, 1], [0, 1], [0, 0]]
    # jaccard: {g} against the ECG's set with its members of G merged into g
    # {0,1} vs {0,1}: merged {g} -> 1; {0,1} vs {1,2}: merged {0, g} -> 1/2; {2} vs {1,2}: {g} -> 1
    assert finding_jaccard_targets(labels, groups).tolist() == [[1, 0.5], [0, 1], [0, 0]]


def test_finding_text_loss_with_group_texts_against_a_hand_computed_bce():
    """finding_members: text rows that name several findings get their group targets in the BCE."""
    generator = torch.Generator().manual_seed(2)
    image = F.normalize(torch.randn(3, 4, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(3, 4, generator=generator, dtype=torch.float64), dim=-1)
    findings = F.normalize(torch.randn(4, 4, generator=generator, dtype=torch.float64), dim=-1)
    labels = torch.tensor([[1, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.float64)
    members = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1]], dtype=torch.float64)  # 3 findings + {1, 2}
    targets = [[1, 1, 0, 1], [0, 0, 1, 1], [0, 0, 0, 0]]
    scale, bias = torch.tensor(4.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    expected = sum((t * np.logaddexp(0.0, -z) + (1 - t) * np.logaddexp(0.0, z)) / 3
                   for i in range(3) for k in range(4)
                   for z, t in [(float(scale * image[i] @ findings[k] + bias), targets[i][k])])
    loss_fn = MultiLabelSigLipLoss(finding_targets="contains", finding_members=members)
    out = loss_fn(image, text, scale, bias, labels=labels, finding_features=findings, output_dict=True)
    assert float(out["finding_text_loss"]) == pytest.approx(expected, rel=1e-12)
    twice = loss_fn(image, text, scale, bias, labels=labels, finding_features=torch.cat([findings, findings]),
                    output_dict=True)
    assert float(twice["finding_text_loss"]) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match=r"must be \[k x 4 finding texts, 4\]"):
        loss_fn(image, text, scale, bias, labels=labels, finding_features=findings[:3])
    with pytest.raises(ValueError, match="finding_members name 3 labels but the batch has 2"):
        loss_fn(image, text, scale, bias, labels=labels[:, :2], finding_features=findings)
    with pytest.raises(ValueError, match="at least one finding per text"):
        MultiLabelSigLipLoss(finding_targets="contains", finding_members=torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


@pytest.mark.parametrize("finding_targets, targets", [
    ("jaccard", [[0.5, 0.5, 0], [0, 0, 1], [0, 0, 0]]),
    ("contains", [[1, 1, 0], [0, 0, 1], [0, 0, 0]]),
])
def test_finding_text_loss_against_a_hand_computed_bce(finding_targets, targets):
    """finding_text_loss = sum of BCE(scale * <x_i, f_k> + bias, t_ik) / B, reported beside the pair
    loss; the finding texts given twice (--accum-freq copies) give the same term."""
    generator = torch.Generator().manual_seed(1)
    image = F.normalize(torch.randn(3, 4, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(3, 4, generator=generator, dtype=torch.float64), dim=-1)
    findings = F.normalize(torch.randn(3, 4, generator=generator, dtype=torch.float64), dim=-1)
    labels = torch.tensor([[1, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.float64)
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    expected = 0.0
    for i in range(3):
        for k in range(3):
            z = float(scale * image[i] @ findings[k] + bias)
            t = targets[i][k]
            expected += (t * np.logaddexp(0.0, -z) + (1 - t) * np.logaddexp(0.0, z)) / 3
    loss_fn = MultiLabelSigLipLoss(finding_targets=finding_targets)
    out = loss_fn(image, text, scale, bias, labels=labels, finding_features=findings, output_dict=True)
    assert set(out) == {"contrastive_loss", "finding_text_loss"}
    assert float(out["finding_text_loss"]) == pytest.approx(expected, rel=1e-12)
    without = MultiLabelSigLipLoss()(image, text, scale, bias, labels=labels)
    assert torch.equal(out["contrastive_loss"], without)
    assert float(loss_fn(image, text, scale, bias, labels=labels, finding_features=findings)) == pytest.approx(
        float(without + out["finding_text_loss"]), rel=1e-12)
    twice = loss_fn(image, text, scale, bias, labels=labels, finding_features=torch.cat([findings, findings]),
                    output_dict=True)
    assert float(twice["finding_text_loss"]) == pytest.approx(expected, rel=1e-12)
    identity = MultiLabelSigLipLoss(targets="identity", finding_targets=finding_targets)
    assert float(identity(image, text, scale, bias, labels=labels, finding_features=findings,
                          output_dict=True)["finding_text_loss"]) == pytest.approx(expected, rel=1e-12)
    weighted = MultiLabelSigLipLoss(finding_targets=finding_targets, finding_weight=4.0)(
        image, text, scale, bias, labels=labels, finding_features=findings, output_dict=True)
    assert float(weighted["finding_text_loss"]) == pytest.approx(4 * expected, rel=1e-12)
    assert torch.equal(weighted["contrastive_loss"], without)


def test_finding_prior_offsets_each_text_by_its_centred_log_odds_from_earlier_batches():
    """--ecg-finding-prior: no offset on the first batch; then text k's training logits gain
    logit(p_k) - mean logit(p), p_k = (positives + 0.5) / (seen + 1) over the earlier batches
    (a group text counts an ECG with any member); the current batch never moves its own offset."""
    torch.manual_seed(0)
    image = F.normalize(torch.randn(4, 5, dtype=torch.float64), dim=-1)
    findings = F.normalize(torch.randn(3, 5, dtype=torch.float64), dim=-1)
    members = torch.tensor([[1, 0], [0, 1], [1, 1]], dtype=torch.float64)  # texts: f0, f1, group {f0, f1}
    first = torch.tensor([[1, 0], [0, 0], [0, 0], [1, 1]], dtype=torch.float64)
    second = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 0]], dtype=torch.float64)
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)

    def expected(labels, offset):
        z = scale * image @ findings.T + bias + torch.tensor(offset, dtype=torch.float64)
        t = ((labels @ members.T) > 0).double()
        return float(F.binary_cross_entropy_with_logits(z, t, reduction="sum") / 4)

    loss_fn = MultiLabelSigLipLoss(finding_targets="contains", finding_members=members, finding_prior=True)
    plain = MultiLabelSigLipLoss(finding_targets="contains", finding_members=members)
    for labels in (first, second):
        assert float(plain.finding_text_loss(image, findings, labels, scale, bias)) == pytest.approx(
            expected(labels, [0.0, 0.0, 0.0]), rel=1e-12)
    assert float(loss_fn.finding_text_loss(image, findings, first, scale, bias)) == pytest.approx(
        expected(first, [0.0, 0.0, 0.0]), rel=1e-12)
    share = np.array([2.5, 1.5, 2.5]) / 5  # the first batch: f0 in 2 ECGs, f1 in 1, the group in 2
    log_odds = np.log(share / (1 - share))
    assert float(loss_fn.finding_text_loss(image, findings, second, scale, bias)) == pytest.approx(
        expected(second, list(log_odds - log_odds.mean())), rel=1e-12)
    assert loss_fn.finding_seen == 8 and loss_fn.finding_positives.tolist() == [3.0, 3.0, 5.0]


def test_finding_features_that_do_not_fit_are_refused():
    image, text, labels = random_batch(batch=4, n_labels=5, dtype=torch.float32)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    loss_fn = MultiLabelSigLipLoss(finding_targets="jaccard")
    with pytest.raises(ValueError, match=r"finding_features must be \[k x 5 finding texts, 6\].*got \(7, 6\)"):
        loss_fn(image, text, scale, bias, labels=labels, finding_features=torch.randn(7, 6))
    with pytest.raises(ValueError, match=r"got \(5, 3\)"):
        loss_fn(image, text, scale, bias, labels=labels, finding_features=torch.randn(5, 3))
    with pytest.raises(ValueError, match="exactly when the loss has finding_targets"):
        loss_fn(image, text, scale, bias, labels=labels)
    with pytest.raises(ValueError, match="exactly when the loss has finding_targets"):
        MultiLabelSigLipLoss()(image, text, scale, bias, labels=labels, finding_features=torch.randn(5, 6))
    with pytest.raises(ValueError, match="finding_targets='jaccard' needs labels"):
        MultiLabelSigLipLoss(targets="identity", finding_targets="jaccard")(
            image, text, scale, bias, finding_features=torch.randn(5, 6))
    with pytest.raises(ValueError, match="finding_targets must be None or one of"):
        MultiLabelSigLipLoss(finding_targets="membership")
    with pytest.raises(ValueError, match="finding_weight must be > 0, got 0"):
        MultiLabelSigLipLoss(finding_targets="contains", finding_weight=0)
