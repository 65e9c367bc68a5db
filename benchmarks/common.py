"""Helpers shared by the benchmark scripts: device description, timing, peak memory, argument lists."""
import ctypes
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run from anywhere without installing

import models  # noqa: E402
from utils import keep_freed_memory, memory_format, to_channels_last  # noqa: E402

# Autocast dtypes by name; 'fp32' runs without autocast.
DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def int_list(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(',') if v]
    except ValueError:
        raise SystemExit(f'error: expected comma-separated integers, got {text!r}')


def name_list(text: str, choices=None, what: str = 'value') -> List[str]:
    names = [v.strip() for v in text.split(',') if v.strip()]
    unknown = [n for n in names if choices is not None and n not in choices]
    if unknown or not names:
        raise SystemExit(f'error: unknown {what} {", ".join(unknown) or repr(text)}; choose from {", ".join(choices)}')
    return names


def in_memory_format(model: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """``model`` with its 4-D weights channels-last if ``channels_last`` (see ``utils.to_channels_last``)."""
    return to_channels_last(model) if channels_last else model


def build_for_training(name: str, args, device: torch.device
                       ) -> Tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    """Model ``name`` (``models.create_model``: released names are the release's models) in train mode,
    SGD with momentum, and one random batch ``(x, y)`` of ``args.batch_size`` images of
    ``args.img_size`` px, model and images in the layout of ``args.channels_last``. The optimizer
    updates all parameters by one multi-tensor operator on every device (the CPU's default is one
    per parameter, CUDA's is this)."""
    torch.manual_seed(0)
    model = in_memory_format(models.create_model(name).to(device), args.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device).contiguous(
        memory_format=memory_format(args.channels_last))
    y = torch.randint(0, model.num_classes, (args.batch_size,), device=device)
    return model, optimizer, x, y


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('error: --device cuda was asked for but no CUDA device is available; use --device cpu')
    return device


def add_cpu_options(parser) -> None:
    """The options every script takes for CPU runs (applied by :func:`setup_device`)."""
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    parser.add_argument('--keep-freed-memory', action='store_true',
                        help="on the CPU, have glibc's malloc keep freed memory for reuse, as main.py does "
                             '(utils.keep_freed_memory)')


def setup_device(args) -> torch.device:
    """Apply ``--threads`` and ``--keep-freed-memory`` (if given) and resolve ``--device``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.keep_freed_memory and device.type == 'cpu' and not keep_freed_memory():
        raise SystemExit("error: --keep-freed-memory needs Linux with glibc's malloc; run without it.")
    return device


def describe_device(device: torch.device, keep_freed_memory: bool = False) -> str:
    """The device in words; on the CPU with its threads, and whether freed memory is kept (``--keep-freed-memory``)."""
    if device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}'
    model = platform.processor() or 'unknown CPU'
    try:
        with open('/proc/cpuinfo') as f:
            model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    kept = ', freed memory kept' if keep_freed_memory else ''
    return f'{model}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads{kept}'


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_per_call(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``iters`` back-to-back calls (CUDA-synchronised)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  autocast_dtype: Optional[torch.dtype], **autocast_kwargs) -> Callable[[], None]:
    """One training step on a fixed batch: forward (under autocast to ``autocast_dtype`` unless it is
    ``None``), cross-entropy, backward and an optimizer step. ``autocast_kwargs`` go to ``torch.autocast``."""
    def step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None,
                            **autocast_kwargs):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    return step


class _CpuPeakMemory:
    """Rise of the process's peak resident memory during a call (Linux, glibc).

    Free heap memory is handed back first (``malloc_trim``) so that the call's allocations show up
    as new resident pages, then the kernel's high-water mark is reset (``clear_refs`` 5).
    """

    def __init__(self):
        self.libc = ctypes.CDLL('libc.so.6')

    @staticmethod
    def _status_kib(field: str) -> int:
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    def __call__(self, fn: Callable[[], object]) -> int:
        self.libc.malloc_trim(0)
        baseline = self._status_kib('VmRSS:')
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        fn()
        return (self._status_kib('VmHWM:') - baseline) * 1024


def peak_memory_function(device: torch.device) -> Optional[Callable[[Callable[[], object]], int]]:
    """A function returning the peak memory (bytes) a call of ``fn`` needs, or ``None`` if not measurable."""
    if device.type == 'cuda':
        def cuda_peak(fn):
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            fn()
            synchronize(device)
            return torch.cuda.max_memory_allocated(device) - before
        return cuda_peak
    try:
        measure = _CpuPeakMemory()
        measure(lambda: None)
        return measure
    except (OSError, AttributeError, StopIteration):
        return None


def format_bytes(value: Optional[int]) -> str:
    return 'n/a' if value is None else f'{value / 2 ** 30:.2f} GiB'
