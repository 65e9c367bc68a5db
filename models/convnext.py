"""ConvNeXt-T, plain and KernelWarehouse, in one implementation (KW-SPEC section 5).

The plain model is the official ConvNeXt (pointwise layers as ``nn.Linear`` on channels-last
tensors, layer scale of shape ``[dim]``). The KW model keeps every tensor channels-first: all its
convs are KW with a bias, the pointwise layers are 1x1 convs and the layer scale is
``[1, dim, 1, 1]``; the head stays plain.
"""
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from timm.models import generate_default_cfgs
from torch import nn

from ._builder import ConvNetContract, build, finish_kw, make_global_pool, make_layer_factory, pretrained_cfg


class Block(nn.Module):
    """Depthwise 7x7 -> LayerNorm -> 1x1 (4x) -> GELU -> 1x1 -> layer scale, plus the shortcut.

    ``channels_last`` selects the plain layout (Linear pointwise layers); otherwise the block runs
    channels-first with 1x1 convs from ``make_layer`` (KW when the model is).
    """

    def __init__(self, dim: int, drop_path: float = 0., layer_scale_init_value: float = 1e-6,
                 make_layer: Callable[..., nn.Module] = None, warehouse_prefix: str = '',
                 channels_last: bool = True):
        super().__init__()
        self.channels_last = channels_last
        pointwise = 'linear' if channels_last else 'conv2d'
        self.dwconv = make_layer(dim, dim, 7, padding=3, groups=dim, bias=True,
                                 warehouse_name=f'{warehouse_prefix}dwconv0')
        self.norm = nn.LayerNorm(dim, eps=1e-6) if channels_last else LayerNorm2d(dim, eps=1e-6)
        self.pwconv1 = make_layer(dim, 4 * dim, 1, bias=True, warehouse_name=f'{warehouse_prefix}pwconv1',
                                  layer_type=pointwise)
        self.act = nn.GELU()
        self.pwconv2 = make_layer(4 * dim, dim, 1, bias=True, warehouse_name=f'{warehouse_prefix}pwconv2',
                                  layer_type=pointwise)
        gamma_shape = (dim,) if channels_last else (1, dim, 1, 1)
        self.gamma = (nn.Parameter(layer_scale_init_value * torch.ones(gamma_shape))
                      if layer_scale_init_value > 0 else None)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x)
        if self.channels_last:
            x = x.permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        if self.gamma is not None:
            x = self.gamma * x
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)


class ConvNeXt(ConvNetContract, nn.Module):
    """ConvNeXt with optional KernelWarehouse convs.

    Args:
        num_classes: classifier outputs (0: none, the model returns pooled, normalised features).
        in_chans: input channels.
        depths: blocks per stage.
        dims: channels per stage.
        drop_path_rate: stochastic depth, linearly increasing over the blocks.
        dropout: dropout before the head.
        layer_scale_init_value: initial layer scale (0 disables it).
        head_init_scale: factor applied to the initial head weights and bias.
        global_pool: timm's pooling type ('' keeps the feature map, normalised).
        kw: ``WarehouseManager`` settings, or ``None`` for a plain ConvNeXt.

    The feature levels are the four stages (strides 4 to 32).
    """
    stem_is_level = False

    def __init__(self, num_classes: int = 1000, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (96, 192, 384, 768), drop_path_rate: float = 0., dropout: float = 0.,
                 layer_scale_init_value: float = 1e-6, head_init_scale: float = 1.,
                 global_pool: str = 'avg', kw: Optional[Dict[str, Any]] = None, in_chans: int = 3):
        super().__init__()
        make_layer = make_layer_factory(self, kw, norm_layer=nn.LayerNorm)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = dims[-1]
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            make_layer(in_chans, dims[0], 4, stride=4, bias=True, warehouse_name='stagestem_conv0'),
            LayerNorm2d(dims[0], eps=1e-6))])
        for i in range(len(dims) - 1):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm2d(dims[i], eps=1e-6),
                make_layer(dims[i], dims[i + 1], 2, stride=2, bias=True, warehouse_name=f'stage{i}_layerds_conv0')))
        # on the CPU also when the model is built on another device (e.g. 'meta')
        drop_paths = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        self.stages = nn.ModuleList()
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            first = sum(depths[:i])
            self.stages.append(nn.Sequential(*[
                Block(dim, drop_paths[first + j], layer_scale_init_value, make_layer, f'stage{i}_layer{j}_',
                      channels_last=kw is None)
                for j in range(depth)]))
        self.feature_info = [dict(num_chs=dim, reduction=4 * 2 ** i, module=f'stages.{i}')
                             for i, dim in enumerate(dims)]
        self.global_pool = make_global_pool(global_pool, mean_op=True)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head_drop = nn.Dropout(dropout)
        self.head = self._classifier(num_classes)

        self.apply(self._init_weights)
        if num_classes > 0:
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)
        finish_kw(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups in depth order, for timm's layer-wise lr decay (``--layer_decay``).

        A downsampler joins the first block of the stage it starts; the warehouses and the head
        fall in the last group.
        """
        return dict(stem=r'^downsample_layers\.0\.', blocks=r'^stages\.(\d+)' if coarse else [
            (r'^downsample_layers\.(\d+)', (0,)), (r'^stages\.(\d+)\.(\d+)', None), (r'^norm\.', (99999,))])

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=.02)
            nn.init.zeros_(m.bias)

    def _classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = make_global_pool(global_pool, mean_op=True)
        self.head = self._like_model(self._classifier(num_classes))
        self.head.apply(self._init_weights)

    def _prune_levels_after(self, index: int) -> None:
        self.stages = self.stages[:index + 1]
        self.downsample_layers = self.downsample_layers[:index + 1]

    def _prune_final_features(self, prune: bool) -> None:
        # The norm belongs to the head: it goes with it (see prune_intermediate_layers) or when asked.
        if prune:
            self.norm = nn.Identity()

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        return super().prune_intermediate_layers(indices, prune_norm or prune_head, prune_head)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample_layers[0](x)

    def _levels(self) -> List[nn.Module]:
        return [self.stages[0], *(nn.Sequential(downsample, stage) for downsample, stage in
                                  zip(self.downsample_layers[1:], self.stages[1:]))]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if x.ndim == 4:  # no pooling: normalise each position's channels
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            x = self.norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# The original release published a checkpoint of KW ConvNeXt-T, not of its plain baseline.
default_cfgs = generate_default_cfgs({
    'plain_convnext_tiny.in1k': pretrained_cfg('head', 'downsample_layers.0.0', released=False),
    'kw_convnext_tiny.in1k': pretrained_cfg('head', (), released=True),
})

_FEATURES = dict(out_indices=(0, 1, 2, 3))  # the four stages, as timm's ConvNeXt


def plain_convnext_tiny(pretrained: bool = False, **kwargs) -> ConvNeXt:
    """The release's plain ConvNeXt-T (released configs call it ``convnext_tiny``)."""
    return build(ConvNeXt, 'plain_convnext_tiny', pretrained, kwargs, feature_cfg=_FEATURES)


def kw_convnext_tiny(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return build(ConvNeXt, 'kw_convnext_tiny', pretrained, kwargs, dict(sharing_range=('layer', 'pwconv')),
                 feature_cfg=_FEATURES)


ENTRYPOINTS = (plain_convnext_tiny, kw_convnext_tiny)
