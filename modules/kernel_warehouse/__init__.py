"""KernelWarehouse: dynamic convolution with kernel cells shared through per-stage warehouses.

A KW layer splits its kernel into ``m`` same-shaped cells and builds every cell, per sample, as a
linear mixture of the ``n`` cells of a warehouse that neighbouring layers share. The mixture
weights come from a small attention branch (:class:`Attention`).

The life cycle of a KW model follows the warehouse manager's three phases:

1. :meth:`WarehouseManager.reserve` while the model is built: records the kernel shape of each
   dynamic layer under a (fused) warehouse name and returns a weightless KW layer;
2. :meth:`WarehouseManager.store` once the model is built: creates one parameter per warehouse;
3. :meth:`WarehouseManager.allocate`: gives each KW layer its attention and its contiguous range of
   cells, and initialises those cells.

:func:`convert` applies the three phases to an existing model (any ``nn.Module``, timm models
included): it replaces the layers a naming rule selects by KW layers at the same module paths;
without a rule, :class:`StageRule` names the warehouses from the stages a timm model reports.

Paper: "KernelWarehouse: Rethinking the Design of Dynamic Convolution", Li and Yao, ICML 2024.
The behaviour reproduced here is specified in ``KW-SPEC.md`` (sections 1-4).
"""
from .attention import Attention, set_temperature
from .conv import KWConv1d, KWConv2d, KWConv3d, KWConvNd, KWLinear
from .auto_rule import StageRule
from .converter import CONVERTIBLE_TYPES, ConversionPlan, RegexRule, Stages, WarehousePlan, convert, plan
from .manager import Warehouse_Manager, WarehouseManager, parse_sharing_range, static_layer

__all__ = [
    'WarehouseManager', 'Warehouse_Manager', 'Attention', 'KWConvNd', 'KWConv1d', 'KWConv2d',
    'KWConv3d', 'KWLinear', 'set_temperature', 'parse_sharing_range', 'static_layer',
    'convert', 'plan', 'ConversionPlan', 'WarehousePlan', 'RegexRule', 'Stages', 'StageRule', 'CONVERTIBLE_TYPES',
]
