"""Where a training step's time goes on a GPU: host (Python and kernel launches) or kernels.

    python benchmarks/step_profile.py --models resnet50,kw_resnet50 --dtype bf16 --batch-size 128

For each model (KW models with ``--impl``) it times an eager training step (forward,
cross-entropy, backward, SGD; CUDA-synchronised, median of ``--repeats`` x ``--iters``) and, in
the same steps, how long the host took to queue them (the time until the Python step returns). One
step under ``torch.profiler`` gives the GPU's kernel time. Two CUDA-graph columns follow: the
model's forward and backward captured by ``engine.capture_training_graph`` with the loss and the
optimizer step run eagerly (what ``main.py --cuda_graph true`` does), and the whole step captured
once and replayed (no Python and no launches per kernel at all: the throughput the kernels alone
allow). A step whose queueing time is close to its step time, with a kernel time well below it, is
bound by the host: fewer kernel launches (or CUDA graphs) help it, faster kernels do not. ``--top``
lists the kernels that took longest.
"""
import argparse
import time
from statistics import median
from typing import Callable, Dict, List, Tuple

import timm
import torch
from torch.profiler import ProfilerActivity, profile

from common import (DTYPES, add_cpu_options, build_for_training, describe_device, name_list, setup_device,
                    synchronize, training_step)

import models  # noqa: E402,F401  (registers the models with timm)
from engine import capture_training_graph  # noqa: E402
from modules.kernel_warehouse.functional import IMPLEMENTATIONS, use_implementation  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', default='resnet18,kw_resnet18')
    parser.add_argument('--impl', default='auto', help=f'KW implementation: {", ".join(IMPLEMENTATIONS)}')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--dtype', default='bf16', help='fp32, bf16, fp16 (the last two under autocast)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--channels-last', action='store_true', help='model and input in channels_last')
    parser.add_argument('--top', type=int, default=0, help='list the N kernels that took longest')
    add_cpu_options(parser)
    args = parser.parse_args(argv)
    args.models = name_list(args.models, timm.list_models(), 'model')
    name_list(args.impl, IMPLEMENTATIONS, 'implementation')
    name_list(args.dtype, DTYPES, 'dtype')
    if min(args.batch_size, args.img_size, args.iters, args.repeats) < 1 or args.warmup < 0:
        raise SystemExit('error: --batch-size, --img-size, --iters and --repeats must be >= 1, --warmup >= 0')
    return args


def time_eager(step: Callable[[], None], args, device) -> Dict[str, float]:
    steps, queued = [], []
    for _ in range(args.repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.iters):
            step()
        queued.append((time.perf_counter() - start) / args.iters)
        synchronize(device)
        steps.append((time.perf_counter() - start) / args.iters)
    return {'step': median(steps), 'queued': median(queued)}


def kernel_time(step: Callable[[], None], device, top: int) -> Tuple[float, List[str]]:
    """Seconds of GPU kernels in one step, and the ``top`` longest kernels."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        synchronize(device)
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    listing = [f'{e.self_device_time_total / 1e3:.2f} ms, {e.count} calls: {e.key[:100]}' for e in kernels[:top]]
    return sum(e.self_device_time_total for e in kernels) / 1e6, listing


def graph_step_time(model, optimizer, x, y, args, device) -> float:
    """Seconds per step of the training step captured in a CUDA graph and replayed."""
    step = training_step(model, optimizer, x, y, DTYPES[args.dtype], cache_enabled=False)  # as graphs need
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        step()
    return time_eager(graph.replay, args, device)['step']


def graphed_model_step_time(name: str, args, device) -> float:
    """Seconds per step with the model's forward and backward captured as CUDA graphs and the loss
    and optimizer step run eagerly: what ``main.py --cuda_graph true`` does."""
    model, optimizer, x, y = build_for_training(name, args, device)
    capture_training_graph(model, x, DTYPES[args.dtype])
    return time_eager(warm_step(model, optimizer, x, y, args), args, device)['step']


def warm_step(model, optimizer, x, y, args) -> Callable[[], None]:
    """The training step of ``model`` on ``(x, y)``, run ``--warmup`` times."""
    step = training_step(model, optimizer, x, y, DTYPES[args.dtype])
    for _ in range(args.warmup):
        step()
    return step


def main(argv=None) -> None:
    args = parse_args(argv)
    device = setup_device(args)
    device_text = describe_device(device, args.keep_freed_memory)
    print(f'device: {device_text}; torch {torch.__version__}; batch {args.batch_size}, '
          f'{args.img_size} px, {args.dtype}; KW models with impl {args.impl}'
          f'{"; channels_last" if args.channels_last else ""}\n')
    rows, listings = {}, {}
    # Every model's timings first, then the profiles, so that no eager step is timed after the profiler
    # ran: in one H200 session, eager steps timed that way came out 1.6x slower than benchmark.py's.
    for name in args.models:
        model, optimizer, x, y = build_for_training(name, args, device)
        with use_implementation(args.impl):
            step = warm_step(model, optimizer, x, y, args)
            eager = time_eager(step, args, device)
            graphed_model = graph = 'n/a'
            if device.type == 'cuda':
                graph = f'{args.batch_size / graph_step_time(model, optimizer, x, y, args, device):.1f}'
                del model, optimizer, step
                graphed_model = f'{args.batch_size / graphed_model_step_time(name, args, device):.1f}'
        rows[name] = [f'{eager["step"] * 1e3:.1f}', f'{eager["queued"] * 1e3:.1f}', 'n/a',
                      f'{args.batch_size / eager["step"]:.1f}', graphed_model, graph]
    if device.type == 'cuda':
        for name in args.models:
            model, optimizer, x, y = build_for_training(name, args, device)
            with use_implementation(args.impl):
                step = warm_step(model, optimizer, x, y, args)
                seconds, listings[name] = kernel_time(step, device, args.top)
            rows[name][2] = f'{seconds * 1e3:.1f}'
            del model, optimizer, step
    columns = ['model', 'eager step ms', 'host queueing ms', 'GPU kernels ms', 'eager img/s',
               'graphed model img/s', 'whole step graph img/s']
    print('| ' + ' | '.join(columns) + ' |\n|' + '---|' * len(columns))
    for name, cells in rows.items():
        print('| ' + ' | '.join([name] + cells) + ' |')
    for name, listing in listings.items():
        if listing:
            print(f'\n{name}, longest kernels:\n' + '\n'.join(f'- {line}' for line in listing))


if __name__ == '__main__':
    main()
