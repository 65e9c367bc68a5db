"""MobileNetV2 (width 1.0 / 0.5), plain and KernelWarehouse, in one implementation (KW-SPEC section 5).

Keys follow torchvision. In the KW variants every conv of the stem, the inverted-residual blocks and
the final 1x1 conv is dynamic; the seven block rows map to KW stages ``KW_STAGES`` and the first
block of a row that starts a new stage is handed over to the previous stage's warehouses.
"""
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from timm.layers import make_divisible
from timm.models import generate_default_cfgs
from torch import nn

from ._builder import ConvNetContract, build, finish_kw, make_global_pool, make_layer_factory, pretrained_cfg
from ._kw import static_layer

# t (expansion), c (channels), n (blocks), s (stride of the first block)
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                             (6, 160, 3, 2), (6, 320, 1, 1))
KW_STAGES = (1, 2, 3, 4, 5, 6, 6)


def _conv(make_layer: Callable[..., nn.Module], in_planes: int, out_planes: int, kernel_size: int = 1,
          stride: int = 1, groups: int = 1, warehouse_name: Optional[str] = None) -> nn.Module:
    return make_layer(in_planes, out_planes, kernel_size, stride=stride, padding=(kernel_size - 1) // 2,
                      groups=groups, bias=False, warehouse_name=warehouse_name or '',
                      enabled=warehouse_name is not None)


class ConvBNReLU(nn.Sequential):
    def __init__(self, make_layer: Callable[..., nn.Module], in_planes: int, out_planes: int, kernel_size: int = 3,
                 stride: int = 1, groups: int = 1, warehouse_name: Optional[str] = None):
        super().__init__(
            _conv(make_layer, in_planes, out_planes, kernel_size, stride, groups, warehouse_name),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """Expansion 1x1 (``pwconv0``), depthwise 3x3 (``dwconv0``), projection 1x1 (``pwconv1``).

    ``warehouse_prefix`` (``stage{s}_layer{l}_``) names the block's warehouses; the 1x1 convs are
    plain when ``kw_pointwise`` is false.
    """

    def __init__(self, make_layer: Callable[..., nn.Module], inp: int, oup: int, stride: int, expand_ratio: int,
                 warehouse_prefix: str, kw_pointwise: bool = True):
        super().__init__()
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        pointwise = (lambda idx: f'{warehouse_prefix}pwconv{idx}') if kw_pointwise else (lambda idx: None)
        layers = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(make_layer, inp, hidden_dim, kernel_size=1, warehouse_name=pointwise(0)))
        layers += [
            ConvBNReLU(make_layer, hidden_dim, hidden_dim, stride=stride, groups=hidden_dim,
                       warehouse_name=f'{warehouse_prefix}dwconv0'),
            _conv(make_layer, hidden_dim, oup, warehouse_name=pointwise(1)),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(ConvNetContract, nn.Module):
    """MobileNetV2 with optional KernelWarehouse convs.

    Args:
        width_mult: channel multiplier (1.0 or 0.5 for the released models).
        num_classes: classifier outputs (0: none, the model returns pooled features).
        in_chans: input channels.
        dropout: dropout before the classifier.
        global_pool: timm's pooling type ('' keeps the feature map).
        kw: ``WarehouseManager`` settings, or ``None`` for a plain model.
        plain_pointwise_stages: KW stages whose blocks keep plain 1x1 convs (the 1/2x variants).
        kw_classifier: make the classifier a KW linear layer (warehouse ``classifier``, the last one).
        classifier_with_dropout: hold the classifier as ``Sequential(Dropout, Linear)`` (keys
            ``classifier.1.*``, torchvision's layout) rather than as a bare Linear (``classifier.*``).

    The feature levels are timm's for MobileNetV2: the block outputs at strides 2, 4, 8, 16 and 32
    (16/24/32/96/320 channels at width 1.0); ``forward_features`` adds the final 1x1 conv.
    """
    stem_is_level = False
    # the rows of INVERTED_RESIDUAL_SETTING whose last block ends a feature level
    LEVEL_ENDS = (0, 1, 2, 4, 6)

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.2,
                 global_pool: str = 'avg', kw: Optional[Dict[str, Any]] = None,
                 plain_pointwise_stages: Sequence[int] = (), kw_classifier: bool = False,
                 classifier_with_dropout: bool = True, round_nearest: int = 8):
        super().__init__()
        if kw is not None and kw_classifier and num_classes == 0:
            kw = _without_classifier_warehouse(kw)
        kw_classifier = kw_classifier and num_classes > 0
        make_layer = make_layer_factory(self, kw)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.kw_classifier = kw_classifier
        input_channel = make_divisible(32 * width_mult, round_nearest)
        self.num_features = self.head_hidden_size = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features = [ConvBNReLU(make_layer, in_chans, input_channel, stride=2, warehouse_name='stage0_conv0')]
        self.feature_info = []
        self._level_bounds = [1]  # features[bounds[i]:bounds[i + 1]] is level i
        layers_in_stage = dict.fromkeys(range(max(KW_STAGES) + 1), 0)
        reduction = 2
        for row, (t, c, n, s) in enumerate(INVERTED_RESIDUAL_SETTING):
            output_channel = make_divisible(c * width_mult, round_nearest)
            reduction *= s
            for i in range(n):
                stage = KW_STAGES[row]
                if i == 0 and row > 0 and KW_STAGES[row - 1] != stage:
                    stage = KW_STAGES[row - 1]  # hand-over to the previous stage
                prefix = f'stage{stage}_layer{layers_in_stage[stage]}_'
                layers_in_stage[stage] += 1
                features.append(InvertedResidual(make_layer, input_channel, output_channel, s if i == 0 else 1, t,
                                                 prefix, kw_pointwise=stage not in plain_pointwise_stages))
                input_channel = output_channel
            if row in self.LEVEL_ENDS:
                self._level_bounds.append(len(features))
                self.feature_info.append(dict(num_chs=output_channel, reduction=reduction,
                                              module=f'features.{len(features) - 1}'))
        last_stage = KW_STAGES[-1]
        features.append(ConvBNReLU(make_layer, input_channel, self.num_features, kernel_size=1,
                                   warehouse_name=f'stage{last_stage}_layer{layers_in_stage[last_stage]}_pwconv1'))
        self.features = nn.Sequential(*features)

        self.global_pool = make_global_pool(global_pool)
        self.classifier_with_dropout = classifier_with_dropout
        classifier = self._classifier_layer(num_classes, make_layer)
        if classifier_with_dropout:
            self.head_drop = nn.Identity()
            self.classifier = nn.Sequential(nn.Dropout(dropout), classifier)
        else:
            self.head_drop = nn.Dropout(dropout)
            self.classifier = classifier
        for m in self.modules():
            _init_weights(m)
        finish_kw(self)

    def _classifier_layer(self, num_classes: int, make_layer: Callable[..., nn.Module]) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        return make_layer(self.num_features, num_classes, bias=True, warehouse_name='classifier',
                          enabled=self.kw_classifier, layer_type='linear')

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups in depth order; the warehouses fall in the last group, with the classifier."""
        return dict(stem=r'^features\.0\.', blocks=r'^features\.(\d+)')

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier for ``num_classes`` (0: none). A KW classifier gets a new warehouse
        sized for it (``WarehouseManager.replace_layer``)."""
        if global_pool is not None:
            self.global_pool = make_global_pool(global_pool)
        old = self.classifier[1] if self.classifier_with_dropout else self.classifier
        if self.kw_classifier:
            new = self.warehouse_manager.replace_layer(old, num_classes)
        else:
            new = self._classifier_layer(num_classes, static_layer)
            new.apply(_init_weights)
        new = self._like_model(new)
        if self.classifier_with_dropout:
            self.classifier[1] = new
        else:
            self.classifier = new
        self.num_classes = num_classes
        self.kw_classifier = self.kw_classifier and num_classes > 0

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.features[0](x)

    def _levels(self) -> List[nn.Module]:
        bounds = self._level_bounds
        return [self.features[start:end] for start, end in zip(bounds, bounds[1:])]

    def _final_features(self, x: torch.Tensor) -> torch.Tensor:
        final_conv = self._level_bounds[-1]
        return self.features[final_conv](x) if len(self.features) > final_conv else x

    def _prune_levels_after(self, index: int) -> None:
        self._level_bounds = self._level_bounds[:index + 2]

    def _prune_final_features(self, prune: bool) -> None:
        if prune:  # the final 1x1 conv, and any level after the last one kept
            self.features = self.features[:self._level_bounds[-1]]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out')
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, 0.01)
        nn.init.zeros_(m.bias)


def _without_classifier_warehouse(kw: Dict[str, Any]) -> Dict[str, Any]:
    """KW settings given one value per warehouse, less the classifier's (the last)."""
    return {key: value[:-1] if isinstance(value, (list, tuple)) and len(value) > 1 and key != 'sharing_range'
            else value for key, value in kw.items()}


_KW_DEFAULTS = dict(sharing_range=('layer', 'pwconv'))
_KW_VARIANT = dict(dropout=0.0, kw_classifier=False, classifier_with_dropout=False)
# The 1/2x variants fix their own settings, one value per warehouse: stem, the depthwise convs of
# stages 1-5, then stage 6's expansion, depthwise and projection convs, and the classifier.
_KW1D2X_FIXED = dict(
    reduction=0.03125,
    sharing_range=('layer',),
    cell_num_ratio=(1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.5),
    cell_inplane_ratio=(1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.025),
    cell_outplane_ratio=(1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 1),
)
_KW1D2X_VARIANT = dict(dropout=0.1, kw_classifier=True, classifier_with_dropout=True,
                       plain_pointwise_stages=(1, 2, 3, 4, 5))


# The original release published checkpoints of the KW models, not of its plain baselines.
default_cfgs = generate_default_cfgs({
    **{f'plain_mobilenetv2_{w}.in1k': pretrained_cfg('classifier.1', 'features.0.0', released=False)
       for w in ('100', '050')},
    **{f'kw_mobilenetv2_{w}.in1k': pretrained_cfg('classifier', (), released=True) for w in ('100', '050')},
    **{f'kw1d2x_mobilenetv2_{w}.in1k': pretrained_cfg((), (), released=True) for w in ('100', '050')},
})


def _entry(name: str, width_mult: float, pretrained: bool, kwargs: dict, kw_defaults=None, kw_fixed=None,
           dropout: Optional[float] = None, **variant) -> MobileNetV2:
    if kwargs.get('dropout') is None and kwargs.get('drop_rate') is None and dropout is not None:
        kwargs['dropout'] = dropout  # the variant's default
    return build(MobileNetV2, name, pretrained, kwargs, kw_defaults, kw_fixed, width_mult=width_mult, **variant)


def plain_mobilenetv2_100(pretrained: bool = False, **kwargs) -> MobileNetV2:
    """The release's plain MobileNetV2 1.0 (released configs call it ``mobilenetv2_100``)."""
    return _entry('plain_mobilenetv2_100', 1.0, pretrained, kwargs)


def plain_mobilenetv2_050(pretrained: bool = False, **kwargs) -> MobileNetV2:
    """The release's plain MobileNetV2 0.5 (released configs call it ``mobilenetv2_050``)."""
    return _entry('plain_mobilenetv2_050', 0.5, pretrained, kwargs)


def kw_mobilenetv2_100(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _entry('kw_mobilenetv2_100', 1.0, pretrained, kwargs, _KW_DEFAULTS, **_KW_VARIANT)


def kw_mobilenetv2_050(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _entry('kw_mobilenetv2_050', 0.5, pretrained, kwargs, _KW_DEFAULTS, **_KW_VARIANT)


def kw1d2x_mobilenetv2_100(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _entry('kw1d2x_mobilenetv2_100', 1.0, pretrained, kwargs, _KW_DEFAULTS, _KW1D2X_FIXED, **_KW1D2X_VARIANT)


def kw1d2x_mobilenetv2_050(pretrained: bool = False, **kwargs) -> MobileNetV2:
    return _entry('kw1d2x_mobilenetv2_050', 0.5, pretrained, kwargs, _KW_DEFAULTS, _KW1D2X_FIXED, **_KW1D2X_VARIANT)


ENTRYPOINTS = (plain_mobilenetv2_100, plain_mobilenetv2_050, kw_mobilenetv2_100, kw_mobilenetv2_050,
               kw1d2x_mobilenetv2_100, kw1d2x_mobilenetv2_050)
