"""The KW layers the models use: those of the ``modules`` package installed with ``models``.

Imported as ``kernelwarehouse.models`` (see ``kernelwarehouse/__init__.py``) that is
``kernelwarehouse.modules``, so that a project's own ``modules`` package never stands in for ours;
imported as the top-level ``models`` (the repository's scripts) it is the top-level ``modules``.
"""
if __package__.startswith('kernelwarehouse.'):
    from ..modules.kernel_warehouse import (ConversionPlan, KWConvNd, RegexRule, Stages, WarehouseManager, convert,
                                            plan, set_temperature, static_layer)
else:
    from modules.kernel_warehouse import (ConversionPlan, KWConvNd, RegexRule, Stages, WarehouseManager, convert,
                                          plan, set_temperature, static_layer)

__all__ = ['ConversionPlan', 'KWConvNd', 'RegexRule', 'Stages', 'WarehouseManager', 'convert', 'plan',
           'set_temperature', 'static_layer']
