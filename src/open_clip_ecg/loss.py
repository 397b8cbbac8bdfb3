"""Multi-label SigLIP loss: pair targets from the overlap of the two ECGs' finding sets.

open_clip's ``SigLipLoss`` treats pair (i, j) of a batch as positive iff i == j. ECG reports
repeat: many ECGs in a batch share findings or carry exactly the same ones ("sinus rhythm,
normal ECG"), so identity targets push apart pairs that describe the same thing. Takahashi et al.
(2026) replace the identity targets with a Jaccard score of the two label sets. Their exact
equation is not public; this module uses:

    t_ij = |L_i ∩ L_j| / |L_i ∪ L_j|        (two empty sets are identical: t_ij = 1)
    loss = -1/B Σ_ij [ t_ij log σ(z_ij) + (1 - t_ij) log σ(-z_ij) ],   z_ij = s <x_i, y_j> + b

i.e. the Jaccard score is the soft target of the same sigmoid binary cross-entropy SigLIP uses.
Why this form: with t in [0, 1] the loss stays a proper BCE (minimised at σ(z_ij) = t_ij, so the
model's pair probability learns the label overlap), a pair with identical finding sets is an
ordinary positive, and with 0/1 targets it is exactly SigLIP (-log σ(±z) with ±1 labels); the
normalisation by the local batch size B is ``SigLipLoss``'s. ``targets="exact"`` keeps hard
targets (1 iff the finding sets are equal), ``targets="identity"`` is ``SigLipLoss`` itself.

Distributed (``world_size > 1``): as in ``SigLipLoss``, each rank's images meet every rank's texts
through the chosen ``dist_impl``; here the multi-hot labels are packed next to the text features
in the same message, so cross-device pairs get their true targets (``SigLipLoss`` sets them all
to 0). The exchange uses open_clip's own neighbour-exchange helpers and autograd collectives.
Per-rank losses then sum to ``world_size`` x the single-process loss of the concatenated batch.
All ranks must use the same local batch size and label vocabulary.

Finding texts (``finding_targets``, ``--ecg-finding-texts``): besides the batch's own texts, each
ECG can also be paired with one short text per vocabulary finding ("an ECG showing {finding}."),
the question a zero-shot prompt asks. Their target is the Jaccard score of the ECG's set with the
singleton {f} (``"jaccard"``: 1/|L_i| if f is in L_i, else 0; the same targets the batch's texts
get) or plain membership (``"contains"``: 1 if f is in L_i). A finding text may also name a group of
findings (``finding_members``, ``--ecg-finding-groups``: "conduction disturbance" for the PTB-XL
superclass CD); a group counts as one finding, present when any member is: ``"contains"`` gives 1
when the ECG has any member, ``"jaccard"`` the Jaccard score of {g} with the ECG's set once its
members of g are merged into g (1 / (|L_i| - |L_i ∩ G| + 1) when they meet). A one-member group is
exactly the single-finding case. Pairing images with label-name texts
is what knowledge-enhanced models such as KAD (Zhang et al., 2023) train on; here it is an extra
term ``finding_text_loss`` (sum over the ECG x finding pairs / B, like the pair term) reported
beside ``contrastive_loss``. Every rank encodes the same finding texts, so this term needs no
exchange. ``finding_features`` may hold the finding texts several times over (open_clip's
``--accum-freq`` concatenates every micro-batch's copy); each copy is one block of pairs and the
copies are averaged.

Finding priors (``finding_prior``, ``--ecg-finding-prior``): with one shared bias, a rare finding's
text can only get its low base rate by pointing away from the typical (normal) ECG, so its prompt
also scores every abnormal ECG high. Logit adjustment (Menon et al., 2021) adds each finding text's
log-odds of being present, centred over the finding texts, to its training logits only:
``z_if = s <x_i, t_f> + b + logit(p_f) - mean_g logit(p_g)``. The direction of t_f is then free to
mean the finding, not its rarity; prompts are scored without the offset. ``p_f`` is the running
share of training ECGs with (any member of) f, ``(positives + 0.5) / (seen + 1)`` over the batches
seen before the current one (so the first step has no offset and a batch's own labels never move
its offset); it restarts on resume and counts each rank's own batches, and settles within a few
steps either way.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from open_clip.loss import (
    SigLipLoss,
    neighbour_exchange_bidir_with_grad,
    neighbour_exchange_with_grad,
)

TARGET_MODES = ("jaccard", "exact", "identity")


def pair_counts(labels_a: torch.Tensor, labels_b: torch.Tensor):
    """|A ∩ B| and |A ∪ B|, each ``[len(a), len(b)]``, for two float multi-hot matrices.

    Intersections come from one matmul; |A ∪ B| = |A| + |B| - |A ∩ B|. An empty row gets a virtual
    "no finding" label, so two empty sets are the same set (|∩| = |∪| = 1), an empty and a
    non-empty set share nothing, and no union is 0 (no division guard needed).
    """
    labels_a, labels_b = _with_no_finding_label(labels_a), _with_no_finding_label(labels_b)
    intersection = labels_a @ labels_b.T
    union = labels_a.sum(1, keepdim=True) + labels_b.sum(1) - intersection
    return intersection, union


def _with_no_finding_label(labels: torch.Tensor) -> torch.Tensor:
    return torch.cat([labels, (labels.sum(1, keepdim=True) == 0).to(labels.dtype)], dim=1)


def jaccard_targets(labels_a: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    """Pairwise Jaccard scores |A ∩ B| / |A ∪ B| (two empty sets score 1)."""
    intersection, union = pair_counts(labels_a, labels_b)
    return intersection / union


def exact_match_targets(labels_a: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    """1 where two rows are the same finding set (intersection equals union), else 0."""
    intersection, union = pair_counts(labels_a, labels_b)
    return (intersection == union).to(intersection.dtype)


def present_targets(labels: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """ECG x finding-text targets ``"contains"``: 1 where the ECG (row of `labels`) has any of the
    findings the text names (row of `members`), else 0."""
    return ((labels @ members.T) > 0).to(labels.dtype)


def finding_jaccard_targets(labels: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """ECG x finding-text targets ``"jaccard"``: the text's finding (a group counting as one finding,
    present when any member is) against the ECG's set with its members of the group merged into it:
    1 / (|L| - |L ∩ G| + 1) when they meet, else 0 (1/|L| for a single finding f in L)."""
    intersection = labels @ members.T
    present = (intersection > 0).to(labels.dtype)
    return present / (labels.sum(1, keepdim=True) - intersection + 1)


_TARGET_FNS = {"jaccard": jaccard_targets, "exact": exact_match_targets}
FINDING_TARGETS = {"jaccard": finding_jaccard_targets, "contains": present_targets}


def mean_pair_target(labels: torch.Tensor, targets: str, batch_size: int) -> float:
    """Mean target over the B x B pairs of a batch of `batch_size` samples like `labels` ([N, L]).

    The diagonal is 1 in every mode; off-diagonal pairs average the mode's targets over distinct
    samples of `labels` (0 for ``identity``). ``log(t / (1 - t))`` of it is the logit bias a model
    with uninformative features would learn: a better start than SigLIP's -10 on small batches of
    multi-label pairs (``--ecg-init-logit-bias auto``).
    """
    if targets not in TARGET_MODES:
        raise ValueError(f"targets must be one of {TARGET_MODES}, got {targets!r}")
    if batch_size < 2 or labels.ndim != 2 or len(labels) < 2:
        raise ValueError("need a batch size >= 2 and at least two label rows")
    off_diagonal = 0.0
    if targets != "identity":
        pairs = _TARGET_FNS[targets](labels.float(), labels.float())
        n = len(labels)
        off_diagonal = float((pairs.sum() - pairs.diagonal().sum()) / (n * (n - 1)))
    return (1.0 + (batch_size - 1) * off_diagonal) / batch_size


class MultiLabelSigLipLoss(SigLipLoss):
    """SigLIP loss whose pair targets come from multi-hot finding labels (see module docstring).

    Args:
        cache_labels, rank, world_size, dist_impl: as ``open_clip.loss.SigLipLoss``.
        targets: ``"jaccard"`` (soft Jaccard targets, default), ``"exact"`` (1 iff equal finding
            sets) or ``"identity"`` (plain SigLIP; labels are then not needed and ignored).
        finding_targets: None (default: no finding texts), ``"jaccard"`` or ``"contains"``: the
            targets of ECG x finding-text pairs when ``finding_features`` are passed.
        finding_members: ``[n_texts, n_labels]`` multi-hot, the findings each finding text names
            (a group: several); default one text per label, text f naming label f.
        finding_weight: the finding-text term's weight against the pair term (> 0).
        finding_prior: add each finding text's centred log-odds to its training logits (logit
            adjustment, see the module docstring).
    """

    def __init__(
            self,
            cache_labels: bool = False,
            rank: int = 0,
            world_size: int = 1,
            dist_impl: Optional[str] = None,
            targets: str = "jaccard",
            finding_targets: Optional[str] = None,
            finding_members: Optional[torch.Tensor] = None,
            finding_weight: float = 1.0,
            finding_prior: bool = False,
    ):
        super().__init__(cache_labels=cache_labels, rank=rank, world_size=world_size, dist_impl=dist_impl)
        if targets not in TARGET_MODES:
            raise ValueError(f"targets must be one of {TARGET_MODES}, got {targets!r}")
        if finding_targets is not None and finding_targets not in FINDING_TARGETS:
            raise ValueError(f"finding_targets must be None or one of {tuple(FINDING_TARGETS)}, got {finding_targets!r}")
        if finding_members is not None and (finding_members.ndim != 2 or not bool((finding_members.sum(1) > 0).all())):
            raise ValueError("finding_members must be a [n_texts, n_labels] multi-hot matrix naming at least one "
                             f"finding per text, got shape {tuple(finding_members.shape)}")
        if not finding_weight > 0:
            raise ValueError(f"finding_weight must be > 0, got {finding_weight}")
        self.targets = targets
        self.finding_targets = finding_targets
        self.finding_weight = finding_weight
        self.finding_members = finding_members
        self.finding_prior = finding_prior
        self.finding_positives: Optional[torch.Tensor] = None  # running counts behind finding_offsets
        self.finding_seen = 0

    def get_targets(self, image_labels: torch.Tensor, text_labels: torch.Tensor, target_fn=None) -> torch.Tensor:
        """Soft targets ``[n_image, n_text]`` in [0, 1] for one block of pairs (by ``targets``
        unless `target_fn` is given)."""
        # At least float32 whatever autocast would pick: bf16 counts are exact only up to 256 and
        # bf16 would round the scores themselves.
        dtype = torch.promote_types(image_labels.dtype, torch.float32)
        target_fn = target_fn or _TARGET_FNS[self.targets]
        with torch.autocast(device_type=image_labels.device.type, enabled=False):
            return target_fn(image_labels.to(dtype), text_labels.to(dtype))

    def _block_loss(self, image_features, text_features, image_labels, text_labels, logit_scale, logit_bias,
                    target_fn=None, logit_offset: Optional[torch.Tensor] = None):
        logits = self.get_logits(image_features, text_features, logit_scale, logit_bias)
        # The BCE runs in at least float32: soft targets like 1/3 would be rounded in bf16.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if logit_offset is not None:
            logits = logits + logit_offset.to(logits)
        targets = self.get_targets(image_labels, text_labels, target_fn).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / image_features.shape[0]

    def finding_text_loss(self, image_features, finding_features, labels, logit_scale, logit_bias):
        """The ECG x finding-text term: ``finding_features`` row ``k * n_texts + t`` is finding text t,
        which names the findings of ``finding_members`` row t."""
        n_labels = labels.shape[1]
        members = (torch.eye(n_labels) if self.finding_members is None else self.finding_members)
        if members.shape[1] != n_labels:
            raise ValueError(f"finding_members name {members.shape[1]} labels but the batch has {n_labels}")
        n_texts = members.shape[0]
        copies, rest = divmod(finding_features.shape[0], n_texts)
        if finding_features.ndim != 2 or rest or not copies or finding_features.shape[1] != image_features.shape[1]:
            raise ValueError(f"finding_features must be [k x {n_texts} finding texts, {image_features.shape[1]}] "
                             f"(one row per finding text, k copies), got {tuple(finding_features.shape)}")
        members = members.to(device=labels.device, dtype=labels.dtype)
        offset = self.finding_offsets(labels, members).repeat(copies) if self.finding_prior else None
        loss = self._block_loss(image_features, finding_features, labels, members.repeat(copies, 1), logit_scale,
                                logit_bias, FINDING_TARGETS[self.finding_targets], offset)
        return loss / copies

    @torch.no_grad()
    def finding_offsets(self, labels: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        """``finding_prior``: each finding text's centred log-odds from the batches seen so far
        ``[n_texts]`` (zeros before the first batch), then counts this batch's ECGs."""
        # counted on the labels' device (no host sync per step), in at least float32 (bf16 counts are not exact)
        dtype = torch.promote_types(labels.dtype, torch.float32)
        present = present_targets(labels.to(dtype), members.to(dtype)).sum(0)
        if self.finding_positives is None:
            self.finding_positives = torch.zeros_like(present)
        elif self.finding_positives.shape != present.shape:
            raise ValueError(f"finding_prior counted {self.finding_positives.shape[0]} finding texts so far, "
                             f"this batch has {present.shape[0]}: one loss serves one set of finding texts")
        share = (self.finding_positives + 0.5) / (self.finding_seen + 1)
        log_odds = torch.log(share) - torch.log1p(-share)
        self.finding_positives = self.finding_positives.to(present.device) + present
        self.finding_seen += labels.shape[0]
        return (log_odds - log_odds.mean()).to(labels.device, labels.dtype)

    def forward(
            self,
            image_features: torch.Tensor,
            text_features: torch.Tensor,
            logit_scale: torch.Tensor,
            logit_bias: Optional[torch.Tensor] = None,
            labels: Optional[torch.Tensor] = None,
            text_labels: Optional[torch.Tensor] = None,
            output_dict: bool = False,
            *,
            finding_features: Optional[torch.Tensor] = None,
    ):
        """`labels` are the ECGs' findings; `text_labels` the findings each text states (default:
        `labels`; they differ when training texts name a subset of a record's findings);
        `finding_features` the embedded finding texts (see the module docstring)."""
        _check_features(image_features, text_features)
        losses = {"contrastive_loss": self._pair_loss(image_features, text_features, logit_scale, logit_bias,
                                                      labels, text_labels)}
        if (finding_features is None) != (self.finding_targets is None):
            raise ValueError("finding_features must be passed exactly when the loss has finding_targets "
                             f"(finding_targets={self.finding_targets!r})")
        if finding_features is not None:
            _check_labels(labels, image_features.shape[0], f"finding_targets={self.finding_targets!r}")
            losses["finding_text_loss"] = self.finding_weight * self.finding_text_loss(
                image_features, finding_features, labels.to(finding_features.dtype), logit_scale, logit_bias)
        return losses if output_dict else sum(losses.values())

    def _pair_loss(self, image_features, text_features, logit_scale, logit_bias, labels, text_labels):
        """The SigLIP term over every ECG x batch-text pair, across ranks."""
        if self.targets == "identity":
            return super().forward(image_features, text_features, logit_scale, logit_bias)
        _check_labels(labels, image_features.shape[0], f"targets={self.targets!r}")
        if text_labels is None:
            text_labels = labels
        else:
            _check_labels(text_labels, image_features.shape[0], f"targets={self.targets!r}")
            if text_labels.shape != labels.shape:
                raise ValueError(f"text_labels {tuple(text_labels.shape)} and labels {tuple(labels.shape)} "
                                 "must have the same [batch, n_labels] shape")

        labels, text_labels = labels.to(text_features.dtype), text_labels.to(text_features.dtype)
        loss = self._block_loss(image_features, text_features, labels, text_labels, logit_scale, logit_bias)
        if self.world_size > 1:
            dim = text_features.shape[1]
            # One message per hop: the text labels ride in the same tensor as the text features, so
            # they cannot fall out of step; gradients flow back through the feature columns only.
            payload = torch.cat([text_features, text_labels], dim=1)
            for received in self._exchange(payload):
                loss = loss + self._block_loss(
                    image_features, received[:, :dim], labels, received[:, dim:], logit_scale, logit_bias)
        return loss

    def _exchange(self, payload: torch.Tensor):
        """Yield every other rank's ``[text | labels]`` payload, once each, via ``dist_impl``.

        Mirrors the exchange schedules of ``SigLipLoss.forward`` with open_clip's own helpers.
        """
        import torch.distributed.nn  # autograd-aware collectives; only distributed runs need them

        right_rank = (self.rank + 1) % self.world_size
        left_rank = (self.rank - 1 + self.world_size) % self.world_size
        if self.dist_impl == "bidir":
            to_left = to_right = payload
            num_bidir, remainder = divmod(self.world_size - 1, 2)
            for _ in range(num_bidir):
                from_right, from_left = neighbour_exchange_bidir_with_grad(left_rank, right_rank, to_left, to_right)
                yield from_right
                yield from_left
                to_left, to_right = from_right, from_left
            if remainder:
                yield neighbour_exchange_with_grad(left_rank, right_rank, to_right)
        elif self.dist_impl == "shift":
            to_right = payload
            for _ in range(self.world_size - 1):
                to_right = neighbour_exchange_with_grad(left_rank, right_rank, to_right)
                yield to_right
        elif self.dist_impl == "reduce":
            for i in range(self.world_size):
                received = torch.distributed.nn.all_reduce(payload * (self.rank == i), torch.distributed.ReduceOp.SUM)
                if i != self.rank:
                    yield received
                else:
                    # all_reduce's backward is itself a collective that every rank must enter, so
                    # the own-rank result stays in the graph: as an empty block, where SigLipLoss
                    # computes the whole block and multiplies it by 0.
                    yield received[:0]
        elif self.dist_impl == "gather":
            for i, received in enumerate(torch.distributed.nn.all_gather(payload)):
                if i != self.rank:
                    yield received


def _check_features(image_features, text_features):
    for name, features in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(features, torch.Tensor) or features.ndim != 2:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"{name} must be a [batch, embed_dim] tensor, got {got}")
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features {tuple(image_features.shape)} and text_features {tuple(text_features.shape)} "
            "must have the same [batch, embed_dim] shape")


def _check_labels(labels, batch_size, needed_by: str):
    expected = f"a [batch={batch_size}, n_labels] multi-hot tensor of 0/1 (bool, integer or float)"
    if labels is None:
        raise ValueError(f"{needed_by} needs labels: {expected}")
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be {expected}, got {type(labels).__name__}")
    if labels.ndim != 2 or labels.shape[0] != batch_size:
        raise ValueError(f"labels must be {expected}, got shape {tuple(labels.shape)}")
    if labels.is_complex():
        raise ValueError(f"labels must be {expected}, got dtype {labels.dtype}")
    # One small reduction and host sync per step: a count or a probability passed as a label would
    # otherwise train silently on wrong targets.
    if labels.dtype != torch.bool and bool(((labels != 0) & (labels != 1)).any()):
        raise ValueError(f"labels must be {expected}; found values other than 0 and 1")
