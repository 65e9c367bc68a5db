"""Let torch's safe loader (``weights_only=True``) read the checkpoints that mmengine writes.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``, which torch >= 2.6 takes as safe
loading. Besides tensors, an mmengine checkpoint holds its message hub: ``HistoryBuffer`` objects
with numpy arrays and scalars of the logged values, whose statistics methods are pickled as
``getattr(HistoryBuffer, 'mean')``. We allow exactly these types for the process instead of turning
safe loading off; ``getattr`` is replaced by a function that only returns those methods.
"""
import pickle
from typing import Any, List, Tuple

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

# Numeric dtypes of the logged values (bool, signed and unsigned integers, floats).
_NUMERIC_DTYPES = '?bhilqBHILQefd'
# HistoryBuffer's built-in statistics; those registered later are in its _statistics_methods.
_DEFAULT_STATISTICS = ('min', 'max', 'current', 'mean')


def history_buffer_statistic(cls: Any, name: str) -> Any:
    """Stands in for ``getattr`` while unpickling: only ``HistoryBuffer``'s statistics methods."""
    if cls is not HistoryBuffer or name not in (*_DEFAULT_STATISTICS, *HistoryBuffer._statistics_methods):
        raise pickle.UnpicklingError(f'refusing getattr({cls!r}, {name!r}) in a checkpoint: only the statistics '
                                     f'methods of mmengine HistoryBuffer are allowed.')
    return getattr(cls, name)


def mmengine_checkpoint_globals() -> List[Tuple[Any, str]]:
    """What ``torch.serialization.add_safe_globals`` needs for mmengine checkpoints, as
    ``(object, pickled name)`` pairs.

    Explicit names make these entries distinct from the bare objects that a
    ``torch.serialization.safe_globals`` block may add: such a block removes its objects again on
    exit (``utils.load_checkpoint_file`` uses one, with ``np.dtype`` among them), and would
    otherwise take ours with them.
    """
    reconstruct_array = np.ndarray(0).__reduce__()[0]
    reconstruct_scalar = np.float64(0).__reduce__()[0]
    named = [(obj, f'{obj.__module__}.{obj.__qualname__}') for obj in (
        HistoryBuffer, np.ndarray, np.dtype, reconstruct_array, reconstruct_scalar,
        *{type(np.dtype(code)) for code in _NUMERIC_DTYPES})]
    # numpy 1.x wrote numpy.core.multiarray.*, numpy 2.x writes numpy._core.multiarray.*.
    for function in (reconstruct_array, reconstruct_scalar):
        for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
            named.append((function, f'{module}.{function.__name__}'))
    return [*dict.fromkeys(named), (history_buffer_statistic, 'builtins.getattr')]


def allow_mmengine_checkpoints() -> None:
    torch.serialization.add_safe_globals(mmengine_checkpoint_globals())
