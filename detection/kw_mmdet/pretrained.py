"""``init_cfg=dict(type='Pretrained', ...)`` for the backbones: mmengine's options and schemes, loaded safely.

The options are those of mmengine's :class:`~mmengine.model.weight_init.PretrainedInit` (``checkpoint``,
``prefix``, ``map_location``), validated by building it. Where the checkpoint comes from follows mmengine's
:class:`~mmengine.runner.checkpoint.CheckpointLoader`: a local path, or any scheme it has registered
(``torchvision://``, ``open-mmlab://``, ``http(s)://``, ``s3://``, ... and schemes that other code registers).
What is done with it does not: mmengine loads non-strictly and its downloaded files with
``torch.load(weights_only=False)`` (torch.hub's default), while the backbones need the original release's
layouts and a strict fit. So:

- a local file is read by ``utils.load_checkpoint_file`` (``weights_only=True``, one-sentence errors);
- any other scheme goes through mmengine's loader with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` set for the
  call, torch's switch that makes every ``torch.load`` inside it safe whatever its caller passes;
- the weights are taken from the checkpoint by ``utils.extract_state_dict`` (``model``, ``state_dict``,
  bare; DDP ``module.`` stripped); with ``prefix``, only the keys under it are kept, without it, as
  mmengine's ``_load_checkpoint_with_prefix`` does.
"""
import os
import pickle
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional

import torch
from mmengine.model.weight_init import PretrainedInit
from mmengine.runner.checkpoint import CheckpointLoader, load_from_local

from kernelwarehouse.utils import CheckpointError, UserError, extract_state_dict, load_checkpoint_file

PRETRAINED_OPTIONS = ('checkpoint', 'prefix', 'map_location')
# What to do with a checkpoint that safe loading refuses, if its source is trusted (the plugin has no
# option to unpickle arbitrary objects): keep its tensors only.
RESAVE_HINT = 'save its weights alone with torch.save(state_dict, path) and load that file'
_FORCE_SAFE, _FORCE_UNSAFE = 'TORCH_FORCE_WEIGHTS_ONLY_LOAD', 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'


def parse_init_cfg(backbone: str, init_cfg: Any) -> Optional[PretrainedInit]:
    """mmengine's ``PretrainedInit`` for ``init_cfg`` (None without one); anything else is a UserError."""
    if init_cfg is None:
        return None
    usage = (f"{backbone}: init_cfg must be None or dict(type='Pretrained', checkpoint=..., prefix=..., "
             f"map_location=...)")
    if not isinstance(init_cfg, Mapping) or init_cfg.get('type') not in ('Pretrained', PretrainedInit):
        raise UserError(f'{usage}, got {init_cfg!r} (the models initialise themselves).')
    options = {key: value for key, value in init_cfg.items() if key != 'type'}
    unknown = sorted(set(options) - set(PRETRAINED_OPTIONS))
    if unknown:
        raise UserError(f'{usage}; {unknown} are not options of mmengine\'s PretrainedInit.')
    if not options.get('checkpoint'):
        raise UserError(f'{usage}; checkpoint is missing or empty.')
    options['checkpoint'] = str(options['checkpoint'])
    if options.get('prefix') is not None and not isinstance(options['prefix'], str):
        raise UserError(f'{usage}; prefix must be a string such as \'backbone.\', got {options["prefix"]!r}.')
    return PretrainedInit(**options)


def is_local(checkpoint: str) -> bool:
    """Whether mmengine reads ``checkpoint`` as a local path (no registered scheme matches it)."""
    return CheckpointLoader._get_checkpoint_loader(checkpoint) is load_from_local


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` in the block loads safely, also one that passes ``weights_only=False``.

    torch refuses to run when both of its environment switches are set, so a user's
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is lifted for the block and put back afterwards.
    """
    saved = {name: os.environ.get(name) for name in (_FORCE_SAFE, _FORCE_UNSAFE)}
    os.environ[_FORCE_SAFE] = '1'
    os.environ.pop(_FORCE_UNSAFE, None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def load_checkpoint(checkpoint: str, map_location: Any = 'cpu') -> Dict[str, Any]:
    """The object stored at ``checkpoint`` (a path or any scheme of mmengine's CheckpointLoader), loaded with
    ``weights_only=True``."""
    if is_local(checkpoint):
        return load_checkpoint_file(Path(os.path.expanduser(checkpoint)), map_location=map_location,
                                    trust_hint=RESAVE_HINT)
    try:
        with weights_only_loads():
            return CheckpointLoader.load_checkpoint(checkpoint, map_location=map_location)
    except pickle.UnpicklingError:
        raise CheckpointError(f'checkpoint {checkpoint} needs arbitrary code to unpickle, which may be unsafe; '
                              f'if you trust its source, {RESAVE_HINT}.') from None
    except KeyError as error:  # a name that the scheme's list of checkpoints lacks
        name = error.args[0] if error.args else checkpoint
        raise CheckpointError(f'mmengine knows no checkpoint named {name!r} for {checkpoint}; check the '
                              f'name.') from None
    except (OSError, RuntimeError, ValueError, EOFError, ImportError) as error:  # ImportError: a backend's client
        detail = str(error).splitlines()[0] if str(error) else 'no detail'
        raise CheckpointError(f'checkpoint {checkpoint} could not be loaded ({type(error).__name__}: {detail}); '
                              f'check the name, the connection or use a local copy.') from None


def select_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str,
                  source: str) -> 'OrderedDict[str, torch.Tensor]':
    """The weights under ``prefix`` (``'backbone'`` and ``'backbone.'`` alike), the prefix stripped."""
    prefix = prefix if prefix.endswith('.') else f'{prefix}.'
    selected = OrderedDict((key[len(prefix):], value) for key, value in state_dict.items() if key.startswith(prefix))
    if not selected:
        found = sorted({key.split('.')[0] + '.' for key in state_dict})
        raise CheckpointError(f'{source} has no weights under prefix {prefix!r} (its keys start with '
                              f'{", ".join(repr(p) for p in found[:8])}); set init_cfg\'s prefix to one of those '
                              f'or leave it out.')
    return selected


def pretrained_state_dict(init: PretrainedInit) -> 'OrderedDict[str, torch.Tensor]':
    """The weights ``init`` points at: extracted from the checkpoint's layout, then selected by its prefix."""
    state_dict = extract_state_dict(load_checkpoint(init.checkpoint, init.map_location), source=init.checkpoint)
    if init.prefix:
        state_dict = select_prefix(state_dict, init.prefix, init.checkpoint)
    return state_dict


def common_prefix(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The prefix under which ``state_dict`` holds most of the ``expected`` keys (e.g. ``'backbone.'`` in a
    detector's checkpoint), or None when the keys are not nested that way."""
    counts: Dict[str, int] = {}
    for key in state_dict:
        for start in (i + 1 for i, char in enumerate(key) if char == '.'):
            if key[start:] in expected:
                counts[key[:start]] = counts.get(key[:start], 0) + 1
    if not counts:
        return None
    prefix, count = max(counts.items(), key=lambda item: item[1])
    return prefix if 2 * count >= len(expected) else None
