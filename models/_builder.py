"""Shared plumbing of the model entrypoints: timm's builder, argument checking, KW settings, and the
pieces of timm's model contract that every family implements alike."""
import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, checkpoint_seq
from timm.models._features import feature_take_indices
from torch import nn

from ._checkpoint import checkpoint_filter_fn
from ._kw import KWConvNd, WarehouseManager, set_temperature, static_layer

# Arguments every entrypoint accepts (main.py passes all of them to every model, as the
# original release does). KW arguments are ignored by the plain models.
KW_ARGS = ('reduction', 'cell_num_ratio', 'cell_inplane_ratio', 'cell_outplane_ratio', 'sharing_range',
           'nonlocal_basis_ratio')
COMMON_ARGS = ('num_classes', 'drop_path_rate', 'dropout', 'layer_scale_init_value', 'head_init_scale',
               'img_size', 'patch_size', 'in_chans', 'global_pool')
# Handled by timm's builder (pretrained weights, feature extraction) before the model sees them.
TIMM_BUILDER_ARGS = ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir', 'features_only', 'out_indices',
                     'feature_cls', 'pretrained_strict')

KW_DEFAULTS = dict(reduction=0.0625, cell_num_ratio=1, cell_inplane_ratio=1, cell_outplane_ratio=1,
                   nonlocal_basis_ratio=1)

PAPER = dict(paper_ids='arXiv:2308.08361',
             paper_name='KernelWarehouse: Rethinking the Design of Dynamic Convolution (ICML 2024)',
             origin_url='https://github.com/OSVAI/KernelWarehouse')
# Global poolings that keep the number of features (timm's names; '' keeps the feature map).
POOL_TYPES = ('avg', 'max', 'avgmax', '')


def pretrained_cfg(classifier: Union[str, Tuple[str, ...]], first_conv: Union[str, Tuple[str, ...]], released: bool,
                   **overrides) -> Dict[str, Any]:
    """A model's ``pretrained_cfg``: ImageNet-1k at 224 px, the evaluation transform of the original
    release (bicubic resize to 256 px, centre crop 224), and the paper. ``released`` notes where the
    original release published a checkpoint, which loads with timm's ``pretrained_cfg_overlay=dict(file=...)``.

    ``classifier`` and ``first_conv`` name the plain layers whose ``.weight`` timm adapts to another
    number of classes or input channels; a KW layer has no weight of its own and is left out (``()``).
    """
    notes = (('The original release published ImageNet-1k weights of this model (see origin_url); load the '
              'file with pretrained=True, pretrained_cfg_overlay=dict(file=path).',) if released else ())
    cfg = dict(url='', num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
               crop_mode='center', interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
               first_conv=first_conv, classifier=classifier, license='apache-2.0', notes=notes, **PAPER)
    cfg.update(overrides)
    return cfg


class TemperatureMixin:
    """Gives a model ``net_update_temperature(t)``; a no-op for a model without KW layers."""

    def net_update_temperature(self, temperature: float) -> None:
        set_temperature(self, temperature)


class ConvNetContract(TemperatureMixin):
    """timm's model contract for the CNN families, given a few family hooks.

    A family provides ``feature_info`` (one entry per feature level, timm's format),
    ``_stem(x)`` and ``_levels()`` (the ``nn.Sequential`` after the stem, one per feature level after
    the first when the stem is a level, see ``stem_is_level``), ``_prune_levels_after``,
    ``forward_head`` and ``reset_classifier``, and may add ``_final_features`` (what
    ``forward_features`` runs after the last level) with ``_prune_final_features``.
    """
    grad_checkpointing = False
    stem_is_level = True  # the stem's output is feature level 0

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each level's activations in the backward pass (timm's ``checkpoint_seq``)."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        raise NotImplementedError

    def _run_level(self, level: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(level, x)
        return level(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem(x)
        for level in self._levels():
            x = self._run_level(level, x)
        return self._final_features(x)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The feature maps of ``feature_info``'s levels (timm's ``forward_intermediates``).

        Args:
            indices: the levels to return (all by default; an int takes the last n).
            norm: unused (no family normalises its intermediate features).
            stop_early: stop after the last level asked for.
            output_fmt: 'NCHW' only.
            intermediates_only: return only the intermediates, not the final features too.
        """
        assert output_fmt == 'NCHW', 'Output format must be NCHW.'
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        intermediates = []
        x = self._stem(x)
        first = 0
        if self.stem_is_level:
            if 0 in take_indices:
                intermediates.append(x)
            first = 1
        levels = self._levels()
        if stop_early:
            levels = levels[:max_index + 1 - first]
        for index, level in enumerate(levels, start=first):
            x = self._run_level(level, x)
            if index in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return (self._final_features(x) if len(levels) == len(self._levels()) else x), intermediates

    def _final_features(self, x: torch.Tensor) -> torch.Tensor:
        """What ``forward_features`` adds after the last level (nothing by default)."""
        return x

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Keep the model up to the last level of ``indices`` (timm's ``FeatureGetterNet``): later
        levels go, and with ``prune_head`` the classifier and pooling. Warehouses that only removed
        layers used are frozen (their indices are state-dict keys, so they stay)."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        if max_index < len(self.feature_info) - 1:
            self._prune_levels_after(max_index)
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        self._prune_final_features(prune_norm or max_index < len(self.feature_info) - 1)
        if prune_head:
            self.reset_classifier(0, '')
        freeze_unused_warehouses(self)
        return take_indices

    def _prune_levels_after(self, index: int) -> None:
        """Remove the levels after ``index``."""
        raise NotImplementedError

    def _prune_final_features(self, prune: bool) -> None:
        """Remove what ``forward_features`` adds after the last level, if ``prune`` (nothing by default)."""

    def _like_model(self, module: nn.Module) -> nn.Module:
        """``module`` (a new classifier) on the model's device and dtype, in its training mode."""
        reference = next(self.parameters(), None)
        if reference is not None:
            module.to(device=reference.device, dtype=reference.dtype)
        return module.train(self.training)


def freeze_unused_warehouses(model: nn.Module) -> None:
    """Turn off the gradient of the warehouses that no KW layer of ``model`` draws on any more."""
    manager = getattr(model, 'warehouse_manager', None)
    if manager is None:
        return
    used = {m.warehouse_id for m in model.modules() if isinstance(m, KWConvNd) and m.warehouse_manager is manager}
    for idx, cells in enumerate(manager.weights):
        if idx not in used:
            cells.requires_grad_(False)


def make_global_pool(pool_type: str, mean_op: bool = False) -> SelectAdaptivePool2d:
    """timm's global pooling, flattening unless ``pool_type`` is '' (the feature map is kept).

    ``mean_op`` averages with ``mean`` over height and width (timm's 'fast' variant), the operation
    of the original ConvNeXt; the other families pool with ``adaptive_avg_pool2d`` as theirs do.
    """
    if pool_type not in POOL_TYPES:
        raise ValueError(f'global_pool must be one of {POOL_TYPES}, got {pool_type!r}.')
    fast = mean_op and pool_type
    return SelectAdaptivePool2d(pool_type=f'fast{pool_type}' if fast else pool_type, flatten=bool(pool_type))


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
          extra_args: Sequence[str] = (), feature_cfg: Optional[Dict[str, Any]] = None, **variant) -> nn.Module:
    """Build ``model_cls(**variant, ...)`` with timm's ``build_model_with_cfg`` from an entrypoint's
    keyword arguments.

    ``kw_defaults`` (None for a plain model) holds the model's default KW settings; the caller's
    KW arguments override them, ``kw_fixed`` overrides both, and the merged dict reaches the model
    as ``kw``. ``extra_args`` names the family's own arguments, accepted besides the common ones.
    timm's ``drop_rate`` is our ``dropout`` (the classifier's dropout); ``device`` and ``dtype``
    place the built model.
    """
    if 'drop_rate' in kwargs:
        drop_rate = kwargs.pop('drop_rate')
        if kwargs.get('dropout') not in (None, drop_rate):
            raise TypeError(f'{model_name} got dropout={kwargs["dropout"]} and drop_rate={drop_rate}; they are '
                            f'the same setting (the classifier dropout): give one.')
        kwargs['dropout'] = drop_rate
    valid = {*KW_ARGS, *COMMON_ARGS, *extra_args, *TIMM_BUILDER_ARGS, 'drop_rate', 'device', 'dtype'}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise TypeError(f'{model_name} got unknown argument(s) {unknown}; valid: {sorted(valid)}.')
    placement = {k: kwargs.pop(k) for k in ('device', 'dtype') if kwargs.get(k) is not None}
    builder_args = {k: kwargs.pop(k) for k in TIMM_BUILDER_ARGS if k in kwargs}
    kw_args = {k: kwargs.pop(k) for k in KW_ARGS if k in kwargs}
    # Common arguments a family has no use for (e.g. layer scale for a ResNet) are dropped.
    accepted = inspect.signature(model_cls).parameters
    model_args = {k: v for k, v in kwargs.items() if v is not None and k in accepted}
    if kw_defaults is not None:
        kw = {**KW_DEFAULTS, **kw_defaults}
        kw.update({k: v for k, v in kw_args.items() if v is not None})
        kw.update(kw_fixed or {})
        model_args['kw'] = kw
    model = build_model_with_cfg(model_cls, model_name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                 feature_cfg=dict(feature_cls='getter', **(feature_cfg or {})),
                                 **builder_args, **variant, **model_args)
    return model.to(**placement) if placement else model
