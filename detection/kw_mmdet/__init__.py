"""mmdetection 3.x plugin: KernelWarehouse and plain backbones built from ``models/``.

Loaded by the configs with ``custom_imports = dict(imports=['detection.kw_mmdet'])``: ``pip install
-e .`` installs the ``detection`` package, so this works from any directory (``detection/train.py``
and ``detection/test.py`` also put the repository root on ``sys.path``, for a checkout that is not
installed). The plugin imports ``models`` and ``modules`` as the repository's scripts do, and
``utils.py`` as ``kernelwarehouse.utils``, so that a project's own top-level ``utils`` never stands in
for it. Importing it registers ``KW_ResNet``, ``KW_MobileNetV2``, ``KW_ConvNeXt`` and the matching
``Plain_*`` backbones in mmdetection's ``MODELS`` registry, and lets torch's safe loader read the
checkpoints that mmengine writes.
"""
from .backbones import (ClassifierBackbone, KW_ConvNeXt, KW_MobileNetV2, KW_ResNet, Plain_ConvNeXt,
                        Plain_MobileNetV2, Plain_ResNet)
from .safe_load import allow_mmengine_checkpoints

allow_mmengine_checkpoints()

__all__ = ['ClassifierBackbone', 'KW_ConvNeXt', 'KW_MobileNetV2', 'KW_ResNet', 'Plain_ConvNeXt', 'Plain_MobileNetV2',
           'Plain_ResNet', 'allow_mmengine_checkpoints']
