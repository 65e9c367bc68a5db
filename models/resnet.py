"""ResNet-18/50, plain and KernelWarehouse, in one implementation (KW-SPEC section 5).

The KW variant keeps the torchvision layout and state-dict keys, adds ``warehouse_manager`` (one
warehouse per stage with the default sharing range) and makes the block convs dynamic. The stem
and ``fc`` stay plain. Hand-over: the first conv of a stage's first block and its strided 1x1
downsample draw on the previous stage's warehouse.
"""
from typing import Any, Callable, Dict, List, Optional, Sequence, Type, Union

import torch
from timm.layers import DropPath
from timm.models import generate_default_cfgs
from torch import nn

from ._builder import ConvNetContract, build, finish_kw, make_global_pool, make_layer_factory, pretrained_cfg


def _conv(make_layer: Callable[..., nn.Module], in_planes: int, out_planes: int, kernel_size: int,
          stride: int, warehouse_name: Optional[str]) -> nn.Module:
    """A bias-free conv; KW when it has a warehouse name and the model is KW."""
    return make_layer(in_planes, out_planes, kernel_size, stride=stride, padding=kernel_size // 2, bias=False,
                      warehouse_name=warehouse_name or '', enabled=warehouse_name is not None)


class BasicBlock(nn.Module):
    expansion = 1
    num_convs = 2
    # In the first stage there is no previous warehouse to hand over to: the first conv of
    # layer1.0 stays in stage 0's warehouse (BasicBlock) or is a plain conv (Bottleneck).
    kw_first_conv_in_stage0 = True

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 drop_path: float = 0., make_layer: Callable[..., nn.Module] = None,
                 warehouse_names: Sequence[Optional[str]] = (None, None)):
        super().__init__()
        self.conv1 = _conv(make_layer, inplanes, planes, 3, stride, warehouse_names[0])
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(make_layer, planes, planes, 3, 1, warehouse_names[1])
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(identity + self.drop_path(out))


class Bottleneck(nn.Module):
    expansion = 4
    num_convs = 3
    kw_first_conv_in_stage0 = False

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 drop_path: float = 0., make_layer: Callable[..., nn.Module] = None,
                 warehouse_names: Sequence[Optional[str]] = (None, None, None)):
        super().__init__()
        self.conv1 = _conv(make_layer, inplanes, planes, 1, 1, warehouse_names[0])
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(make_layer, planes, planes, 3, stride, warehouse_names[1])
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(make_layer, planes, planes * self.expansion, 1, 1, warehouse_names[2])
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(identity + self.drop_path(out))


Block = Union[Type[BasicBlock], Type[Bottleneck]]


def block_warehouse_names(block: Block, stage: int, index: int, prev_stage_depth: int):
    """Warehouse names ``stage{s}_layer{l}_conv{c}`` of a block's convs and of its downsample.

    A stage's first block hands its first conv and its downsample over to the previous stage,
    where they count as that stage's next layer. ``None`` marks a plain conv.
    """
    names: List[Optional[str]] = [f'stage{stage}_layer{index}_conv{c}' for c in range(block.num_convs)]
    downsample = None
    if index == 0 and stage > 0:
        names[0] = f'stage{stage - 1}_layer{prev_stage_depth}_conv0'
        downsample = f'stage{stage - 1}_layer{prev_stage_depth}_conv{block.num_convs}'
    elif index == 0 and not block.kw_first_conv_in_stage0:
        names[0] = None
    return names, downsample


class ResNet(ConvNetContract, nn.Module):
    """ResNet with optional KernelWarehouse convs.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage.
        num_classes: classifier outputs (0: none, the model returns pooled features).
        in_chans: input channels.
        dropout: dropout before ``fc``.
        drop_path_rate: stochastic depth of every residual block (uniform over depth, as in the
            original release; KW-SPEC section 8).
        global_pool: timm's pooling type ('' keeps the feature map).
        kw: ``WarehouseManager`` settings, or ``None`` for a plain ResNet.
    """

    def __init__(self, block: Block, layers: Sequence[int], num_classes: int = 1000, in_chans: int = 3,
                 dropout: float = 0., drop_path_rate: float = 0., global_pool: str = 'avg',
                 kw: Optional[Dict[str, Any]] = None):
        super().__init__()
        make_layer = make_layer_factory(self, kw)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_chans, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=self.inplanes, reduction=2, module='relu')]
        for stage, depth in enumerate(layers):
            self.add_module(f'layer{stage + 1}', self._make_stage(
                block, 64 * 2 ** stage, depth, stage, layers[stage - 1] if stage else 0, drop_path_rate, make_layer))
            self.feature_info.append(dict(num_chs=self.inplanes, reduction=4 * 2 ** stage, module=f'layer{stage + 1}'))
        self.num_features = self.head_hidden_size = 512 * block.expansion
        self.global_pool = make_global_pool(global_pool)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = self._classifier(num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        finish_kw(self)

    def _make_stage(self, block: Block, planes: int, depth: int, stage: int, prev_stage_depth: int,
                    drop_path: float, make_layer: Callable[..., nn.Module]) -> nn.Sequential:
        stride = 1 if stage == 0 else 2
        blocks = []
        for index in range(depth):
            conv_names, downsample_name = block_warehouse_names(block, stage, index, prev_stage_depth)
            downsample = None
            if index == 0 and (stride != 1 or self.inplanes != planes * block.expansion):
                downsample = nn.Sequential(
                    _conv(make_layer, self.inplanes, planes * block.expansion, 1, stride, downsample_name),
                    nn.BatchNorm2d(planes * block.expansion))
            blocks.append(block(self.inplanes, planes, stride if index == 0 else 1, downsample, drop_path,
                                make_layer, conv_names))
            self.inplanes = planes * block.expansion
        return nn.Sequential(*blocks)

    def _classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups in depth order; the warehouses fall in the last group, with ``fc``."""
        return dict(stem=r'^conv1|bn1|maxpool', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = make_global_pool(global_pool)
        self.fc = self._like_model(self._classifier(num_classes))

    def _prune_levels_after(self, index: int) -> None:
        if index == 0:
            self.maxpool = nn.Identity()
        for stage in range(index + 1, 5):
            setattr(self, f'layer{stage}', nn.Sequential())

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def _levels(self) -> List[nn.Module]:
        return [nn.Sequential(self.maxpool, self.layer1), self.layer2, self.layer3, self.layer4]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_KW_RESNET_DEFAULTS = dict(sharing_range=('layer', 'conv'))
# The original release published checkpoints of the KW models, not of its plain baselines.
default_cfgs = generate_default_cfgs({
    f'{name}.in1k': pretrained_cfg('fc', 'conv1', released=name.startswith('kw'))
    for name in ('plain_resnet18', 'plain_resnet50', 'kw_resnet18', 'kw_resnet50')})


def _resnet(name: str, pretrained: bool, kwargs: Dict[str, Any], kw_defaults: Optional[Dict[str, Any]],
            block: Block, layers: Sequence[int]) -> ResNet:
    return build(ResNet, name, pretrained, kwargs, kw_defaults, block=block, layers=layers)


def plain_resnet18(pretrained: bool = False, **kwargs) -> ResNet:
    """The release's plain ResNet18 (released configs call it ``resnet18``)."""
    return _resnet('plain_resnet18', pretrained, kwargs, None, BasicBlock, (2, 2, 2, 2))


def plain_resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """The release's plain ResNet50 (released configs call it ``resnet50``)."""
    return _resnet('plain_resnet50', pretrained, kwargs, None, Bottleneck, (3, 4, 6, 3))


def kw_resnet18(pretrained: bool = False, **kwargs) -> ResNet:
    return _resnet('kw_resnet18', pretrained, kwargs, _KW_RESNET_DEFAULTS, BasicBlock, (2, 2, 2, 2))


def kw_resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    return _resnet('kw_resnet50', pretrained, kwargs, _KW_RESNET_DEFAULTS, Bottleneck, (3, 4, 6, 3))


ENTRYPOINTS = (plain_resnet18, plain_resnet50, kw_resnet18, kw_resnet50)
