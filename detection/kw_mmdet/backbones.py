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

The KW temperature is 0 throughout (KW-SPEC section 3: detection fine-tuning uses ``t = 0``).
"""
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from mmdet.registry import MODELS
from mmengine.logging import print_log
from mmengine.model import BaseModule
from timm.layers import LayerNorm2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import models
from models._builder import KW_ARGS
from models.mobilenetv2 import INVERTED_RESIDUAL_SETTING
from modules.kernel_warehouse import KWConvNd, set_temperature
from utils import UserError, drop_module_keys, extract_state_dict, load_checkpoint_file, load_model_weights

Unit = Tuple[str, ...]


class ClassifierBackbone(BaseModule):
    """A classification model of ``models/`` without its head, returning multi-scale features.

    A family subclass names the model, the ``head_modules`` to drop, whether it ``has_stem``, and
    its :meth:`units`; it may transform each output in :meth:`output`.

    Args:
        model_name: a model name as the configs give it (``kw_resnet50``, ``mobilenetv2_100``, ...).
        out_indices: units (counted after the stem) whose outputs are returned.
        frozen_stages: see the module docstring; -1 freezes nothing.
        norm_eval: keep every BatchNorm (those of the KW attentions included) in eval mode while
            training, as mmdetection's backbones do with small per-GPU batches.
        drop_path_rate: stochastic depth of the model.
        init_cfg: None, or ``dict(type='Pretrained', checkpoint=PATH)`` with one of our
            classification checkpoints or one of the original release (weights under ``model``,
            ``state_dict`` or bare; the classifier head is dropped).
        kw_settings: KernelWarehouse arguments of the model (``cell_num_ratio``, ``reduction``, ...).
    """
    head_modules: Tuple[str, ...] = ()
    has_stem: bool = True

    def __init__(self, model_name: str, out_indices: Sequence[int], frozen_stages: int = -1,
                 norm_eval: bool = True, drop_path_rate: float = 0., init_cfg: Optional[Dict[str, Any]] = None,
                 **kw_settings):
        super().__init__(init_cfg=init_cfg)
        name = type(self).__name__
        self.checkpoint = _pretrained_checkpoint(name, init_cfg)
        unknown = sorted(set(kw_settings) - set(KW_ARGS))
        if unknown:
            raise UserError(f'{name} got unknown argument(s) {unknown}; its KW settings are {sorted(KW_ARGS)} '
                            f'(the other arguments: detection/README.md).')
        if kw_settings and not model_name.startswith('kw_'):
            raise UserError(f'{name} builds the plain {model_name}, which takes no KW settings '
                            f'({sorted(kw_settings)}); use the KW_ backbone or remove them.')
        model = models.create_model(model_name, drop_path_rate=drop_path_rate, **kw_settings)
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
        self._frozen_units = self._units[:max(frozen_stages + self._first_output, 0)]
        set_temperature(self, 0.0)
        self._freeze()

    @property
    def _first_output(self) -> int:
        return 1 if self.has_stem else 0

    def units(self) -> List[Unit]:
        """Submodule paths of each unit, in forward order."""
        raise NotImplementedError

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Output ``index`` (counted after the stem) from its unit's result."""
        return x

    def new_modules(self) -> Tuple[str, ...]:
        """Submodules the classification model does not have (absent from its checkpoints)."""
        return ()

    def _unit_modules(self, unit: Unit) -> List[nn.Module]:
        return [self.get_submodule(path) for path in unit]

    def _freeze(self) -> None:
        frozen: Set[nn.Module] = set()
        for unit in self._frozen_units:
            for module in self._unit_modules(unit):
                frozen.update(module.modules())
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
        if self.checkpoint is not None:
            state_dict = extract_state_dict(load_checkpoint_file(self.checkpoint), source=self.checkpoint)
            state_dict = drop_module_keys(state_dict, self.head_modules)
            new_keys = [k for k in self.state_dict() if k.split('.')[0] in self.new_modules()]
            load_model_weights(self, state_dict, source=self.checkpoint, ignore_missing=new_keys)
            print_log(f'{type(self).__name__}: loaded {len(state_dict)} tensors from {self.checkpoint} (classifier '
                      f'head dropped; new: {", ".join(self.new_modules()) or "none"}).', logger='current')
        self._is_init = True

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outs = []
        last_unit = max(self.out_indices) + self._first_output  # later units feed no output
        for index, unit in enumerate(self._units[:last_unit + 1]):
            for module in self._unit_modules(unit):
                x = module(x)
            if index - self._first_output in self.out_indices:
                outs.append(self.output(index - self._first_output, x))
        return tuple(outs)


def _pretrained_checkpoint(backbone: str, init_cfg: Optional[Dict[str, Any]]) -> Optional[str]:
    """The path of ``init_cfg=dict(type='Pretrained', checkpoint=PATH)``; None without init_cfg."""
    if init_cfg is None:
        return None
    if not isinstance(init_cfg, dict) or init_cfg.get('type') != 'Pretrained' or not init_cfg.get('checkpoint'):
        raise UserError(f"{backbone}: init_cfg must be None or dict(type='Pretrained', checkpoint=PATH), got "
                        f"{init_cfg!r} (the models initialise themselves).")
    return str(init_cfg['checkpoint'])


class ResNetBackbone(ClassifierBackbone):
    """ResNet-18/50: the stem, then ``layer1``-``layer4`` (ResNet50: 256/512/1024/2048 channels)."""
    head_modules = ('global_pool', 'dropout', 'fc')
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
    kw = False

    def __init__(self, arch: str = 'tiny', out_indices: Sequence[int] = (0, 1, 2, 3), **kwargs):
        if arch != 'tiny':
            raise UserError(f"{type(self).__name__}: arch must be 'tiny' (the released ConvNeXt), got {arch!r}.")
        super().__init__(f'{"kw_" if self.kw else ""}convnext_{arch}', out_indices, **kwargs)
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
