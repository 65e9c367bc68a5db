"""Shared plumbing of the model entrypoints: argument checking and KW settings."""
import inspect
from typing import Any, Callable, Dict, Optional, Sequence

from torch import nn

from modules.kernel_warehouse import WarehouseManager, set_temperature, static_layer

# Arguments every entrypoint accepts (main.py passes all of them to every model, as the
# original release does). KW arguments are ignored by the plain models.
KW_ARGS = ('reduction', 'cell_num_ratio', 'cell_inplane_ratio', 'cell_outplane_ratio', 'sharing_range',
           'nonlocal_basis_ratio')
COMMON_ARGS = ('num_classes', 'drop_path_rate', 'dropout', 'layer_scale_init_value', 'head_init_scale',
               'img_size', 'patch_size')
# Injected by timm.create_model; we have no pretrained weights to resolve.
_TIMM_ARGS = ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir')

KW_DEFAULTS = dict(reduction=0.0625, cell_num_ratio=1, cell_inplane_ratio=1, cell_outplane_ratio=1,
                   nonlocal_basis_ratio=1)


class TemperatureMixin:
    """Gives a model ``net_update_temperature(t)``; a no-op for a model without KW layers."""

    def net_update_temperature(self, temperature: float) -> None:
        set_temperature(self, temperature)


def make_layer_factory(model: nn.Module, kw: Optional[Dict[str, Any]], **manager_kwargs) -> Callable[..., nn.Module]:
    """Install ``model.warehouse_manager`` when ``kw`` settings are given and return its ``reserve``;
    for a plain model return :func:`static_layer` (same signature, plain layers)."""
    if kw is None:
        return static_layer
    model.warehouse_manager = WarehouseManager(**kw, **manager_kwargs)
    return model.warehouse_manager.reserve


def finish_kw(model: nn.Module) -> None:
    """Create and allocate the warehouses once every layer is reserved (no-op for plain models)."""
    manager = getattr(model, 'warehouse_manager', None)
    if manager is not None:
        manager.store()
        manager.allocate(model)


def build(model_cls: type, model_name: str, pretrained: bool, kwargs: Dict[str, Any],
          kw_defaults: Optional[Dict[str, Any]] = None, kw_fixed: Optional[Dict[str, Any]] = None,
          extra_args: Sequence[str] = (), **variant) -> nn.Module:
    """Build ``model_cls(**variant, ...)`` from an entrypoint's keyword arguments.

    ``kw_defaults`` (None for a plain model) holds the model's default KW settings; the caller's
    KW arguments override them, ``kw_fixed`` overrides both, and the merged dict reaches the model
    as ``kw``. ``extra_args`` names the family's own arguments, accepted besides the common ones.
    """
    if pretrained:
        raise ValueError(f'{model_name} has no downloadable weights: build it with pretrained=False and load a '
                         f'checkpoint (main.py --resume / --finetune).')
    for name in _TIMM_ARGS:
        kwargs.pop(name, None)
    valid = set(KW_ARGS) | set(COMMON_ARGS) | set(extra_args)
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise TypeError(f'{model_name} got unknown argument(s) {unknown}; valid: {sorted(valid)}.')
    kw_args = {k: kwargs.pop(k) for k in KW_ARGS if k in kwargs}
    # Common arguments a family has no use for (e.g. layer scale for a ResNet) are dropped.
    accepted = inspect.signature(model_cls).parameters
    model_args = {k: v for k, v in kwargs.items() if v is not None and k in accepted}
    if kw_defaults is not None:
        kw = {**KW_DEFAULTS, **kw_defaults}
        kw.update({k: v for k, v in kw_args.items() if v is not None})
        kw.update(kw_fixed or {})
        model_args['kw'] = kw
    return model_cls(**variant, **model_args)
