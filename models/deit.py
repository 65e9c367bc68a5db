"""DeiT-Tiny/Small, plain and KernelWarehouse: timm's VisionTransformer, made KW by the converter.

The plain models are DeiT without distillation (timm's ``deit_{tiny,small}_patch16_224``
architecture, same state-dict keys). The original KW release has no transformer, so the KW layout
is ours (the paper reports DeiT results without the layer choice):

- KW layers: the four linear layers of every block (``attn.qkv``, ``attn.proj``, ``mlp.fc1``,
  ``mlp.fc2``); the patch embedding and the head stay plain, as the ResNets' stem and classifier.
- Stages: the 12 blocks form ``kw_stage_depths`` = (3, 3, 3, 3) stages, as the four stages of the
  KW ConvNets. A layer of block ``b`` is named ``stage{s}_layer{i}_{role}`` and the default
  sharing range ``("layer",)`` gives one warehouse per stage and role (16 warehouses): at 1x a
  layer mixes the three same-role kernels of its stage, at 4x twelve. Larger stages mean fewer,
  larger warehouses and longer attention outputs; ``sharing_range="layer_fc"`` also lets ``fc1``
  and ``fc2`` share (as ConvNeXt's two pointwise layers do).
- No hand-over: DeiT is isotropic, so no layer enters a stage by changing width or resolution.
- Attention norm: LayerNorm, as in the KW ConvNeXt, the other LayerNorm network trained with this
  recipe; it does not depend on the batch.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from timm.models import VisionTransformer, generate_default_cfgs
from torch import nn

from ._builder import TemperatureMixin, build, freeze_unused_warehouses, pretrained_cfg
from ._kw import RegexRule, Stages, convert

DEPTH = 12
KW_STAGE_DEPTHS = (3, 3, 3, 3)
DEIT_ARGS = ('kw_stage_depths',)
KW_ROLES = ('qkv', 'proj', 'fc1', 'fc2')


class DeiT(TemperatureMixin, VisionTransformer):
    """timm's VisionTransformer with ``net_update_temperature`` (a no-op for the plain model)."""

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """timm's pruning; the warehouses of removed blocks are frozen (their indices are state-dict keys)."""
        take_indices = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        freeze_unused_warehouses(self)
        return take_indices


def deit_naming_rule(stage_depths: Sequence[int] = KW_STAGE_DEPTHS) -> RegexRule:
    """Warehouse names ``stage{s}_layer{i}_{role}`` for the block linears of a timm ViT."""
    roles = '|'.join(KW_ROLES)
    pattern = rf'blocks\.(?P<block>\d+)\.(?:attn|mlp)\.(?P<role>{roles})'
    return RegexRule([(pattern, 'stage{stage}_layer{layer}_{role}')], fields=Stages(stage_depths))


def _deit(embed_dim: int, num_heads: int, num_classes: int = 1000, drop_path_rate: float = 0., dropout: float = 0.,
          img_size: Union[int, Tuple[int, int]] = 224, patch_size: Union[int, Tuple[int, int]] = 16,
          in_chans: int = 3, global_pool: str = 'token', kw_stage_depths: Sequence[int] = KW_STAGE_DEPTHS,
          kw: Optional[Dict[str, Any]] = None) -> DeiT:
    """DeiT of width ``embed_dim``; KW linears in the blocks when ``kw`` settings are given.

    ``dropout`` is the dropout before the head; ``kw_stage_depths`` groups the blocks into KW stages.
    """
    model = DeiT(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=DEPTH,
                 num_heads=num_heads, num_classes=num_classes, global_pool=global_pool, drop_rate=dropout,
                 drop_path_rate=drop_path_rate)
    if kw is not None:
        if sum(kw_stage_depths) != DEPTH:
            raise ValueError(f'kw_stage_depths {tuple(kw_stage_depths)} must add up to the {DEPTH} blocks, e.g. '
                             f'{KW_STAGE_DEPTHS}.')
        convert(model, deit_naming_rule(kw_stage_depths), norm_layer=nn.LayerNorm, **kw)
    return model


_TINY = dict(embed_dim=192, num_heads=3)
_SMALL = dict(embed_dim=384, num_heads=6)
_KW_DEFAULTS = dict(sharing_range=('layer',))
_FEATURES = dict(out_indices=3)  # the last three blocks, as timm's DeiT
# timm's DeiT transform; the original KW release has no DeiT checkpoints.
default_cfgs = generate_default_cfgs({
    f'{name}.in1k': pretrained_cfg('head', 'patch_embed.proj', released=False, pool_size=None, fixed_input_size=True)
    for name in ('deit_tiny', 'deit_small', 'kw_deit_tiny', 'kw_deit_small')})


def _entry(name: str, pretrained: bool, kwargs: Dict[str, Any], kw_defaults: Optional[Dict[str, Any]],
           width: Dict[str, int]) -> DeiT:
    return build(_deit, name, pretrained, kwargs, kw_defaults, extra_args=DEIT_ARGS, feature_cfg=_FEATURES, **width)


def deit_tiny(pretrained: bool = False, **kwargs) -> DeiT:
    return _entry('deit_tiny', pretrained, kwargs, None, _TINY)


def deit_small(pretrained: bool = False, **kwargs) -> DeiT:
    return _entry('deit_small', pretrained, kwargs, None, _SMALL)


def kw_deit_tiny(pretrained: bool = False, **kwargs) -> DeiT:
    return _entry('kw_deit_tiny', pretrained, kwargs, _KW_DEFAULTS, _TINY)


def kw_deit_small(pretrained: bool = False, **kwargs) -> DeiT:
    return _entry('kw_deit_small', pretrained, kwargs, _KW_DEFAULTS, _SMALL)


ENTRYPOINTS = (deit_tiny, deit_small, kw_deit_tiny, kw_deit_small)
