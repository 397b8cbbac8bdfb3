"""ECG signal towers for open_clip, registered in timm's model registry on import.

open_clip builds them through its own ``TimmModel`` when a model config names them in
``vision_cfg.timm_model_name``. One gap remains on open_clip's side: ``TimmModel.lock(...,
freeze_bn_stats=True)`` only converts ``BatchNorm2d`` (``open_clip.utils.freeze_batch_norm_2d``), so
for 1-D towers it is a silent no-op. ``lock_image_tower`` here does open_clip's lock and then freezes
the ``BatchNorm1d`` layers of the same locked groups; ``freeze_batch_norm_1d`` is the building block.
"""
from typing import Collection, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import group_modules, group_parameters

from ._common import check_ecg_input
from .resnet1d import ResNet1d  # importing the tower modules registers their timm entrypoints
from .vit1d import VisionTransformer1d

__all__ = [
    "FrozenBatchNorm1d",
    "ResNet1d",
    "VisionTransformer1d",
    "check_ecg_input",
    "freeze_batch_norm_1d",
    "lock_image_tower",
]


class FrozenBatchNorm1d(nn.Module):
    """BatchNorm1d with statistics and affine parameters fixed as buffers (eval behaviour always).

    The 1-D counterpart of torchvision's ``FrozenBatchNorm2d`` that open_clip uses for 2-D towers.
    State-dict keys match ``BatchNorm1d`` (``num_batches_tracked`` is accepted and dropped), so
    checkpoints move freely between frozen and trainable models.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm1d) -> "FrozenBatchNorm1d":
        frozen = cls(bn.num_features, eps=bn.eps).to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
        if bn.affine:
            frozen.weight.copy_(bn.weight.detach())
            frozen.bias.copy_(bn.bias.detach())
        frozen.running_mean.copy_(bn.running_mean)
        frozen.running_var.copy_(bn.running_var)
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0., eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def freeze_batch_norm_1d(module: nn.Module, module_match: Optional[Collection[str]] = None,
                         name: str = "") -> nn.Module:
    """Replace ``BatchNorm1d`` layers (all, or those whose full name is in `module_match`) by
    ``FrozenBatchNorm1d``; same contract as open_clip's ``freeze_batch_norm_2d``.

    Returns the module (a new one if `module` itself is a matching BatchNorm1d); children are
    replaced in place.
    """
    if isinstance(module, nn.BatchNorm1d) and module.track_running_stats and (
            not module_match or name in module_match):
        return FrozenBatchNorm1d.from_batch_norm(module)
    for child_name, child in module.named_children():
        full_name = f"{name}.{child_name}" if name else child_name
        new_child = freeze_batch_norm_1d(child, module_match, full_name)
        if new_child is not child:
            module.add_module(child_name, new_child)
    return module


def _locked_module_names(trunk: nn.Module, unlocked_groups: int) -> set:
    """Names of the trunk modules open_clip's ``TimmModel.lock(unlocked_groups)`` locks."""
    matcher = trunk.group_matcher()
    max_locked_group = max(group_parameters(trunk, matcher).keys()) - unlocked_groups
    return {name for name, group in group_modules(trunk, matcher, reverse=True).items()
            if group <= max_locked_group}


def lock_image_tower(model: nn.Module, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
    """open_clip's ``model.lock_image_tower`` plus, with `freeze_bn_stats`, frozen BatchNorm1d.

    `model` is an open_clip model whose image tower is a ``TimmModel`` (every ECG config). As in
    open_clip, ``unlocked_groups=0`` locks the whole trunk and n > 0 leaves the last n parameter
    groups of ``trunk.group_matcher()`` trainable; the projection head always stays trainable.
    Calling it after open_clip already locked the tower (as ``open_clip_train`` does for
    ``--lock-image``) is safe: locking and freezing are idempotent.
    """
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    if trunk is None:
        raise ValueError(f"lock_image_tower expects an open_clip model with a timm image tower "
                         f"(model.visual.trunk), got {type(model).__name__}")
    # the class's (open_clip's) method, so a model whose instance routes lock_image_tower here
    # (the training glue does) does not recurse
    type(model).lock_image_tower(model, unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_bn_stats)
    if freeze_bn_stats:
        module_match = _locked_module_names(trunk, unlocked_groups) if unlocked_groups else None
        freeze_batch_norm_1d(trunk, module_match)
