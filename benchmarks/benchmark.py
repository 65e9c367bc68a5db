"""Training and inference throughput and peak memory of plain and KW models, in one run.

    python benchmarks/benchmark.py --device cpu --models resnet18,kw_resnet18 --batch-sizes 16,32
    python benchmarks/benchmark.py --device cuda --models resnet50,kw_resnet50 --batch-sizes 128 --dtypes fp32,fp16

Each KW model is measured once per KW implementation (``--impls``, default the original
release's algorithm ``reference`` and our default ``auto``), next to the plain models, on the same
random batch. After ``--warmup`` steps every configuration is timed ``--repeats`` times in turn
(interleaved, so that load changes on a shared machine hit all of them alike) and the median is
reported. A training step is forward, cross-entropy, backward and an SGD (momentum 0.9) step;
inference runs in ``torch.inference_mode``. CUDA timings are synchronised. Peak memory is what a
step needs beyond the model and optimizer state resident before it: ``torch.cuda.max_memory_allocated``
on CUDA, the rise of the process's peak resident set on Linux CPUs (``n/a`` elsewhere). With
``--compile`` every row is timed again under ``torch.compile`` (``... compiled``), its speed-up
still relative to the eager reference.
"""
import argparse
import contextlib
from dataclasses import dataclass, field
from statistics import median
from typing import Callable, Dict, List, Optional

import timm
import torch

from common import (DTYPES, add_cpu_options, describe_device, format_bytes, in_memory_format, int_list,
                    memory_format, name_list, peak_memory_function, setup_device, time_per_call, training_step)

import models  # noqa: E402  (registers the models with timm; sys.path set above)
from utils import UserError, check_compile_options  # noqa: E402
from modules.kernel_warehouse import KWConvNd  # noqa: E402
from modules.kernel_warehouse.functional import IMPLEMENTATIONS, use_implementation  # noqa: E402

MODES = ('train', 'infer')


@dataclass
class Variant:
    """One row of the table: a model, and for a KW model the implementation it runs with."""
    model_name: str
    impl: Optional[str]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    compiled: bool = False  # ``model`` is the torch.compile wrapper of the eager variant's model
    times: Dict[str, List[float]] = field(default_factory=lambda: {m: [] for m in MODES})
    memory: Dict[str, Optional[int]] = field(default_factory=dict)

    def context(self):
        return use_implementation(self.impl) if self.impl else contextlib.nullcontext()

    @property
    def label(self) -> str:
        return ' '.join(filter(None, [self.impl, 'compiled' if self.compiled else None])) or '-'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', default='resnet18,kw_resnet18', help='comma-separated registered model names')
    parser.add_argument('--batch-sizes', default='16,32', help='comma-separated batch sizes')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--num-classes', type=int, default=1000)
    parser.add_argument('--dtypes', default='fp32', help='fp32, bf16, fp16 (the last two under autocast)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--impls', default='reference,auto', help=f'KW implementations: {", ".join(IMPLEMENTATIONS)}')
    parser.add_argument('--modes', default='train,infer', help='train, infer')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per configuration')
    parser.add_argument('--iters', type=int, default=3, help='timed steps per repeat')
    parser.add_argument('--repeats', type=int, default=3, help='interleaved repeats; the median is reported')
    add_cpu_options(parser)
    parser.add_argument('--channels-last', action='store_true', help='model and input in channels_last')
    parser.add_argument('--temperature', type=float, default=0.0, help='KW temperature during the steps')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory measurement')
    parser.add_argument('--compile', action='store_true',
                        help='also time every row under torch.compile, next to the eager one (it compiles during '
                             'the warm-up steps: keep --warmup >= 1)')
    parser.add_argument('--compile-backend', default='inductor', help="torch.compile's backend")
    parser.add_argument('--compile-mode', default=None, help="the inductor backend's mode, e.g. reduce-overhead")
    args = parser.parse_args(argv)
    args.models = name_list(args.models, timm.list_models(), 'model')
    args.batch_sizes = int_list(args.batch_sizes)
    args.dtypes = name_list(args.dtypes, DTYPES, 'dtype')
    args.impls = name_list(args.impls, IMPLEMENTATIONS, 'implementation')
    args.modes = name_list(args.modes, MODES, 'mode')
    for name in ('warmup', 'iters', 'repeats', 'img_size', 'num_classes'):
        if getattr(args, name) < (0 if name == 'warmup' else 1):
            raise SystemExit(f'error: --{name.replace("_", "-")} must be positive, got {getattr(args, name)}')
    if any(b < 1 for b in args.batch_sizes):
        raise SystemExit(f'error: batch sizes must be positive, got {args.batch_sizes}')
    if args.compile:
        try:
            check_compile_options(args.compile_backend, args.compile_mode, '--compile-backend', '--compile-mode')
        except UserError as error:
            raise SystemExit(f'error: {error}')
    return args


def build_variants(args, device: torch.device) -> List[Variant]:
    variants = []
    for name in args.models:
        torch.manual_seed(0)
        model = in_memory_format(models.create_model(name, num_classes=args.num_classes).to(device),
                                 args.channels_last)
        if hasattr(model, 'net_update_temperature'):
            model.net_update_temperature(args.temperature)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        is_kw = any(isinstance(m, KWConvNd) for m in model.modules())
        for impl in (args.impls if is_kw else [None]):
            variants.append(Variant(name, impl, model, optimizer))
            if args.compile:  # one graph per implementation, mode, dtype and batch size, all kept
                compiled = torch.compile(model, backend=args.compile_backend, mode=args.compile_mode)
                variants.append(Variant(name, impl, compiled, optimizer, compiled=True))
    if args.compile:  # room for every variant's graphs; past the limit, time nothing rather than eager code
        torch._dynamo.config.recompile_limit = 2 * len(variants) * len(args.dtypes) * len(args.batch_sizes)
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    return variants


def step_functions(variant: Variant, x: torch.Tensor, y: torch.Tensor,
                   autocast_dtype: Optional[torch.dtype]) -> Dict[str, Callable[[], None]]:
    model = variant.model

    def infer():
        model.eval()
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=autocast_dtype,
                                                    enabled=autocast_dtype is not None):
            model(x)

    return {'train': training_step(model, variant.optimizer, x, y, autocast_dtype), 'infer': infer}


def measure(args, device: torch.device, variants: List[Variant], batch: int, dtype: str) -> None:
    """Fill every variant's times (seconds per step) and peak memory for one batch size and dtype."""
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=device).contiguous(
        memory_format=memory_format(args.channels_last))
    y = torch.randint(0, args.num_classes, (batch,), device=device)
    steps = [step_functions(v, x, y, DTYPES[dtype]) for v in variants]
    for variant in variants:
        variant.times = {m: [] for m in MODES}
    for variant, fns in zip(variants, steps):
        with variant.context():
            for mode in args.modes:
                for _ in range(args.warmup):
                    fns[mode]()
    for _ in range(args.repeats):
        for variant, fns in zip(variants, steps):
            with variant.context():
                for mode in args.modes:
                    variant.times[mode].append(time_per_call(fns[mode], args.iters, device))
    peak = None if args.no_memory else peak_memory_function(device)
    for variant, fns in zip(variants, steps):
        with variant.context():
            variant.memory = {mode: peak(fns[mode]) if peak else None for mode in args.modes}


def table_rows(args, variants: List[Variant], batch: int, dtype: str) -> List[str]:
    def throughput(variant, mode):
        return batch / median(variant.times[mode]) if variant.times[mode] else None

    references = {v.model_name: v for v in variants if v.impl == 'reference' and not v.compiled}
    rows = []
    for v in variants:
        cells = [v.model_name, v.label, str(batch), dtype]
        for mode in args.modes:
            speed = throughput(v, mode)
            reference = references.get(v.model_name)
            ratio = f'{speed / throughput(reference, mode):.2f}x' if reference is not None and v.impl else '-'
            cells += [f'{speed:.1f}', ratio, format_bytes(v.memory.get(mode))]
        rows.append('| ' + ' | '.join(cells) + ' |')
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    device = setup_device(args)
    variants = build_variants(args, device)
    compile_mode = args.compile_mode or 'default'
    compile_note = f'; torch.compile ({args.compile_backend}, mode {compile_mode})' if args.compile else ''
    device_text = describe_device(device, args.keep_freed_memory)
    print(f'device: {device_text}; torch {torch.__version__}; image {args.img_size} px; '
          f'median of {args.repeats} x {args.iters} steps after {args.warmup} warm-up steps'
          f'{"; channels_last" if args.channels_last else ""}'
          f'{compile_note}\n')
    header = ['model', 'impl', 'batch', 'dtype']
    for mode in args.modes:
        header += [f'{mode} img/s', f'{mode} vs reference', f'{mode} peak mem']
    print('| ' + ' | '.join(header) + ' |')
    print('|' + '---|' * len(header))
    for batch in args.batch_sizes:
        for dtype in args.dtypes:
            measure(args, device, variants, batch, dtype)
            print('\n'.join(table_rows(args, variants, batch, dtype)), flush=True)


if __name__ == '__main__':
    main()
