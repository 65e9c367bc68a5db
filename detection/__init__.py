"""COCO detection with KernelWarehouse backbones: an mmdetection 3.x plugin (``detection.kw_mmdet``),
its configs (``detection/configs``) and the ``train.py`` / ``test.py`` entry points."""
