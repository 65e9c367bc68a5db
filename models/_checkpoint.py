"""Checkpoints as timm's loader sees them: safe unpickling, and weights for another classifier.

``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))`` opens ``path``
with ``torch.load(weights_only=True)`` and takes the weights from ``state_dict_ema``, ``model_ema``,
``state_dict`` or ``model`` (our checkpoints and the original release's keep them under ``model``,
with ``model_ema`` where EMA was on, which timm then prefers, as for its own checkpoints).
"""
import argparse
from typing import Any, Dict, Tuple

import numpy as np
import numpy._core.multiarray as np_multiarray
import torch
from torch import nn

from ._kw import KWConvNd

# Plain types that our checkpoints and the original release's hold besides tensors and containers:
# ``args`` is the run's argparse.Namespace; the original's optimizer states hold numpy scalars (its
# schedules are numpy arrays), pickled under numpy 1's module name or numpy 2's.
SAFE_CHECKPOINT_GLOBALS = [
    argparse.Namespace, np.dtype, np_multiarray.scalar, (np_multiarray.scalar, 'numpy.core.multiarray.scalar'),
    *(getattr(np.dtypes, f'{kind}DType') for kind in ('Bool', 'Float16', 'Float32', 'Float64', 'Int8', 'Int16',
                                                      'Int32', 'Int64', 'UInt8', 'UInt16', 'UInt32', 'UInt64')),
]



def _named(entry: Any) -> Tuple[Any, str]:
    """``(object, pickled name)``: an entry that no ``safe_globals`` block removes by accident."""
    return entry if isinstance(entry, tuple) else (entry, f'{entry.__module__}.{entry.__qualname__}')


# Registered for the whole process when the models are imported, so that timm's loader opens these
# checkpoints too. Under explicit names: a ``torch.serialization.safe_globals`` block removes the
# objects it added on exit, even ones registered before it (timm's loader adds argparse.Namespace
# in such a block, which would otherwise end our permission for main.py's checkpoints).
torch.serialization.add_safe_globals([_named(entry) for entry in SAFE_CHECKPOINT_GLOBALS])


def classifier_state_keys(model: nn.Module) -> set:
    """State-dict keys that belong to the classifier: its own keys and, for a KW classifier, the
    warehouses only it uses (both change with the number of classes). Empty without a classifier."""
    classifier = model.get_classifier()
    prefixes = [name for name, module in model.named_modules() if module is classifier and name]
    if not prefixes or isinstance(classifier, nn.Identity):
        return set()
    prefix = prefixes[0]
    keys = {k for k in model.state_dict() if k.startswith(f'{prefix}.')}
    in_classifier: Dict[int, set] = {}
    for name, module in model.named_modules():
        if isinstance(module, KWConvNd):
            in_classifier.setdefault(module.warehouse_id, set()).add(name.startswith(f'{prefix}.'))
    keys.update(f'warehouse_manager.weights.{idx}' for idx, users in in_classifier.items() if users == {True})
    return keys


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: drop the classifier of a checkpoint made for another number
    of classes. timm itself drops ``<classifier>.weight`` and ``.bias`` only, which misses the
    attention and warehouse of a KW classifier; keys the model has not (``num_classes=0``) go too."""
    own = model.state_dict()
    classifier = classifier_state_keys(model)
    mismatched = any(key in state_dict and state_dict[key].shape != own[key].shape for key in classifier)
    return {key: value for key, value in state_dict.items()
            if not ((mismatched and key in classifier) or (key not in own and _is_classifier_key(key, model)))}


def _is_classifier_key(key: str, model: nn.Module) -> bool:
    """Whether ``key`` names a parameter of the classifier in the model's pretrained config, or the
    warehouse that a KW classifier, now removed, had to itself: the one after the model's last (a
    removed warehouse can only be the last, see ``WarehouseManager.replace_layer``)."""
    names = model.pretrained_cfg.get('classifier') if hasattr(model, 'pretrained_cfg') else None
    names = (names,) if isinstance(names, str) else tuple(names or ())
    manager = getattr(model, 'warehouse_manager', None)
    removed_warehouse = f'warehouse_manager.weights.{len(manager.weights)}' if manager is not None else None
    return any(key.startswith(f'{name}.') for name in names) or key == removed_warehouse
