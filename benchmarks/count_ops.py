"""Count the operators a training step dispatches: a device-free measure of launch overhead.

    python benchmarks/count_ops.py --models resnet50,kw_resnet50 --dtype bf16 --channels-last

An eager GPU step of a KW model is bound by the host (``step_profile.py``): every operator costs
Python and dispatcher time, and every one that computes (not a view) launches at least one kernel.
This script runs one training step (forward, cross-entropy, backward; on the CPU, small inputs,
after one untimed step) under a ``TorchDispatchMode`` and prints how many operators it dispatched,
how many of them compute, and per KW convolution. The operator sequence is the one a GPU runs,
except where a CPU kernel differs (e.g. the CPU splits a strided ``baddbmm_`` itself). ``--top``
lists the most frequent operators.
"""
import argparse
from collections import Counter

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from common import DTYPES, build_for_training, name_list, training_step

import models  # noqa: E402,F401  (registers the models with timm)
from modules.kernel_warehouse import KWConvNd  # noqa: E402
from modules.kernel_warehouse.functional import IMPLEMENTATIONS, use_implementation  # noqa: E402


class OperatorCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched inside the block, by name, and notes which are views."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()
        self.views = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] += 1
        returns = func._schema.returns
        if returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write:
            self.views.add(name)  # aliases its input without writing: no kernel runs
        return func(*args, **(kwargs or {}))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', default='resnet50,kw_resnet50')
    parser.add_argument('--impl', default='gemm', help=f'KW implementation: {", ".join(IMPLEMENTATIONS)} '
                        '(default gemm, what a GPU runs at batch 32 and more)')
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--dtype', default='bf16', help='fp32, bf16, fp16 (the last two under autocast)')
    parser.add_argument('--channels-last', action='store_true', help='model and input in channels_last')
    parser.add_argument('--top', type=int, default=0, help='list the N most frequent operators')
    args = parser.parse_args(argv)
    args.models = name_list(args.models, timm.list_models(), 'model')
    name_list(args.impl, IMPLEMENTATIONS, 'implementation')
    name_list(args.dtype, DTYPES, 'dtype')
    if min(args.batch_size, args.img_size) < 1:
        raise SystemExit('error: --batch-size and --img-size must be >= 1')
    return args


def count_step(name: str, args):
    """The operator counter of one training step of model ``name``, and its number of KW convolutions."""
    model, optimizer, x, y = build_for_training(name, args, torch.device('cpu'))
    step = training_step(model, optimizer, x, y, DTYPES[args.dtype])
    with use_implementation(args.impl):
        step()  # optimizer state and lazy initialisation out of the way
        counter = OperatorCounter()
        with counter:
            step()
    return counter, sum(isinstance(m, KWConvNd) for m in model.modules())


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f'one training step (SGD with momentum) at batch {args.batch_size}, {args.img_size} px, {args.dtype}'
          f'{", channels_last" if args.channels_last else ""}; KW implementation {args.impl}\n')
    print('| model | operators | computing (not views) | KW convolutions | computing per KW convolution |')
    print('|---|---|---|---|---|')
    counters = {}
    for name in args.models:
        counter, kw_layers = counters[name] = count_step(name, args)
        computing = sum(n for op, n in counter.counts.items() if op not in counter.views)
        per_layer = f'{computing / kw_layers:.1f}' if kw_layers else '-'
        print(f'| {name} | {sum(counter.counts.values())} | {computing} | {kw_layers} | {per_layer} |')
    for name, (counter, _) in counters.items():
        if args.top:
            print(f'\n{name}: ' + ', '.join(f'{op}{" (view)" if op in counter.views else ""} {n}'
                                            for op, n in counter.counts.most_common(args.top)))


if __name__ == '__main__':
    main()
