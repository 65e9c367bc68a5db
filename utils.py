"""Distributed setup, logging, schedules and checkpoint I/O.

Checkpoint I/O lives here only: every entry point (``--resume``, ``--finetune``, ``--eval``, the
detection backbones, the tools) loads checkpoints through :func:`load_checkpoint_file` and
:func:`extract_state_dict`.
"""
import argparse
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

PathLike = Union[str, Path]


class CheckpointError(Exception):
    """A checkpoint that cannot be used, with one sentence saying why and what to do."""


# Plain types that our checkpoints and the original release's hold besides tensors and
# containers (``args`` is the training run's argparse.Namespace).
SAFE_CHECKPOINT_GLOBALS = [argparse.Namespace]

# Where checkpoints keep the weights, in order of preference.
STATE_DICT_KEYS = ('model', 'state_dict', 'model_ema', 'module')


def load_checkpoint_file(path: PathLike, trust: bool = False, map_location: Any = 'cpu') -> Dict[str, Any]:
    """Load a checkpoint without letting it run code.

    Uses ``torch.load(weights_only=True)`` with :data:`SAFE_CHECKPOINT_GLOBALS` allowed. A file that
    needs arbitrary code to unpickle is refused unless ``trust`` is set.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint {path} does not exist; check the path.')
    try:
        if trust:
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if 'GLOBAL' in str(error):  # the unpickler met a class or function it does not allow
            raise CheckpointError(
                f'checkpoint {path} needs arbitrary code to unpickle, which may be unsafe; if you trust its '
                f'source, load it with --trust_checkpoint true.') from None
        raise CheckpointError(f'checkpoint {path} is not a readable PyTorch checkpoint; use another copy.') from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(f'checkpoint {path} is truncated or corrupt ({type(error).__name__}: '
                              f'{str(error).splitlines()[0] if str(error) else "no detail"}); use another copy.') from None


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def extract_state_dict(checkpoint: Any, keys: Sequence[str] = STATE_DICT_KEYS, prefix: str = '',
                       source: str = 'checkpoint') -> 'OrderedDict[str, torch.Tensor]':
    """The weights of a checkpoint: under the first of ``keys`` that holds a state dict, or the
    checkpoint itself if it is a bare state dict. Strips a DDP ``module.`` prefix and ``prefix``."""
    state_dict = None
    if isinstance(checkpoint, Mapping):
        for key in keys:
            if _is_state_dict(checkpoint.get(key)):
                state_dict = checkpoint[key]
                break
        if state_dict is None and _is_state_dict(checkpoint):
            state_dict = checkpoint
    if state_dict is None:
        raise CheckpointError(f'{source} holds no model weights (looked for a state dict under '
                              f'{", ".join(repr(k) for k in keys)} or at the top level).')
    stripped = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith('module.'):
            key = key[len('module.'):]
        if prefix and key.startswith(prefix):
            key = key[len(prefix):]
        stripped[key] = value
    return stripped


def describe_state_dict_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                                 ignore_missing: Sequence[str] = (), limit: int = 5) -> Optional[str]:
    """None if ``state_dict`` fits ``model`` exactly, else one line naming the first missing,
    unexpected and wrong-shaped keys (``ignore_missing`` lists keys the caller expects to lack)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and k not in ignore_missing]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [f'{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}' for k, v in expected.items()
                   if k in state_dict and state_dict[k].shape != v.shape]
    parts = []
    for label, keys in (('missing', missing), ('unexpected', unexpected), ('wrong shape (checkpoint vs model)',
                                                                            wrong_shape)):
        if keys:
            more = f' and {len(keys) - limit} more' if len(keys) > limit else ''
            parts.append(f'{len(keys)} {label}: {", ".join(keys[:limit])}{more}')
    return '; '.join(parts) or None


def load_model_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = 'checkpoint',
                       ignore_missing: Sequence[str] = ()) -> None:
    """``load_state_dict`` that fails with one clear message when the checkpoint is for another model."""
    mismatch = describe_state_dict_mismatch(model, state_dict, ignore_missing)
    if mismatch:
        raise CheckpointError(f'{source} does not fit this model ({mismatch}); build the model with the '
                              f'config the checkpoint was trained with.')
    model.load_state_dict(state_dict, strict=not ignore_missing)
