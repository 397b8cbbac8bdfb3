"""1-D ResNets for ECG, built the way timm builds its 2-D ResNets (``timm/models/resnet.py``).

Input is ``[batch, leads, samples]`` float32 (millivolts; the data pipeline feeds 500 Hz), any length
from ``min_samples`` up: global pooling makes the output length-independent.

Architecture choices (the paper only says "1D-ResNet-18"; these are ours, all constructor options):

* Stem: ``Conv1d(k=15, stride 2)`` + BN + ReLU + ``MaxPool1d(3, stride 2)``. 15 samples is 30 ms at
  500 Hz, about a QRS onset; the 2-D ResNet's 7-pixel stem would see only 14 ms.
* Blocks: ``BasicBlock1d`` with kernel 7 (``kernel_size``). With kernel 3 the receptive field of a
  ResNet-18 stays under one heartbeat at 500 Hz; kernel 7 reaches several seconds, so rhythm findings
  (AF, blocks) are visible to single units, at ~2.3x the conv compute of kernel 3.
* Stage widths 64-128-256-512 and strides 1-2-2-2, as in ResNet-18/34; total stride 32.
* Minimum input length: ``min_samples = 32`` (the total stride), the shortest input whose last stage
  still has one position. Shorter inputs raise ValueError. (Padding would let the convolutions run
  on fewer samples, but the features would then be mostly padding.)

Entrypoints (timm names, usable as ``vision_cfg.timm_model_name`` in open_clip configs):
``ecg_resnet1d18``, ``ecg_resnet1d34`` (12 leads), ``ecg_resnet1d18_6lead`` (limb leads I, II, III,
aVR, aVL, aVF), ``ecg_resnet1d18_1lead`` (lead I). The lead count comes from the pretrained cfg's
``input_size = (leads, 1, samples)`` (timm requires a 3-tuple and takes ``in_chans`` from its first
entry); ``pool_size`` is None so open_clip's ``TimmModel`` treats the features as pooled vectors.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model

from ..compat import feature_take_indices
from ..leads import LEAD_SETS
from ._common import check_ecg_input, default_lead_names, ecg_pretrained_cfg

__all__ = ["BasicBlock1d", "ResNet1d", "SelectAdaptivePool1d"]

_POOL_TYPES = ("", "avg", "max", "avgmax", "catavgmax")


class SelectAdaptivePool1d(nn.Module):
    """Global pooling over time, the 1-D counterpart of timm's ``SelectAdaptivePool2d``.

    ``pool_type``: 'avg', 'max', 'avgmax' (mean of both), 'catavgmax' (concatenated, doubles the
    feature dim) or '' (no pooling: ``[B, C, L]`` passes through).
    """

    def __init__(self, pool_type: str = "avg", flatten: bool = True):
        super().__init__()
        pool_type = pool_type or ""
        if pool_type not in _POOL_TYPES:
            raise ValueError(f"unknown global_pool {pool_type!r}; expected one of {_POOL_TYPES}")
        self.pool_type = pool_type
        self.flatten = flatten

    def is_identity(self) -> bool:
        return not self.pool_type

    def feat_mult(self) -> int:
        return 2 if self.pool_type == "catavgmax" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pool_type:
            return x
        if self.pool_type == "avg":
            x = F.adaptive_avg_pool1d(x, 1)
        elif self.pool_type == "max":
            x = F.adaptive_max_pool1d(x, 1)
        else:
            x_avg, x_max = F.adaptive_avg_pool1d(x, 1), F.adaptive_max_pool1d(x, 1)
            x = 0.5 * (x_avg + x_max) if self.pool_type == "avgmax" else torch.cat((x_avg, x_max), dim=1)
        return x.flatten(1) if self.flatten else x


class BasicBlock1d(nn.Module):
    """ResNet basic block (two convs + identity/projection shortcut) over time."""
    expansion = 1

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            kernel_size: int = 7,
            downsample: Optional[nn.Module] = None,
            norm_layer: Type[nn.Module] = nn.BatchNorm1d,
            act_layer: Type[nn.Module] = nn.ReLU,
            drop_path: float = 0.,
    ):
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = nn.Conv1d(in_chs, out_chs, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn1 = norm_layer(out_chs)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv1d(out_chs, out_chs, kernel_size, padding=padding, bias=False)
        self.bn2 = norm_layer(out_chs)
        self.act2 = act_layer(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def zero_init_last(self) -> None:
        """Start each residual branch at zero so the untrained network is close to the identity."""
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(self.drop_path(x) + shortcut)


def _make_stage(
        in_chs: int,
        out_chs: int,
        depth: int,
        stride: int,
        kernel_size: int,
        norm_layer: Type[nn.Module],
        drop_path_rates: Sequence[float],
) -> nn.Sequential:
    downsample = None
    if stride != 1 or in_chs != out_chs:
        downsample = nn.Sequential(
            nn.Conv1d(in_chs, out_chs, 1, stride=stride, bias=False),
            norm_layer(out_chs),
        )
    blocks = []
    for i in range(depth):
        blocks.append(BasicBlock1d(
            in_chs if i == 0 else out_chs,
            out_chs,
            stride=stride if i == 0 else 1,
            kernel_size=kernel_size,
            downsample=downsample if i == 0 else None,
            norm_layer=norm_layer,
            drop_path=drop_path_rates[i],
        ))
    return nn.Sequential(*blocks)


class ResNet1d(nn.Module):
    """1-D ResNet over ``[batch, leads, samples]`` with timm's model API.

    Args:
        layers: blocks per stage ((2, 2, 2, 2) is ResNet-18, (3, 4, 6, 3) ResNet-34).
        num_classes: classifier outputs; 0 gives pooled features (what open_clip uses).
        in_chans: number of leads.
        global_pool: 'avg', 'max', 'avgmax', 'catavgmax' or '' (see ``SelectAdaptivePool1d``).
        stem_kernel_size / kernel_size: temporal kernel of the stem conv and of the block convs.
        channels: stage widths.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, increasing linearly over blocks up to this value.
        lead_names: names used in error messages; defaults to the standard set for `in_chans`.
        check_finite: reject NaN/Inf input with a ValueError (one reduction + GPU sync per forward).
        zero_init_last: zero the last BN of each block.
    """

    def __init__(
            self,
            layers: Sequence[int] = (2, 2, 2, 2),
            num_classes: int = 0,
            in_chans: int = 12,
            global_pool: str = "avg",
            stem_width: int = 64,
            stem_kernel_size: int = 15,
            kernel_size: int = 7,
            channels: Sequence[int] = (64, 128, 256, 512),
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Type[nn.Module] = nn.BatchNorm1d,
            lead_names: Optional[Sequence[str]] = None,
            check_finite: bool = True,
            zero_init_last: bool = True,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.lead_names = list(lead_names) if lead_names is not None else default_lead_names(in_chans)
        self.check_finite = check_finite
        self.grad_checkpointing = False
        self.min_samples = 32  # total stride: stem conv 2 x max-pool 2 x three stride-2 stages

        self.conv1 = nn.Conv1d(in_chans, stem_width, stem_kernel_size, stride=2,
                               padding=stem_kernel_size // 2, bias=False)
        self.bn1 = norm_layer(stem_width)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool1d(kernel_size=3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=stem_width, reduction=2, module="act1")]

        total_blocks = sum(layers)
        dpr = torch.linspace(0, drop_path_rate, total_blocks).tolist() if total_blocks > 1 else [drop_path_rate]
        in_chs, reduction, block_idx = stem_width, 4, 0
        for stage_idx, (depth, out_chs) in enumerate(zip(layers, channels)):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            stage = _make_stage(in_chs, out_chs, depth, stride, kernel_size, norm_layer,
                                dpr[block_idx:block_idx + depth])
            self.add_module(f"layer{stage_idx + 1}", stage)
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"layer{stage_idx + 1}"))
            in_chs, block_idx = out_chs, block_idx + depth
        self.num_stages = len(layers)
        self.num_features = self.head_hidden_size = in_chs

        self.global_pool = SelectAdaptivePool1d(global_pool)
        self.fc = self._make_classifier(num_classes)
        self._init_weights(zero_init_last)

    def _make_classifier(self, num_classes: int) -> nn.Module:
        num_pooled = self.num_features * self.global_pool.feat_mult()
        return nn.Linear(num_pooled, num_classes) if num_classes > 0 else nn.Identity()

    def _init_weights(self, zero_init_last: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, BasicBlock1d):
                    m.zero_init_last()

    def _stages(self) -> List[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, str]:
        """Parameter groups for layer-wise locking / LR decay: stem, then stages (coarse) or blocks."""
        return dict(stem=r"^conv1|^bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head; ``global_pool=None`` keeps the current pooling."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool1d(global_pool)
        self.fc = self._make_classifier(num_classes)

    def check_input(self, x: torch.Tensor) -> None:
        check_ecg_input(x, self.in_chans, self.min_samples, self.lead_names, self.check_finite)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn1(self.conv1(x)))

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stage, x)
        return stage(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, leads, T]`` -> unpooled features ``[B, num_features, ceil(T / 32)]``."""
        self.check_input(x)
        x = self.maxpool(self._stem(x))
        for stage in self._stages():
            x = self._run_stage(stage, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCL",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features plus intermediates ``[B, C_i, T_i]`` of the stem (index 0) and each stage (1-4).

        Same contract as timm's ``ResNet.forward_intermediates``: ``indices`` takes the last n if int,
        all if None, or the listed ones. ``output_fmt`` 'NCL' (channels first); 'NCHW' is accepted as
        an alias because open_clip's ``TimmModel.forward_intermediates`` passes it by default. ResNets
        have no final norm, so ``norm`` has no effect (as in timm).
        """
        if output_fmt not in ("NCL", "NCHW"):
            raise ValueError(f"output_fmt must be 'NCL' (or its alias 'NCHW'), got {output_fmt!r}")
        self.check_input(x)
        take_indices, max_index = feature_take_indices(self.num_stages + 1, indices)
        intermediates = []
        x = self._stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        stages = self._stages()
        if stop_early:
            stages = stages[:max_index]
        for feat_idx, stage in enumerate(stages, start=1):
            x = self._run_stage(stage, x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_resnet1d(variant: str, pretrained: bool = False, **kwargs) -> ResNet1d:
    return build_model_with_cfg(ResNet1d, variant, pretrained, **kwargs)


def _cfg(leads: int = 12, **kwargs) -> Dict:
    return ecg_pretrained_cfg("conv1", "fc", leads=leads, **kwargs)


default_cfgs = generate_default_cfgs({
    "ecg_resnet1d18": _cfg(),
    "ecg_resnet1d34": _cfg(),
    "ecg_resnet1d18_6lead": _cfg(leads=6),
    "ecg_resnet1d18_1lead": _cfg(leads=1),
    "ecg_resnet1d18_rr": _cfg(leads=len(LEAD_SETS["12+rr"])),
})


@register_model
def ecg_resnet1d18(pretrained: bool = False, **kwargs) -> ResNet1d:
    """1D-ResNet-18 for 12-lead ECG (the paper's ECG encoder)."""
    return _create_resnet1d("ecg_resnet1d18", pretrained, **dict(layers=(2, 2, 2, 2), **kwargs))


@register_model
def ecg_resnet1d34(pretrained: bool = False, **kwargs) -> ResNet1d:
    """1D-ResNet-34 for 12-lead ECG."""
    return _create_resnet1d("ecg_resnet1d34", pretrained, **dict(layers=(3, 4, 6, 3), **kwargs))


@register_model
def ecg_resnet1d18_6lead(pretrained: bool = False, **kwargs) -> ResNet1d:
    """1D-ResNet-18 for the six limb leads I, II, III, aVR, aVL, aVF."""
    return _create_resnet1d("ecg_resnet1d18_6lead", pretrained, **dict(layers=(2, 2, 2, 2), **kwargs))


@register_model
def ecg_resnet1d18_1lead(pretrained: bool = False, **kwargs) -> ResNet1d:
    """1D-ResNet-18 for lead I alone (single-lead / wearable recordings)."""
    return _create_resnet1d("ecg_resnet1d18_1lead", pretrained, **dict(layers=(2, 2, 2, 2), **kwargs))


@register_model
def ecg_resnet1d18_rr(pretrained: bool = False, **kwargs) -> ResNet1d:
    """1D-ResNet-18 for the 12 leads plus the RR channels (:mod:`open_clip_ecg.data.rhythm`):
    beat-to-beat timing the convolutions do not compare across a record (sinus arrhythmia)."""
    kwargs = dict(layers=(2, 2, 2, 2), lead_names=LEAD_SETS["12+rr"], **kwargs)
    return _create_resnet1d("ecg_resnet1d18_rr", pretrained, **kwargs)
