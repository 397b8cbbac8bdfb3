"""1-D Vision Transformer for ECG: patches over time, timm's transformer ``Block``.

Input is ``[batch, leads, samples]``; a ``Conv1d(leads, dim, kernel=stride=patch_size)`` turns each
non-overlapping window of all leads into one token (patch 50 = 100 ms at 500 Hz, about one QRS).
Trailing samples that do not fill a whole patch are dropped (at most ``patch_size - 1``; zero padding
would feed the model a flat line it never sees in real signals). Minimum input length: one patch.

Positional embedding, any length (``pos_embed``):

* ``'sincos'`` (default): fixed 1-D sine-cosine embedding computed on the fly for the actual number
  of patches, so 2 s and 10 s inputs share one definition of position and nothing is resampled.
* ``'learn'``: a learned table for ``max_samples // patch_size`` patches, linearly interpolated (as
  timm resamples 2-D position tables) when the input has a different number of patches.

Pooling (``global_pool``): 'token' (class token, default), 'avg' (mean of patch tokens) or ''.
Entrypoints: ``ecg_vit1d_tiny`` (dim 192, depth 6) and ``ecg_vit1d_small`` (dim 384, depth 8), both
patch 50 for 12 leads.
"""
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, checkpoint, checkpoint_seq, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block

from ..compat import feature_take_indices
from ._common import check_ecg_input, default_lead_names, ecg_pretrained_cfg

__all__ = ["VisionTransformer1d", "sincos_pos_embed_1d"]

_POOL_TYPES = ("", "token", "avg")


def sincos_pos_embed_1d(num_positions: int, dim: int, temperature: float = 10000.,
                        device=None, dtype=torch.float32) -> torch.Tensor:
    """Transformer sine-cosine position embedding ``[num_positions, dim]`` (sin half, cos half)."""
    if dim % 2:
        raise ValueError(f"sincos position embedding needs an even embed_dim, got {dim}")
    omega = 1. / temperature ** (torch.arange(dim // 2, device=device, dtype=torch.float32) / (dim // 2))
    angles = torch.arange(num_positions, device=device, dtype=torch.float32)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).to(dtype)


class VisionTransformer1d(nn.Module):
    """ViT over time with timm's model API (``forward_features`` / ``forward_head`` / ...).

    Args:
        max_samples: length the learned position table is sized for (``pos_embed='learn'``); any
            other length is interpolated. Ignored by 'sincos'.
        patch_size: samples per token.
        in_chans: number of leads.
        num_classes: classifier outputs; 0 gives pooled features (what open_clip uses).
        global_pool: 'token', 'avg' or ''.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer size.
        class_token: prepend a class token (needed for 'token' pooling).
        pos_embed: 'sincos' or 'learn' (see module docstring).
        drop_rate: dropout on tokens and before the classifier; drop_path_rate: stochastic depth,
            increasing linearly over blocks; attn_drop_rate: attention dropout.
        lead_names: names used in error messages; defaults to the standard set for `in_chans`.
        check_finite: reject NaN/Inf input with a ValueError (one reduction + GPU sync per forward).
    """

    def __init__(
            self,
            max_samples: int = 5000,
            patch_size: int = 50,
            in_chans: int = 12,
            num_classes: int = 0,
            global_pool: str = "token",
            embed_dim: int = 384,
            depth: int = 8,
            num_heads: int = 6,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            class_token: bool = True,
            pos_embed: str = "sincos",
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            lead_names: Optional[Sequence[str]] = None,
            check_finite: bool = True,
    ):
        super().__init__()
        if pos_embed not in ("sincos", "learn"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learn', got {pos_embed!r}")
        self._check_pool(global_pool, class_token)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.min_samples = patch_size
        self.lead_names = list(lead_names) if lead_names is not None else default_lead_names(in_chans)
        self.check_finite = check_finite
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.pos_embed_type = pos_embed
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.patch_embed = nn.Conv1d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = (
            nn.Parameter(torch.zeros(1, max_samples // patch_size, embed_dim)) if pos_embed == "learn" else None)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer)
            for i in range(depth)
        ])
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size)
                             for i in range(depth)]
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    @staticmethod
    def _check_pool(global_pool: str, class_token: bool) -> None:
        if global_pool not in _POOL_TYPES:
            raise ValueError(f"unknown global_pool {global_pool!r}; expected one of {_POOL_TYPES}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")

    def _init_weights(self) -> None:
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        """Parameter groups: patch/position embedding, then one per block (the final norm joins the last)."""
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head; ``global_pool=None`` keeps the current pooling."""
        self.num_classes = num_classes
        if global_pool is not None:
            self._check_pool(global_pool, self.cls_token is not None)
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def check_input(self, x: torch.Tensor) -> None:
        check_ecg_input(x, self.in_chans, self.min_samples, self.lead_names, self.check_finite)

    def _position_embedding(self, num_patches: int, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is None:
            return sincos_pos_embed_1d(num_patches, self.embed_dim, device=x.device, dtype=x.dtype)[None]
        if self.pos_embed.shape[1] == num_patches:
            return self.pos_embed
        # [1, N, D] -> [1, D, N] -> resample to num_patches along time -> [1, num_patches, D]
        resized = F.interpolate(self.pos_embed.transpose(1, 2), size=num_patches, mode="linear",
                                align_corners=False)
        return resized.transpose(1, 2)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).transpose(1, 2)  # [B, N, D]
        x = x + self._position_embedding(x.shape[1], x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, leads, T]`` -> normalised tokens ``[B, prefix + T // patch_size, embed_dim]``."""
        self.check_input(x)
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "token":
            return x[:, 0]
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.head(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCL",
            intermediates_only: bool = False,
            return_prefix_tokens: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Final tokens plus per-block intermediates, as timm's ``VisionTransformer`` does it.

        Intermediates are patch tokens ``[B, D, N]`` ('NCL', channels first like the ResNet's; 'NCHW'
        is accepted as an alias for open_clip's default) or ``[B, N, D]`` ('NLC'). With
        ``return_prefix_tokens`` each entry is ``(patch_tokens, class_token [B, 1, D])``; ``norm``
        applies the final LayerNorm to intermediates.
        """
        if output_fmt not in ("NCL", "NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCL' (alias 'NCHW') or 'NLC', got {output_fmt!r}")
        self.check_input(x)
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self._embed(x)
        blocks = self.blocks if not stop_early else self.blocks[:max_index + 1]
        intermediates = []
        for i, block in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x)
            else:
                x = block(x)
            if i in take_indices:
                y = self.norm(x) if norm else x
                prefix, tokens = y[:, :self.num_prefix_tokens], y[:, self.num_prefix_tokens:]
                if output_fmt != "NLC":
                    tokens = tokens.transpose(1, 2)
                intermediates.append((tokens, prefix) if return_prefix_tokens else tokens)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_vit1d(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer1d:
    return build_model_with_cfg(VisionTransformer1d, variant, pretrained, **kwargs)


def _cfg(leads: int = 12, **kwargs) -> Dict:
    return ecg_pretrained_cfg("patch_embed", "head", leads=leads, **kwargs)


default_cfgs = generate_default_cfgs({
    "ecg_vit1d_tiny": _cfg(),
    "ecg_vit1d_small": _cfg(),
})


@register_model
def ecg_vit1d_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer1d:
    """ViT-1D tiny: patch 50, dim 192, depth 6, 3 heads (~2.8 M parameters), 12 leads."""
    model_args = dict(patch_size=50, embed_dim=192, depth=6, num_heads=3)
    return _create_vit1d("ecg_vit1d_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def ecg_vit1d_small(pretrained: bool = False, **kwargs) -> VisionTransformer1d:
    """ViT-1D small: patch 50, dim 384, depth 8, 6 heads (~14 M parameters), 12 leads."""
    model_args = dict(patch_size=50, embed_dim=384, depth=8, num_heads=6)
    return _create_vit1d("ecg_vit1d_small", pretrained, **dict(model_args, **kwargs))
