"""Model zoo: importing this package registers every model with timm's registry.

timm's own names are left alone: the release's plain baselines, which its configs call
``resnet18``, ``resnet50``, ``mobilenetv2_100``, ``mobilenetv2_050`` and ``convnext_tiny`` as timm
does, are registered as ``plain_<name>``. ``create_model`` and ``create_model_from_config`` (and so
``main.py``) read the configs' names as the release's models (``RELEASED_NAMES``).
"""
from typing import Any, Callable, Mapping, Optional

import timm
from timm.models import register_model
from torch import nn

from . import convnext, deit, mobilenetv2, resnet
from ._builder import KW_ARGS
from ._kw import ConversionPlan, convert, plan
from ._checkpoint import checkpoint_filter_fn, classifier_state_keys
from .convnext import ConvNeXt
from .mobilenetv2 import MobileNetV2
from .resnet import ResNet

REGISTERED_NAMES = tuple(fn.__name__ for module in (resnet, mobilenetv2, convnext, deit) for fn in module.ENTRYPOINTS)
# A released config's model name -> the name we register it under
RELEASED_NAMES = {name.replace('plain_', '', 1): name for name in REGISTERED_NAMES if name.startswith('plain_')}
# Every name main.py and the configs accept, family by family
MODEL_NAMES = tuple(name.replace('plain_', '', 1) for name in REGISTERED_NAMES)

for _module in (resnet, mobilenetv2, convnext, deit):
    for _entrypoint in _module.ENTRYPOINTS:
        if _entrypoint.__name__ not in timm.list_models(_entrypoint.__name__):
            register_model(_entrypoint)


def resolve_model_name(name: str) -> str:
    """The registered name of a model as the configs call it (``resnet18`` -> ``plain_resnet18``)."""
    return RELEASED_NAMES.get(name, name)


def create_model(name: str, **kwargs) -> nn.Module:
    """``timm.create_model`` that reads a released config's model name as the release's model."""
    return timm.create_model(resolve_model_name(name), **kwargs)


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


def create_model_from_config(config: Mapping[str, Any],
                             on_conversion: Optional[Callable[[ConversionPlan], None]] = None,
                             **overrides) -> nn.Module:
    """Build the model a config (a released JSON or main.py's options) describes.

    Absent regularisers take main.py's defaults (``CONFIG_DEFAULTS``), as in the original; other
    options that are absent or None take the model's defaults. ``overrides`` are model arguments
    (e.g. ``num_classes=10``) that win over the config. With ``"kw_convert": true`` the model is
    any timm model (or one of our plain models) turned into a KW model by ``convert`` without a
    rule, with the config's KW settings; ``on_conversion`` then receives its plan (main.py prints it).
    """
    config = {**CONFIG_DEFAULTS, **config}
    if config.get('kw_convert'):
        return _create_converted(config, on_conversion, **overrides)
    kwargs = {arg: config[option] for option, arg in CONFIG_TO_MODEL_ARGS.items() if option in config}
    kwargs.update(overrides)
    return create_model(config['model'], **kwargs)


def _create_converted(config: Mapping[str, Any], on_conversion: Optional[Callable[[ConversionPlan], None]],
                      **overrides) -> nn.Module:
    name = resolve_model_name(config['model'])
    if name in REGISTERED_NAMES and name.startswith('kw'):
        raise ValueError(f'{config["model"]} is a KW model already; kw_convert turns a plain model into one: drop '
                         f'kw_convert, or name a plain model.')
    # timm's own argument names: every timm model takes num_classes and drop_rate; drop_path_rate is
    # passed only when set, as some models (VGG, DenseNet) have no stochastic depth.
    kwargs = {'num_classes': config.get('nb_classes'), 'drop_rate': config['dropout'],
              'drop_path_rate': config['drop_path'] or None, **overrides}
    model = create_model(name, **{arg: value for arg, value in kwargs.items() if value is not None})
    kw_settings = {k: config[k] for k in KW_ARGS if config.get(k) is not None}
    conversion = plan(model, **kw_settings)
    if on_conversion is not None:
        on_conversion(conversion)
    return convert(model, **kw_settings)


__all__ = ['CONFIG_DEFAULTS', 'CONFIG_TO_MODEL_ARGS', 'MODEL_NAMES', 'REGISTERED_NAMES', 'RELEASED_NAMES',
           'ConversionPlan', 'ConvNeXt', 'MobileNetV2', 'ResNet', 'checkpoint_filter_fn', 'classifier_state_keys',
           'create_model', 'create_model_from_config', 'resolve_model_name']
