"""Train a KW model with each KW implementation from the same start and compare the loss curves.

    python benchmarks/loss_curve.py --device cpu --steps 60 --img-size 32 --dtype bf16
    python benchmarks/loss_curve.py --device cuda --steps 300 --img-size 64 --batch-size 128 --dtype fp16

Data: the DIGITS set (scikit-learn's 8x8 digits, upscaled; nothing is downloaded) in a fixed
order. Every implementation starts from the same weights and sees the same batches, with AdamW,
the KW temperature schedule of the training engine and, for ``bf16``/``fp16``, autocast (plus a
gradient scaler for fp16). Training is chaotic: rounding differences between the algorithms
(or between two GPUs) grow until single steps differ, so the curves are compared as mean losses
over windows of ``--window`` steps, with the largest difference to the first implementation's.
"""
import argparse
import copy
from typing import Dict, List

import timm
import torch
import torch.nn.functional as F
from torchvision import transforms

from common import (DTYPES, add_cpu_options, describe_device, in_memory_format, memory_format, name_list,
                    setup_device)

import models  # noqa: E402  (registers the models with timm; sys.path set above)
from datasets import Digits  # noqa: E402
from engine import get_temperature  # noqa: E402
from modules.kernel_warehouse.functional import IMPLEMENTATIONS, use_implementation  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='kw_resnet18')
    parser.add_argument('--impls', default='reference,auto', help=f'first is the baseline; {", ".join(IMPLEMENTATIONS)}')
    parser.add_argument('--steps', type=int, default=60)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('--dtype', default='fp32', help='fp32, bf16, fp16 (the last two under autocast)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--temp-steps', type=int, default=None, help='steps of temperature decay (default: half)')
    parser.add_argument('--window', type=int, default=10, help='steps per mean loss')
    parser.add_argument('--channels-last', action='store_true', help='model and images in channels_last')
    add_cpu_options(parser)
    args = parser.parse_args(argv)
    name_list(args.model, timm.list_models(), 'model')
    name_list(args.dtype, DTYPES, 'dtype')
    args.impls = name_list(args.impls, IMPLEMENTATIONS, 'implementation')
    if min(args.steps, args.img_size, args.window) < 1 or args.batch_size < 2:
        raise SystemExit('error: --steps, --img-size and --window must be >= 1 and --batch-size >= 2')
    return args


def batches(args, device: torch.device) -> List[tuple]:
    """``--steps`` batches of DIGITS in a fixed order (cycling through the training split)."""
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    dataset = Digits(train=True, image_size=args.img_size, transform=transform)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    result = []
    for step in range(args.steps):
        idx = [order[(step * args.batch_size + j) % len(order)] for j in range(args.batch_size)]
        images, labels = zip(*(dataset[i] for i in idx))
        images = torch.stack(images).to(device, memory_format=memory_format(args.channels_last))
        result.append((images, torch.tensor(labels, device=device)))
    return result


def train(model: torch.nn.Module, data: List[tuple], args, device: torch.device) -> List[float]:
    dtype = DTYPES[args.dtype]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    temp_steps = args.temp_steps or max(1, args.steps // 2)
    losses = []
    model.train()
    for step, (images, labels) in enumerate(data):
        model.net_update_temperature(get_temperature(step, 0, temp_steps, temp_epoch=1))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    return losses


def main(argv=None) -> None:
    args = parse_args(argv)
    device = setup_device(args)
    torch.manual_seed(0)
    start = models.create_model(args.model, num_classes=Digits.num_classes, drop_path_rate=0., dropout=0.).to(device)
    start = in_memory_format(start, args.channels_last)
    data = batches(args, device)
    curves: Dict[str, List[float]] = {}
    for impl in args.impls:
        with use_implementation(impl):
            curves[impl] = train(copy.deepcopy(start), data, args, device)
    windows = [range(start, min(start + args.window, args.steps)) for start in range(0, args.steps, args.window)]
    means = {impl: [sum(curve[i] for i in w) / len(w) for w in windows] for impl, curve in curves.items()}
    device_text = describe_device(device, args.keep_freed_memory)
    print(f'device: {device_text}; {args.model}, DIGITS {args.img_size} px, batch {args.batch_size}, '
          f'{args.dtype}{", channels_last" if args.channels_last else ""}, {args.steps} steps; mean loss per window\n')
    print('| steps | ' + ' | '.join(args.impls) + ' |')
    print('|' + '---|' * (len(args.impls) + 1))
    for index, window in enumerate(windows):
        print(f'| {window[0] + 1}-{window[-1] + 1} | ' + ' | '.join(f'{means[impl][index]:.4f}' for impl in args.impls)
              + ' |')
    baseline = args.impls[0]
    for impl in args.impls[1:]:
        diffs = [abs(a - b) for a, b in zip(means[impl], means[baseline])]
        print(f'\n{impl} vs {baseline}: largest difference of window means {max(diffs):.4f}; first step '
              f'{curves[impl][0]:.6f} vs {curves[baseline][0]:.6f}')


if __name__ == '__main__':
    main()
