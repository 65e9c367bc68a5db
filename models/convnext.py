"""ConvNeXt-T, plain and KernelWarehouse, in one implementation (KW-SPEC section 5).

The plain model is the official ConvNeXt (pointwise layers as ``nn.Linear`` on channels-last
tensors, layer scale of shape ``[dim]``). The KW model keeps every tensor channels-first: all its
convs are KW with a bias, the pointwise layers are 1x1 convs and the layer scale is
``[1, dim, 1, 1]``; the head stays plain.
"""
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from torch import nn

from ._builder import TemperatureMixin, build, finish_kw, make_layer_factory


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


class ConvNeXt(TemperatureMixin, nn.Module):
    """ConvNeXt with optional KernelWarehouse convs.

    Args:
        num_classes: classifier outputs.
        depths: blocks per stage.
        dims: channels per stage.
        drop_path_rate: stochastic depth, linearly increasing over the blocks.
        dropout: dropout before the head.
        layer_scale_init_value: initial layer scale (0 disables it).
        head_init_scale: factor applied to the initial head weights and bias.
        kw: ``WarehouseManager`` settings, or ``None`` for a plain ConvNeXt.
    """

    def __init__(self, num_classes: int = 1000, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (96, 192, 384, 768), drop_path_rate: float = 0., dropout: float = 0.,
                 layer_scale_init_value: float = 1e-6, head_init_scale: float = 1.,
                 kw: Optional[Dict[str, Any]] = None, in_chans: int = 3):
        super().__init__()
        make_layer = make_layer_factory(self, kw, norm_layer=nn.LayerNorm)
        self.num_classes = num_classes
        self.num_features = dims[-1]
        self.downsample_layers = nn.ModuleList([nn.Sequential(
            make_layer(in_chans, dims[0], 4, stride=4, bias=True, warehouse_name='stagestem_conv0'),
            LayerNorm2d(dims[0], eps=1e-6))])
        for i in range(len(dims) - 1):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm2d(dims[i], eps=1e-6),
                make_layer(dims[i], dims[i + 1], 2, stride=2, bias=True, warehouse_name=f'stage{i}_layerds_conv0')))
        drop_paths = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            first = sum(depths[:i])
            self.stages.append(nn.Sequential(*[
                Block(dim, drop_paths[first + j], layer_scale_init_value, make_layer, f'stage{i}_layer{j}_',
                      channels_last=kw is None)
                for j in range(depth)]))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(dims[-1], num_classes)

        self.apply(self._init_weights)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)
            self.head.bias.mul_(head_init_scale)
        finish_kw(self)

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

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.norm(x.mean([-2, -1]))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def convnext_tiny(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return build(ConvNeXt, 'convnext_tiny', pretrained, kwargs)


def kw_convnext_tiny(pretrained: bool = False, **kwargs) -> ConvNeXt:
    return build(ConvNeXt, 'kw_convnext_tiny', pretrained, kwargs, dict(sharing_range=('layer', 'pwconv')))


ENTRYPOINTS = (convnext_tiny, kw_convnext_tiny)
