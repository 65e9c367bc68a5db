"""Distributed setup, logging, schedules and checkpoint I/O.

Checkpoint I/O lives here only: every entry point (``--resume``, ``--finetune``, ``--eval``, the
detection backbones, the tools) loads checkpoints through :func:`load_checkpoint_file` and
:func:`extract_state_dict`.
"""
import argparse
import ctypes
import datetime
import json
import os
import pickle
import random
import re
import sys
import time
import zipfile
from collections import OrderedDict, defaultdict, deque
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from models._checkpoint import SAFE_CHECKPOINT_GLOBALS  # noqa: F401 (registers them with torch.load)

PathLike = Union[str, Path]


class CheckpointError(Exception):
    """A checkpoint that cannot be used, with one sentence saying why and what to do."""


# Where checkpoints keep the weights, in order of preference.
STATE_DICT_KEYS = ('model', 'state_dict', 'model_ema', 'module')


def load_checkpoint_file(path: PathLike, trust: bool = False, map_location: Any = 'cpu',
                         trust_hint: str = 'load it with --trust_checkpoint true') -> Dict[str, Any]:
    """Load a checkpoint without letting it run code.

    Uses ``torch.load(weights_only=True)``, which allows :data:`SAFE_CHECKPOINT_GLOBALS` besides
    tensors and containers. A file that needs arbitrary code to unpickle is refused unless ``trust``
    is set; the refusal ends with ``trust_hint``, what the caller offers instead (main.py's option;
    the detection plugin, which has none, asks for a file of the weights alone).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint {path} does not exist; check the path.')
    try:
        if trust:
            return torch.load(path, map_location=map_location, weights_only=False)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if 'GLOBAL' in str(error):  # the unpickler met a class or function it does not allow
            raise CheckpointError(
                f'checkpoint {path} needs arbitrary code to unpickle, which may be unsafe; if you trust its '
                f'source, {trust_hint}.') from None
        raise CheckpointError(f'checkpoint {path} is not a readable PyTorch checkpoint; use another copy.') from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(f'checkpoint {path} is truncated or corrupt ({type(error).__name__}: '
                              f'{str(error).splitlines()[0] if str(error) else "no detail"}); use another copy.') from None


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def state_dict_key(checkpoint: Any, keys: Sequence[str] = STATE_DICT_KEYS) -> Optional[str]:
    """The first of ``keys`` under which ``checkpoint`` holds a state dict (None: under none)."""
    if not isinstance(checkpoint, Mapping):
        return None
    return next((key for key in keys if _is_state_dict(checkpoint.get(key))), None)


def extract_state_dict(checkpoint: Any, keys: Sequence[str] = STATE_DICT_KEYS, prefix: str = '',
                       source: str = 'checkpoint') -> 'OrderedDict[str, torch.Tensor]':
    """The weights of a checkpoint: under the first of ``keys`` that holds a state dict, or the
    checkpoint itself if it is a bare state dict. Strips a DDP ``module.`` prefix and ``prefix``."""
    key = state_dict_key(checkpoint, keys)
    state_dict = checkpoint[key] if key is not None else checkpoint if _is_state_dict(checkpoint) else None
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


def drop_module_keys(state_dict: Mapping[str, torch.Tensor],
                     modules: Sequence[str]) -> 'OrderedDict[str, torch.Tensor]':
    """``state_dict`` without the keys of the named submodules (``'fc'`` drops ``fc.weight`` and
    ``fc.bias`` but keeps ``fc2.weight``), e.g. a classifier head before loading a backbone."""
    return OrderedDict((k, v) for k, v in state_dict.items()
                       if not any(k == m or k.startswith(f'{m}.') for m in modules))


class UserError(Exception):
    """A mistake in the command line, a config or the data, with one sentence naming the fix."""


def str2bool(value: Union[str, bool]) -> bool:
    """argparse type of the ``true/false`` flags (as in the original ``main.py``)."""
    if isinstance(value, bool):
        return value
    if value.lower() in ('true', 't', 'yes', 'y', '1'):
        return True
    if value.lower() in ('false', 'f', 'no', 'n', '0'):
        return False
    raise argparse.ArgumentTypeError(f'expected true or false, got {value!r}')


# ----------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------

def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed_mode(args: argparse.Namespace) -> None:
    """Join the process group when launched by ``torchrun`` or ``torch.distributed.launch``.

    Sets ``args.distributed``, ``args.rank``, ``args.world_size`` and ``args.gpu``; a plain
    ``python main.py`` stays a single process. NCCL on CUDA, gloo on the CPU.
    """
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        args.rank = int(os.environ['RANK'])
        args.world_size = int(os.environ['WORLD_SIZE'])
        local_rank = int(os.environ.get('LOCAL_RANK', max(args.local_rank, 0)))
    else:
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, None
        return
    args.distributed = True
    use_cuda = args.device.startswith('cuda')
    args.gpu = local_rank if use_cuda else None
    if use_cuda:
        torch.cuda.set_device(local_rank)
        args.device = f'cuda:{local_rank}'
    dist.init_process_group('nccl' if use_cuda else 'gloo', init_method=args.dist_url,
                            world_size=args.world_size, rank=args.rank)
    dist.barrier()


def all_reduce_sum(values: Sequence[float], device: Union[str, torch.device] = 'cpu') -> List[float]:
    """Sum numbers over all processes (identity in a single process)."""
    if not is_dist():
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or torch.compile) wrapper."""
    while hasattr(model, 'module') or hasattr(model, '_orig_mod'):
        model = getattr(model, 'module', None) or model._orig_mod
    return model


# ----------------------------------------------------------------------------------------------
# Memory layout
# ----------------------------------------------------------------------------------------------

def memory_format(channels_last: bool) -> torch.memory_format:
    """The layout of images (and activations) for ``--channels_last``."""
    return torch.channels_last if channels_last else torch.contiguous_format


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store ``model``'s 4-D parameters and buffers channels-last, in place; returns ``model``.

    ``model.to(memory_format=torch.channels_last)`` converts every 4-D and 5-D tensor and fails on
    the 5-D warehouse cells of 2-D KW convolutions (``[n, cell_out, cell_in, kh, kw]``); those need no
    conversion (the GEMM path transposes the cells itself), so only the 4-D tensors are converted.
    """
    return model._apply(lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)


# ----------------------------------------------------------------------------------------------
# Host memory
# ----------------------------------------------------------------------------------------------

# mallopt parameters (glibc's malloc.h), the largest value they take (a C int), and the trim threshold
# that turns trimming off (mallopt(3): -1, read as the largest size)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOPT_MAX = 2 ** 31 - 1
NEVER_TRIM = -1


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory the process frees, for its next allocations to reuse.

    By default glibc gives large freed blocks back to the kernel (those above an adaptive threshold of
    at most 32 MiB, and the heap's free top above twice that), so a training step on the CPU faults the
    same large buffers in again, page by page, in every step, and a KW step allocates many (per-sample
    kernels, unfolded inputs). Raising the mmap threshold to its maximum (2 GiB) and turning trimming
    off keeps such blocks: KW ResNet18 then trained 1.12-1.16x faster on 2 CPU cores, and the process
    holds on to its peak memory (docs/training.md, Training on a CPU). Trimming goes off rather than to the
    largest threshold a C int holds, 2 GiB: a step whose freed memory exceeded that (the original
    algorithm's at batch 32, 4 GiB peak) was handed back and faulted in again. It does what the
    ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` environment variables do, from inside
    the process (data loader workers forked later inherit it). Returns whether the C library took both
    settings: ``False`` off Linux and with C libraries that lack them (e.g. musl).
    """
    if not sys.platform.startswith('linux'):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    return all(mallopt(parameter, value) == 1
               for parameter, value in ((M_MMAP_THRESHOLD, MALLOPT_MAX), (M_TRIM_THRESHOLD, NEVER_TRIM)))


# ----------------------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------------------

def check_compile_options(backend: str, mode: Optional[str] = None, backend_option: str = '--compile_backend',
                          mode_option: str = '--compile_mode') -> None:
    """Raise :class:`UserError` (naming the option and the choices) unless ``torch.compile`` takes
    ``backend`` and, for the inductor backend only, ``mode`` (``None``: the backend's default)."""
    backends = torch.compiler.list_backends(exclude_tags=())
    if backend not in backends:
        raise UserError(f'unknown {backend_option} {backend!r}; choose from {", ".join(backends)}.')
    if mode is None:
        return
    if backend != 'inductor':
        raise UserError(f'{mode_option} is a mode of the inductor backend, not of {backend!r}; '
                        f'drop it or set {backend_option} inductor.')
    from torch._inductor import list_mode_options  # imports the compiler: only when a mode is asked for
    if mode not in list_mode_options():
        raise UserError(f'unknown {mode_option} {mode!r}; choose from {", ".join(list_mode_options())}.')


# ----------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------

class SmoothedValue:
    """A series of values: median/average over a recent window and the global average."""

    def __init__(self, window_size: int = 20, fmt: str = '{median:.4f} ({global_avg:.4f})'):
        self.window = deque(maxlen=window_size)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value: float, n: int = 1) -> None:
        self.window.append(value)
        self.count += n
        self.total += value * n

    @property
    def median(self) -> float:
        return float(np.median(self.window))

    @property
    def avg(self) -> float:
        return float(np.mean(self.window))

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.window[-1]

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Named series of values, printed every ``print_freq`` iterations by the main process."""

    def __init__(self, delimiter: str = '  '):
        self.meters: Dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **values: float) -> None:
        for name, value in values.items():
            if value is not None:
                self.meters[name].update(float(value))

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def __str__(self) -> str:
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def log_every(self, iterable: Iterable, print_freq: int, header: str = '') -> Iterator:
        length = len(iterable)
        start = last = time.time()
        iter_time = SmoothedValue(fmt='{avg:.4f}')
        digits = len(str(length))
        for i, item in enumerate(iterable):
            yield item
            iter_time.update(time.time() - last)
            last = time.time()
            if is_main_process() and (i % print_freq == 0 or i == length - 1):
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (length - i - 1)))
                print(self.delimiter.join([f'{header} [{i:>{digits}}/{length}]', f'eta: {eta}', str(self),
                                           f'time: {iter_time}']), flush=True)
        if is_main_process():
            total = datetime.timedelta(seconds=int(time.time() - start))
            print(f'{header} Total time: {total} ({(time.time() - start) / max(length, 1):.4f} s / it)', flush=True)


def append_json_line(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, 'a', encoding='utf-8') as f:
        f.write(json.dumps(record) + '\n')


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------

def cosine_scheduler(base_value: float, final_value: float, epochs: int, steps_per_epoch: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0.0, warmup_steps: int = -1) -> np.ndarray:
    """One value per optimizer step: linear warm-up, then a half cosine to ``final_value``.

    Written here rather than taken from timm: timm's schedulers drive the learning rate only, and
    the recipe also anneals the weight decay (``--weight_decay_end``) with the same curve.
    """
    warmup_iters = warmup_steps if warmup_steps > 0 else warmup_epochs * steps_per_epoch
    total = epochs * steps_per_epoch
    warmup_iters = min(warmup_iters, total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    steps = np.arange(total - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([warmup, cosine])


# ----------------------------------------------------------------------------------------------
# Checkpoint files of a run
# ----------------------------------------------------------------------------------------------

# checkpoint-<epoch>.pth after a whole epoch, checkpoint-<epoch>-step<k>.pth after k optimizer steps of it
CHECKPOINT_PATTERN = re.compile(r'^checkpoint-(\d+)(?:-step(\d+))?\.pth$')


def save_checkpoint(obj: Any, path: PathLike) -> None:
    """Write a checkpoint atomically: a temporary file in the same folder, flushed, then renamed,
    so that an interrupted save never leaves a truncated ``checkpoint-*.pth`` behind."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise UserError(f'could not save checkpoint {path} ({error.strerror or error}); free disk space or '
                        f'choose another --output_dir.') from None


def remove_stale_temporaries(output_dir: PathLike) -> None:
    """Delete the temporary files of saves that were killed half-way."""
    for path in Path(output_dir).glob('.checkpoint-*.pth.tmp-*'):
        path.unlink(missing_ok=True)


def run_checkpoints(output_dir: PathLike) -> List[Tuple[Tuple[int, int], Path]]:
    """The run's checkpoints with the position training continues from, oldest first.

    The position is ``(epoch, optimizer steps already done in it)``: ``(e + 1, 0)`` for
    ``checkpoint-<e>.pth``, ``(e, k)`` for ``checkpoint-<e>-step<k>.pth``.
    """
    found = []
    for path in Path(output_dir).glob('checkpoint-*.pth'):
        match = CHECKPOINT_PATTERN.match(path.name)
        if match:
            epoch, step = int(match.group(1)), match.group(2)
            found.append(((epoch + 1, 0) if step is None else (epoch, int(step)), path))
    return sorted(found)


# ----------------------------------------------------------------------------------------------
# Random state
# ----------------------------------------------------------------------------------------------

def capture_rng_state() -> Dict[str, Any]:
    """The Python, NumPy and torch (CPU and CUDA) random states, in types a safe load accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': random.getstate(), 'torch': torch.get_rng_state(),
             'numpy': (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state['python'])
    torch.set_rng_state(state['torch'])
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def all_gather_objects(obj: Any) -> List[Any]:
    """``obj`` of every process, in rank order (a one-element list in a single process)."""
    if not is_dist():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
