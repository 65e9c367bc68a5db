"""Model zoo: importing this package registers every model with timm's registry.

Our names ``resnet18``, ``resnet50``, ``mobilenetv2_100``, ``mobilenetv2_050`` and ``convnext_tiny``
deliberately replace timm's own models of those names (the released configs use them), so
``timm.create_model('resnet18')`` builds ours after ``import models``.
"""
import warnings
from collections import defaultdict
from typing import Any, Mapping, Set

import timm
from timm.models import register_model
from torch import nn

from modules.kernel_warehouse import KWConvNd

from . import convnext, deit, mobilenetv2, resnet
from ._builder import KW_ARGS
from .convnext import ConvNeXt
from .mobilenetv2 import MobileNetV2
from .resnet import ResNet

MODEL_NAMES = tuple(fn.__name__ for module in (resnet, mobilenetv2, convnext, deit) for fn in module.ENTRYPOINTS)

with warnings.catch_warnings():
    # timm warns when a name it already has is registered again; that replacement is intended.
    warnings.filterwarnings('ignore', message=r'Overwriting .* in registry', category=UserWarning)
    for _module in (resnet, mobilenetv2, convnext, deit):
        for _entrypoint in _module.ENTRYPOINTS:
            register_model(_entrypoint)

# main.py's defaults for the regularisers a config may leave out. The original's main.py passes its
# defaults to every model, so a released config without "dropout" trains with classifier dropout 0
# even where the model built directly has its own (0.2 for MobileNetV2; KW-SPEC section 8).
CONFIG_DEFAULTS = {'drop_path': 0.0, 'dropout': 0.0}

# Config / main.py option -> model argument.
CONFIG_TO_MODEL_ARGS = {
    'nb_classes': 'num_classes', 'drop_path': 'drop_path_rate', 'dropout': 'dropout',
    'layer_scale_init_value': 'layer_scale_init_value', 'head_init_scale': 'head_init_scale',
    'input_size': 'img_size', 'patch_size': 'patch_size',  # used by the ViTs only
    **{name: name for name in KW_ARGS},
}


def create_model_from_config(config: Mapping[str, Any], **overrides) -> nn.Module:
    """Build the model a config (a released JSON or main.py's options) describes.

    Absent regularisers take main.py's defaults (``CONFIG_DEFAULTS``), as in the original; other
    options that are absent or None take the model's defaults. ``overrides`` are model arguments
    (e.g. ``num_classes=10``) that win over the config.
    """
    config = {**CONFIG_DEFAULTS, **config}
    kwargs = {arg: config[option] for option, arg in CONFIG_TO_MODEL_ARGS.items() if option in config}
    kwargs.update(overrides)
    return timm.create_model(config['model'], **kwargs)


def classifier_state_keys(model: nn.Module) -> Set[str]:
    """State-dict keys that belong to the classifier: its own keys and, for a KW classifier, the
    warehouses only it uses (both change with the number of classes)."""
    classifier = model.get_classifier()
    prefix = next(name for name, module in model.named_modules() if module is classifier)
    keys = {k for k in model.state_dict() if k.startswith(f'{prefix}.')}
    users = defaultdict(set)
    for name, module in model.named_modules():
        if isinstance(module, KWConvNd):
            users[module.warehouse_id].add(name.startswith(f'{prefix}.'))
    keys.update(f'warehouse_manager.weights.{idx}' for idx, in_classifier in users.items() if in_classifier == {True})
    return keys


__all__ = ['CONFIG_DEFAULTS', 'CONFIG_TO_MODEL_ARGS', 'MODEL_NAMES', 'classifier_state_keys', 'ConvNeXt', 'MobileNetV2', 'ResNet', 'create_model_from_config']
