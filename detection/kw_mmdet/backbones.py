"""Multi-scale mmdetection backbones made from the classification models of ``models/``.

A backbone builds the classification model with ``models.create_model`` and takes over its
submodules except the classifier head, so its parameter names are the classification
checkpoint's keys (``layer1.0.conv1.attention.fc1.weight``, ``warehouse_manager.weights.0``, ...)
and ImageNet checkpoints of ours or of the original release load with every backbone key matched.

Every backbone is a sequence of *units*, each a list of submodule paths run in order. Units
hold the stem (if the family has a separate one) and then one unit per output scale candidate;
``out_indices`` counts units after the stem and ``frozen_stages`` follows mmdetection's meaning
for the family (ResNet and MobileNetV2: 0 is the stem, ``k`` the stem and ``k`` units after it;
ConvNeXt: the first ``k`` units, each a downsampling layer and its stage).

Frozen stages and shared warehouses: a KW warehouse is a parameter of the whole backbone, shared
by the KW convs of neighbouring stages (in a KW ResNet, ``layer2.0.conv1`` and ``layer2.0``'s
downsample draw on ``layer1``'s warehouse). A frozen stage keeps its convs' attentions, its norms and
its plain convs fixed, but a warehouse stays trainable while any trainable KW conv draws on it;
it is frozen only when all of its convs are frozen. Freezing it with its first frozen user would
instead silently freeze the kernels of trainable layers.

The arguments that mmdetection's own backbones share are taken as they take them: ``with_cp``
(activation checkpointing, block by block), ``norm_cfg`` (``BN`` or ``SyncBN`` for the BatchNorm
families, ``LN`` for ConvNeXt; ``requires_grad=False`` freezes the norms' affine parameters),
``in_channels`` (timm's ``in_chans``) and ``init_cfg=dict(type='Pretrained', ...)`` with the options
and checkpoint schemes of mmengine (``pretrained.py``).

The KW temperature is 0 throughout (KW-SPEC section 3: detection fine-tuning uses ``t = 0``).
"""
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Type

import torch
from mmdet.registry import MODELS
from mmengine.logging import print_log
from mmengine.model import BaseModule
from timm.layers import LayerNorm2d
from timm.models import adapt_input_conv
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

import models
from kernelwarehouse.utils import (CheckpointError, UserError, describe_state_dict_mismatch, drop_module_keys,
                                   load_model_weights)
from models._builder import KW_ARGS
from models.mobilenetv2 import INVERTED_RESIDUAL_SETTING
from modules.kernel_warehouse import KWConvNd, set_temperature

from .pretrained import common_prefix, parse_init_cfg, pretrained_state_dict

Unit = Tuple[str, ...]


def run_modules(modules: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``modules`` applied in turn: one checkpointed segment of a forward pass."""
    for module in modules:
        x = module(x)
    return x


class ClassifierBackbone(BaseModule):
    """A classification model of ``models/`` without its head, returning multi-scale features.

    A family subclass names the model, the ``head_modules`` to drop, whether it ``has_stem``, the
    ``block_containers`` (stages whose children are blocks), the norm types it can take, and its
    :meth:`units`; it may add modules in :meth:`add_output_modules` and transform each output in
    :meth:`output`.

    Args:
        model_name: a model name as the configs give it (``kw_resnet50``, ``mobilenetv2_100``, ...).
        out_indices: units (counted after the stem) whose outputs are returned.
        frozen_stages: see the module docstring; -1 freezes nothing.
        norm_eval: keep every BatchNorm (those of the KW attentions included) in eval mode while
            training, as mmdetection's backbones do with small per-GPU batches.
        drop_path_rate: stochastic depth of the model.
        in_channels: channels of the input images (the model's ``in_chans``).
        with_cp: recompute the activations of each block in the backward pass instead of keeping
            them (``torch.utils.checkpoint``, training only): less memory for a second forward pass.
        norm_cfg: ``dict(type=..., requires_grad=...)``; the type is one of the family's
            ``norm_types`` (``SyncBN`` turns every BatchNorm into ``torch.nn.SyncBatchNorm``), and
            ``requires_grad=False`` freezes the weight and bias of every norm layer.
        init_cfg: None, or ``dict(type='Pretrained', checkpoint=..., prefix=None, map_location='cpu')``
            (mmengine's ``PretrainedInit`` options; see ``pretrained.py``). The classifier head is dropped
            and every other key of the classification model must fit.
        kw_settings: KernelWarehouse arguments of the model (``cell_num_ratio``, ``reduction``, ...).
    """
    head_modules: Tuple[str, ...] = ()
    has_stem: bool = True
    # Paths of the nn.Sequential stages whose children are blocks: with_cp recomputes them one block
    # at a time (every other module of a unit is a segment of its own, the stem one segment).
    block_containers: Tuple[str, ...] = ()
    # The norm_cfg types the family takes (the first is the default), the layers they mean, and why.
    norm_types: Tuple[str, ...] = ('BN', 'SyncBN')
    norm_layers: Tuple[Type[nn.Module], ...] = (_BatchNorm,)
    norm_note: str = 'the ImageNet model\'s BatchNorms, synchronised across processes or not'

    def __init__(self, model_name: str, out_indices: Sequence[int], frozen_stages: int = -1,
                 norm_eval: bool = True, drop_path_rate: float = 0., in_channels: int = 3, with_cp: bool = False,
                 norm_cfg: Optional[Dict[str, Any]] = None, init_cfg: Optional[Dict[str, Any]] = None,
                 **kw_settings):
        super().__init__(init_cfg=init_cfg)
        name = type(self).__name__
        self.pretrained_init = parse_init_cfg(name, init_cfg)
        unknown = sorted(set(kw_settings) - set(KW_ARGS))
        if unknown:
            raise UserError(f'{name} got unknown argument(s) {unknown}; its KW settings are {sorted(KW_ARGS)} '
                            f'(the other arguments: detection/README.md).')
        if kw_settings and not model_name.startswith('kw_'):
            raise UserError(f'{name} builds the plain {model_name}, which takes no KW settings '
                            f'({sorted(kw_settings)}); use the KW_ backbone or remove them.')
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise UserError(f'{name}: in_channels must be a positive whole number, got {in_channels!r}.')
        self.norm_cfg = self._check_norm_cfg(norm_cfg)
        model = models.create_model(model_name, drop_path_rate=drop_path_rate, in_chans=in_channels, **kw_settings)
        # The plain first conv(s) that timm adapts to another in_chans; empty when the stem is a KW conv.
        first_conv = model.pretrained_cfg.get('first_conv') or ()
        self.first_convs = (first_conv,) if isinstance(first_conv, str) else tuple(first_conv)
        for child_name, child in model.named_children():
            if child_name not in self.head_modules:
                self.add_module(child_name, child)
        self._units = self.units()
        num_outputs = len(self._units) - self._first_output
        if not out_indices or any(not 0 <= i < num_outputs for i in out_indices):
            raise UserError(f'{name}: out_indices {tuple(out_indices)} must be a non-empty list of numbers in '
                            f'[0, {num_outputs - 1}].')
        if not -1 <= frozen_stages <= num_outputs:
            raise UserError(f'{name}: frozen_stages {frozen_stages} must be in [-1, {num_outputs}].')
        self.out_indices = tuple(out_indices)
        self.norm_eval = norm_eval
        self.in_channels = in_channels
        self.with_cp = with_cp
        self.add_output_modules()
        self._frozen_units = self._units[:max(frozen_stages + self._first_output, 0)]
        set_temperature(self, 0.0)
        if self.norm_cfg['type'] == 'SyncBN':
            # Replaces every BatchNorm below this module in place (the 1-d ones of the KW attentions
            # too: SyncBatchNorm takes [N, C] input), keeping their parameters and statistics.
            nn.SyncBatchNorm.convert_sync_batchnorm(self)
        self._freeze()

    @property
    def _first_output(self) -> int:
        return 1 if self.has_stem else 0

    def units(self) -> List[Unit]:
        """Submodule paths of each unit, in forward order."""
        raise NotImplementedError

    def add_output_modules(self) -> None:
        """Add the modules that :meth:`output` needs beyond the classification model's."""

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Output ``index`` (counted after the stem) from its unit's result."""
        return x

    def new_modules(self) -> Tuple[str, ...]:
        """Submodules the classification model does not have (absent from its checkpoints)."""
        return ()

    def _check_norm_cfg(self, norm_cfg: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        name = type(self).__name__
        if norm_cfg is None:
            return dict(type=self.norm_types[0], requires_grad=True)
        types = ' or '.join(repr(t) for t in self.norm_types)
        if (not isinstance(norm_cfg, Mapping) or set(norm_cfg) - {'type', 'requires_grad'}
                or norm_cfg.get('type') not in self.norm_types
                or not isinstance(norm_cfg.get('requires_grad', True), bool)):
            raise UserError(f'{name}: norm_cfg must be dict(type={types}, requires_grad=True or False) '
                            f'({self.norm_note}), got {norm_cfg!r}.')
        return dict(type=norm_cfg['type'], requires_grad=norm_cfg.get('requires_grad', True))

    def _unit_modules(self, unit: Unit) -> List[nn.Module]:
        return [self.get_submodule(path) for path in unit]

    def _segments(self, index: int, unit: Unit) -> List[List[nn.Module]]:
        """The pieces of unit ``index`` that ``with_cp`` recomputes one at a time."""
        modules = self._unit_modules(unit)
        if index < self._first_output:
            return [modules]
        segments = []
        for path, module in zip(unit, modules):
            segments.extend([[block] for block in module] if path in self.block_containers else [[module]])
        return segments

    def _freeze(self) -> None:
        frozen: Set[nn.Module] = set()
        for unit in self._frozen_units:
            for module in self._unit_modules(unit):
                frozen.update(module.modules())
        if not self.norm_cfg['requires_grad']:
            frozen.update(m for m in self.modules() if isinstance(m, self.norm_layers))
        for module in frozen:
            for param in module.parameters(recurse=False):
                param.requires_grad = False
        manager = getattr(self, 'warehouse_manager', None)
        if manager is None:
            return
        users_frozen: Dict[int, Set[bool]] = {}
        for module in self.modules():
            if isinstance(module, KWConvNd):
                users_frozen.setdefault(module.warehouse_id, set()).add(module in frozen)
        for idx, warehouse in enumerate(manager.weights):
            warehouse.requires_grad = users_frozen[idx] != {True}

    def train(self, mode: bool = True) -> 'ClassifierBackbone':
        """Frozen units stay in eval mode; with ``norm_eval`` so does every BatchNorm."""
        super().train(mode)
        if mode:
            for unit in self._frozen_units:
                for module in self._unit_modules(unit):
                    module.eval()
            if self.norm_eval:
                for module in self.modules():
                    if isinstance(module, _BatchNorm):
                        module.eval()
        return self

    def init_weights(self) -> None:
        """Load ``init_cfg``'s checkpoint, strict for every key of the classification model;
        without one the model keeps the initialisation its constructor gave it."""
        if self.pretrained_init is not None:
            name, source, prefix = type(self).__name__, self.pretrained_init.checkpoint, self.pretrained_init.prefix
            state_dict = drop_module_keys(pretrained_state_dict(self.pretrained_init), self.head_modules)
            state_dict = self._adapt_input_channels(state_dict, source)
            new_keys = [k for k in self.state_dict() if k.split('.')[0] in self.new_modules()]
            self._explain_mismatch(state_dict, source, new_keys)
            load_model_weights(self, state_dict, source=source, ignore_missing=new_keys)
            under = f' under {prefix!r}' if prefix else ''
            print_log(f'{name}: loaded {len(state_dict)} tensors from {source}{under} (classifier head dropped; '
                      f'new: {", ".join(self.new_modules()) or "none"}).', logger='current')
        self._is_init = True

    def _adapt_input_channels(self, state_dict: Dict[str, torch.Tensor], source: str) -> Dict[str, torch.Tensor]:
        """As timm does for pretrained weights and another ``in_chans``: the weight of a plain first conv
        trained on 3 channels is summed over them for 1 channel, repeated and scaled by 3 / in_channels
        for more (timm's ``adapt_input_conv``)."""
        for conv in self.first_convs if self.in_channels != 3 else ():
            weight = state_dict.get(f'{conv}.weight')
            if weight is not None and weight.dim() == 4 and weight.shape[1] == 3:
                state_dict[f'{conv}.weight'] = adapt_input_conv(self.in_channels, weight)
                print_log(f'{type(self).__name__}: adapted {conv}.weight of {source} from 3 input channels to '
                          f'{self.in_channels}, as timm does.', logger='current')
        return state_dict

    def _explain_mismatch(self, state_dict: Dict[str, torch.Tensor], source: str, new_keys: List[str]) -> None:
        """Name the likely cause of a mismatch where it is not another config: the weights nested
        under a prefix (a detector's checkpoint), or a KW stem trained on another number of channels."""
        if describe_state_dict_mismatch(self, state_dict, new_keys) is None:
            return
        expected = self.state_dict()
        nested = common_prefix(state_dict, expected) if not self.pretrained_init.prefix else None
        if nested:
            raise CheckpointError(f'{source} holds these weights under {nested!r} (the checkpoint of a detector?); '
                                  f'add prefix={nested!r} to init_cfg.')
        stem = next((name for name, module in self.named_modules() if isinstance(module, KWConvNd)), None)
        if self.in_channels != 3 and not self.first_convs and stem is not None:
            if any(k in state_dict and state_dict[k].shape != v.shape for k, v in expected.items()
                   if k.startswith(f'{stem}.')):
                raise CheckpointError(
                    f'{source} was trained on another number of input channels than in_channels={self.in_channels}, '
                    f'and the stem of {type(self).__name__} is a KW conv ({stem}), whose attention and warehouse '
                    f'cells cannot be adapted as timm adapts a plain first conv; use in_channels=3 or no init_cfg.')

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outs = []
        last_unit = max(self.out_indices) + self._first_output  # later units feed no output
        # Recomputation only pays off where a backward pass follows, as in mmdetection's backbones.
        recompute = self.with_cp and self.training and torch.is_grad_enabled()
        for index, unit in enumerate(self._units[:last_unit + 1]):
            for segment in self._segments(index, unit):
                x = checkpoint(run_modules, segment, x, use_reentrant=False) if recompute else run_modules(segment, x)
            if index - self._first_output in self.out_indices:
                outs.append(self.output(index - self._first_output, x))
        return tuple(outs)


class ResNetBackbone(ClassifierBackbone):
    """ResNet-18/50: the stem, then ``layer1``-``layer4`` (ResNet50: 256/512/1024/2048 channels)."""
    head_modules = ('global_pool', 'dropout', 'fc')
    block_containers = ('layer1', 'layer2', 'layer3', 'layer4')
    kw = False

    def __init__(self, depth: int = 50, out_indices: Sequence[int] = (0, 1, 2, 3), **kwargs):
        if depth not in (18, 50):
            raise UserError(f'{type(self).__name__}: depth must be 18 or 50, got {depth}.')
        super().__init__(f'{"kw_" if self.kw else ""}resnet{depth}', out_indices, **kwargs)

    def units(self) -> List[Unit]:
        return [('conv1', 'bn1', 'relu', 'maxpool'), ('layer1',), ('layer2',), ('layer3',), ('layer4',)]


class MobileNetV2Backbone(ClassifierBackbone):
    """MobileNetV2 (width 1.0 or 0.5) counted as mmdetection's MobileNetV2: the stem, seven rows of
    inverted residual blocks and the final 1x1 conv. The default ``out_indices`` (1, 2, 4, 7) are
    ``features`` 3, 6, 13 and 18 (24/32/96/1280 channels at width 1.0)."""
    head_modules = ('global_pool', 'head_drop', 'classifier')
    kw = False

    def __init__(self, widen_factor: float = 1.0, out_indices: Sequence[int] = (1, 2, 4, 7), **kwargs):
        names = {1.0: '100', 0.5: '050'}
        if widen_factor not in names:
            raise UserError(f'{type(self).__name__}: widen_factor must be 1.0 or 0.5, got {widen_factor}.')
        super().__init__(f'{"kw_" if self.kw else ""}mobilenetv2_{names[widen_factor]}', out_indices, **kwargs)

    def units(self) -> List[Unit]:
        units, first = [('features.0',)], 1
        for _, _, num_blocks, _ in INVERTED_RESIDUAL_SETTING:
            units.append(tuple(f'features.{i}' for i in range(first, first + num_blocks)))
            first += num_blocks
        units.append((f'features.{first}',))
        return units


class ConvNeXtBackbone(ClassifierBackbone):
    """ConvNeXt-T: four units (a downsampling layer and its stage), each output normalised by its
    own LayerNorm ``norm{i}`` (96/192/384/768 channels). No separate stem: ``frozen_stages=k``
    freezes the first ``k`` units, as in mmpretrain's ConvNeXt."""
    head_modules = ('global_pool', 'norm', 'head_drop', 'head')
    has_stem = False
    block_containers = ('stages.0', 'stages.1', 'stages.2', 'stages.3')
    # LayerNorm2d and the KW attentions' LayerNorms are nn.LayerNorms; ConvNeXt has no BatchNorm.
    norm_types = ('LN', 'LN2d')
    norm_layers = (nn.LayerNorm,)
    norm_note = 'ConvNeXt normalises with LayerNorm, which has no BatchNorm or SyncBN form'
    kw = False

    def __init__(self, arch: str = 'tiny', out_indices: Sequence[int] = (0, 1, 2, 3), **kwargs):
        if arch != 'tiny':
            raise UserError(f"{type(self).__name__}: arch must be 'tiny' (the released ConvNeXt), got {arch!r}.")
        super().__init__(f'{"kw_" if self.kw else ""}convnext_{arch}', out_indices, **kwargs)

    def add_output_modules(self) -> None:
        for i in self.out_indices:
            # Every block normalises its input with a LayerNorm of the stage's width.
            width = self.stages[i][0].norm.weight.shape[0]
            self.add_module(f'norm{i}', LayerNorm2d(width, eps=1e-6))

    def units(self) -> List[Unit]:
        return [(f'downsample_layers.{i}', f'stages.{i}') for i in range(len(self.stages))]

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, f'norm{index}')(x)

    def new_modules(self) -> Tuple[str, ...]:
        return tuple(f'norm{i}' for i in self.out_indices)


# The registered names: KW_* as in the original release, Plain_* for the static baselines.
@MODELS.register_module()
class KW_ResNet(ResNetBackbone):  # noqa: N801
    kw = True


@MODELS.register_module()
class Plain_ResNet(ResNetBackbone):  # noqa: N801
    pass


@MODELS.register_module()
class KW_MobileNetV2(MobileNetV2Backbone):  # noqa: N801
    kw = True


@MODELS.register_module()
class Plain_MobileNetV2(MobileNetV2Backbone):  # noqa: N801
    pass


@MODELS.register_module()
class KW_ConvNeXt(ConvNeXtBackbone):  # noqa: N801
    kw = True


@MODELS.register_module()
class Plain_ConvNeXt(ConvNeXtBackbone):  # noqa: N801
    pass
