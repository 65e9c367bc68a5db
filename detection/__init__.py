"""COCO detection with KernelWarehouse backbones: an mmdetection 3.x plugin (``detection.kw_mmdet``),
its configs (``detection/configs``) and the ``train.py`` / ``test.py`` entry points."""
import sys
from contextlib import contextmanager
from typing import Iterator

DETECTION_STACK = ('mmdet', 'mmengine', 'mmcv')


@contextmanager
def detection_stack_required() -> Iterator[None]:
    """Imports inside the block that miss the detection stack exit with one line naming the fix."""
    try:
        yield
    except ModuleNotFoundError as error:
        if error.name.split('.')[0] not in DETECTION_STACK:
            raise
        sys.exit(f'error: {error.name} is not installed; run "bash detection/install.sh" in this environment.')
