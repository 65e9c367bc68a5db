"""Classify images with a trained (KW) model and print the top classes of each.

    python tools/predict.py --kw_config configs/resnet50/kw4x_resnet50.json --resume kw4x_resnet50.pth \\
        cat.jpg dog.png
    python tools/predict.py --kw_config configs/demo/kw1x_resnet18_digits.json \\
        --resume output/demo/kw1x_resnet18_digits/checkpoint-best.pth digit.png --topk 3

The model is built and its checkpoint loaded as ``main.py --eval`` does (main.py's model options
override the config; the temperature is the one --eval uses), and every image goes through
main.py's evaluation transform (resize, center crop, normalisation; images smaller models take
whole, e.g. 32 px, are first resized to the input size). Classes are named with --class_names,
else ImageNet's names for a 1000-class model, else by their index (for the DIGITS demo, the digit).
"""
import argparse
import sys
from pathlib import Path
from typing import Callable, List, Optional

import torch
from PIL import Image
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from anywhere without installing

import main  # noqa: E402
from datasets import build_transform, load_rgb  # noqa: E402
from utils import CheckpointError, UserError  # noqa: E402

IMAGENET_CLASSES = 1000


def class_names(args: argparse.Namespace) -> List[str]:
    """One name per model output (see the module docstring)."""
    if args.class_names is not None:
        try:
            lines = args.class_names.read_text(encoding='utf-8').splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise UserError(f'cannot read --class_names {args.class_names} ({getattr(error, "strerror", error)}); '
                            f'give a UTF-8 text file with one class name per line.') from None
        names = [line.strip() for line in lines if line.strip()]
        if len(names) != args.nb_classes:
            raise UserError(f'--class_names {args.class_names} has {len(names)} names for a model with '
                            f'{args.nb_classes} classes; give one name per line, one line per class.')
        return names
    if args.nb_classes == IMAGENET_CLASSES:
        from timm.data import ImageNetInfo  # ships with timm: nothing is downloaded
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(IMAGENET_CLASSES)]
    return [str(i) for i in range(args.nb_classes)]


def image_loader(args: argparse.Namespace) -> Callable[[str], torch.Tensor]:
    """A function from an image path to the model's input ``[1, 3, input_size, input_size]``."""
    transform = build_transform(False, args)
    size = (args.input_size, args.input_size)

    def load(path: str) -> torch.Tensor:
        image = load_rgb(path)
        tensor = transform(image)
        if tuple(tensor.shape[-2:]) != size:
            # main.py's transform keeps small inputs (CIFAR, DIGITS) at their size: they already are
            tensor = transform(image.resize(size, Image.BICUBIC))
        return tensor.unsqueeze(0)

    return load


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, topk: int) -> List[tuple]:
    """``(probability, class index)`` of the ``topk`` most probable classes of one image."""
    probabilities = model(images).float().softmax(dim=1)[0]
    values, indices = probabilities.topk(min(topk, probabilities.numel()))
    return list(zip(values.tolist(), indices.tolist()))


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=Path(__file__).name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='Also accepted: every option of main.py (python main.py --help), e.g. --kw_config, --resume, '
               '--trust_checkpoint, --model, --input_size, --nb_classes, with the same meaning.')
    parser.add_argument('images', nargs='+', metavar='IMAGE', help='image files')
    parser.add_argument('--topk', type=int, default=5, help='classes to print per image (default: 5)')
    parser.add_argument('--class_names', type=Path, default=None,
                        help='text file with one class name per line, in class index order')
    return parser


def run(argv: Optional[List[str]] = None) -> None:
    parser = get_parser()
    args = main.parse_args(argv, tool_parser=parser)
    if args.topk < 1:
        parser.error(f'--topk must be >= 1, got {args.topk}.')
    try:
        model = main.build_inference_model(args)
        names, load = class_names(args), image_loader(args)
        for path in args.images:
            top = predict(model, load(path), args.topk)
            print(path)
            for rank, (probability, index) in enumerate(top, start=1):
                print(f'  {rank}. {100 * probability:6.2f}%  {names[index]}')
    except (UserError, CheckpointError) as error:
        sys.exit(f'error: {error}')


if __name__ == '__main__':
    run()
