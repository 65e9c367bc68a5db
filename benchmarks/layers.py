"""Time every KW convolution of a model under each implementation, to tune the ``auto`` choice.

    python benchmarks/layers.py --device cpu --model kw_resnet18 --batch-size 16 --img-size 224
    python benchmarks/layers.py --device cuda --model kw_resnet50 --batch-size 128 --dtype fp16

Each KW layer is run on the input it receives inside the model (train mode, in ``--dtype``);
forward (no grad) and forward + backward are timed with the reference algorithm and each fast path
(``gemm``, ``input_mix``), ``--iters`` calls back to back (single synchronised calls on a GPU measure launch
latency, not the kernels), interleaved, median of ``--repeats``. The columns give the layer's kernel-to-input
ratio (``C_out / groups / output positions``, which ``TUNING`` in
``modules/kernel_warehouse/functional.py`` thresholds), the fastest algorithm with its speed-up
over the reference, and what ``auto`` picks with the current tuning.
"""
import argparse
import math
from statistics import median
from typing import Dict, List

import timm
import torch

from common import (DTYPES, add_cpu_options, describe_device, in_memory_format, memory_format, name_list,
                    setup_device, time_per_call)

import models  # noqa: E402  (registers the models with timm; sys.path set above)
from modules.kernel_warehouse import KWConvNd  # noqa: E402
from modules.kernel_warehouse.functional import (FAST_PATHS, choose_implementation, supports_gemm,  # noqa: E402
                                                 use_implementation)

IMPLS = ('reference',) + FAST_PATHS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='kw_resnet18')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--dtype', default='fp32', help='fp32, bf16, fp16 (the last two under autocast)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--iters', type=int, default=5, help='back-to-back calls per timing')
    parser.add_argument('--channels-last', action='store_true', help='model and input in channels_last')
    add_cpu_options(parser)
    args = parser.parse_args(argv)
    name_list(args.model, timm.list_models(), 'model')
    name_list(args.dtype, DTYPES, 'dtype')
    if args.batch_size < 2 or min(args.repeats, args.iters, args.img_size) < 1:
        raise SystemExit('error: --batch-size must be >= 2 (train-mode attention), --repeats, --iters and '
                         '--img-size >= 1')
    return args


def layer_inputs(model: torch.nn.Module, x: torch.Tensor) -> Dict[KWConvNd, torch.Tensor]:
    """The input every KW layer receives in a forward pass of ``model``."""
    inputs = {}
    hooks = [m.register_forward_hook(lambda layer, args, out: inputs.__setitem__(layer, args[0].detach()))
             for m in model.modules() if isinstance(m, KWConvNd)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def autocast_for(dtype: str, device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=DTYPES[dtype], enabled=DTYPES[dtype] is not None)


def layer_times(layer: KWConvNd, x: torch.Tensor, args, device) -> Dict[str, List[float]]:
    autocast = autocast_for(args.dtype, device)
    params = [p for p in layer.parameters()] + [layer.warehouse_manager.weights[layer.warehouse_id]]
    x_grad = x.clone().requires_grad_()

    def forward():
        with torch.no_grad(), autocast:
            layer(x)

    def forward_backward():
        with autocast:
            out = layer(x_grad)
        torch.autograd.grad(out, [x_grad] + params, torch.ones_like(out))

    times = {f'{impl} {part}': [] for impl in IMPLS for part in ('fwd', 'fwd+bwd')}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for impl in IMPLS:
            with use_implementation(impl):
                for part, fn in (('fwd', forward), ('fwd+bwd', forward_backward)):
                    seconds = time_per_call(fn, args.iters if repeat else 1, device)
                    if repeat:
                        times[f'{impl} {part}'].append(seconds)
    return times


def main(argv=None) -> None:
    args = parse_args(argv)
    device = setup_device(args)
    torch.manual_seed(0)
    model = in_memory_format(models.create_model(args.model).to(device), args.channels_last).train()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device).contiguous(
        memory_format=memory_format(args.channels_last))
    with autocast_for(args.dtype, device):  # each layer gets the dtype it sees in the model
        inputs = layer_inputs(model, x)
    device_text = describe_device(device, args.keep_freed_memory)
    print(f'device: {device_text}; torch {torch.__version__}; {args.model}, batch {args.batch_size}, '
          f'{args.img_size} px, {args.dtype}{"; channels_last" if args.channels_last else ""}; '
          f'median of {args.repeats}; times in ms\n')
    header = ['layer', 'input', 'kernel', 'stride', 'ratio'] + [f'{i} {p}' for i in IMPLS for p in ('fwd', 'fwd+bwd')]
    print('| ' + ' | '.join(header + ['fastest (fwd+bwd, vs reference)', 'auto']) + ' |')
    print('|' + '---|' * (len(header) + 2))
    totals = {key: 0.0 for key in header[5:] + ['auto fwd', 'auto fwd+bwd']}
    for name, layer in model.named_modules():
        if layer not in inputs:
            continue
        x_layer, g = inputs[layer], layer.geometry
        times = {key: median(values) * 1e3 for key, values in layer_times(layer, x_layer, args, device).items()}
        with use_implementation('auto'), autocast_for(args.dtype, device):  # the choice depends on the dtype
            auto = choose_implementation(g, x_layer)
        positions = math.prod(g.output_size(x_layer.shape[2:]))
        for key, value in times.items():
            totals[key] += value
        for part in ('fwd', 'fwd+bwd'):
            totals[f'auto {part}'] += times[f'{auto} {part}']
        fastest = min(IMPLS, key=lambda impl: times[f'{impl} fwd+bwd']) if supports_gemm(g) else 'reference'
        speedup = f'{fastest} {times["reference fwd+bwd"] / times[f"{fastest} fwd+bwd"]:.2f}x'
        cells = [name, 'x'.join(map(str, x_layer.shape)), 'x'.join(map(str, g.kernel_size)),
                 'x'.join(map(str, g.stride)), f'{g.out_planes / g.groups / positions:.2f}']
        cells += [f'{times[key]:.2f}' for key in header[5:]] + [speedup, auto]
        print('| ' + ' | '.join(cells) + ' |', flush=True)
    print('\ntotal (ms): ' + ', '.join(f'{key} {value:.1f}' for key, value in totals.items()))


if __name__ == '__main__':
    main()
