"""Datasets and transforms: IMNET, image_folder, CIFAR (100), and the file-free DIGITS and FAKE.

``build_dataset(is_train, args)`` returns ``(dataset, num_classes)``. Missing or empty data folders
raise :class:`utils.UserError` with the fix, before anything is written.
"""
import argparse
import itertools
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Tuple

import numpy as np
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.data import create_transform
from timm.data.auto_augment import AugMixAugment, AugmentOp, AutoAugment, RandAugment
from timm.data.auto_augment import posterize as timm_posterize
from torch.utils.data import Dataset, DistributedSampler, Sampler, Subset
from torchvision import datasets, transforms

from utils import UserError

DATA_SETS = ('IMNET', 'image_folder', 'CIFAR', 'DIGITS', 'FAKE')
# FAKE: random images for throughput checks (sizes unless --train_samples / --val_samples say otherwise)
FAKE_TRAIN_SIZE, FAKE_VAL_SIZE = 1280, 256


class Digits(Dataset):
    """The handwritten digits that ship with scikit-learn: 1,797 8x8 images of 10 classes.

    Split deterministically (a fixed permutation; 20% validation), upscaled to ``image_size`` and
    returned as RGB PIL images so the usual transforms apply.
    """
    num_classes = 10

    def __init__(self, train: bool, image_size: int, transform: Optional[Callable] = None,
                 val_fraction: float = 0.2):
        from sklearn.datasets import load_digits  # imported here: only this dataset needs scikit-learn
        digits = load_digits()
        order = np.random.RandomState(0).permutation(len(digits.target))
        num_val = int(round(len(order) * val_fraction))
        keep = order[num_val:] if train else order[:num_val]
        self.images = (digits.images[keep] * (255.0 / 16.0)).round().astype(np.uint8)
        self.targets = digits.target[keep].tolist()
        self.image_size = image_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index], mode='L')
        image = image.resize((self.image_size, self.image_size), Image.BILINEAR).convert('RGB')
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def _normalisation(args: argparse.Namespace) -> Tuple[tuple, tuple]:
    if args.imagenet_default_mean_and_std:
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, also when it keeps no bits: then a black image, as Pillow < 13 made it.

    RandAugment's increasing posterize keeps ``4 - magnitude * 4 / 10`` bits, none at the largest
    magnitude, which ``rand-m9-mstd0.5`` samples for about 1 image in 700; Pillow 13 raises a
    ValueError there, older Pillow (which the original release trained with) blacked the image.
    Guarding the op keeps that behaviour on any Pillow, where pinning an old Pillow would hold back
    every other package that needs a current one.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # every bit masked off: zeros in every band
    return timm_posterize(img, bits_to_keep, **kwargs)


def _augment_ops(transform: Callable) -> Iterable[AugmentOp]:
    """The ops of the auto-augmentation policies (RandAugment, AutoAugment, AugMix) in ``transform``."""
    for step in getattr(transform, 'transforms', [transform]):
        if isinstance(step, (RandAugment, AugMixAugment)):
            yield from step.ops
        elif isinstance(step, AutoAugment):
            for sub_policy in step.policy:
                yield from sub_policy


def guard_posterize(transform: Callable) -> Callable:
    """``transform`` with its auto-augmentation's posterize ops made safe for 0 bits (in place)."""
    for op in _augment_ops(transform):
        if op.aug_fn is timm_posterize:
            op.aug_fn = posterize_any_bits
    return transform


def build_transform(is_train: bool, args: argparse.Namespace) -> Callable:
    """timm's augmentation (RandAugment, random erasing, ...) or, with ``--traditional_preprocess``,
    random-resized-crop + flip for training and resize + center crop for evaluation."""
    mean, std = _normalisation(args)
    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    if args.traditional_preprocess:
        if is_train:
            return transforms.Compose([transforms.RandomResizedCrop(args.input_size),
                                       transforms.RandomHorizontalFlip(), *normalize])
        return transforms.Compose([transforms.Resize(int(args.input_size / 0.875)),
                                   transforms.CenterCrop(args.input_size), *normalize])
    resize_im = args.input_size > 32
    if is_train:
        transform = create_transform(
            input_size=args.input_size, is_training=True, color_jitter=args.color_jitter, auto_augment=args.aa,
            interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode,
            re_count=args.recount, mean=mean, std=std)
        if not resize_im:  # small images: pad-and-crop instead of a random resized crop
            transform.transforms[0] = transforms.RandomCrop(args.input_size, padding=4)
        return guard_posterize(transform)
    steps = []
    if resize_im:
        if args.input_size >= 384:
            steps.append(transforms.Resize((args.input_size, args.input_size),
                                           interpolation=transforms.InterpolationMode.BICUBIC))
        else:
            crop_pct = args.crop_pct if args.crop_pct is not None else 224 / 256
            steps.append(transforms.Resize(int(args.input_size / crop_pct),
                                           interpolation=transforms.InterpolationMode.BICUBIC))
            steps.append(transforms.CenterCrop(args.input_size))
    return transforms.Compose(steps + normalize)


def load_rgb(path: str) -> Image.Image:
    """An image file as RGB; an unreadable file is reported with its path."""
    try:
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f'cannot read image {path} ({error}); remove or replace the file.') from None


def _image_folder(root: Path, what: str, option: str, transform: Callable) -> datasets.ImageFolder:
    if not root.is_dir():
        raise UserError(f'{what} folder {root} does not exist; set {option} to a folder of class sub-folders.')
    try:
        return datasets.ImageFolder(str(root), transform=transform, loader=load_rgb)
    except FileNotFoundError as error:  # no class folder, or a class folder without images
        raise UserError(f'{what} folder {root} is not usable: {error}; every class needs its own '
                        f'sub-folder with at least one image.') from None


def _cifar100(root: Path, train: bool, transform: Callable) -> Dataset:
    try:
        return datasets.CIFAR100(str(root), train=train, transform=transform, download=False)
    except RuntimeError:
        raise UserError(f'CIFAR-100 was not found in {root}: put the extracted "cifar-100-python" folder '
                        f'there (https://www.cs.toronto.edu/~kriz/cifar.html) and set --data_path.') from None


def _subset(dataset: Dataset, limit: Optional[int]) -> Dataset:
    """The first ``limit`` samples (for quick runs); the whole dataset when ``limit`` is None."""
    if limit is None or limit >= len(dataset):
        return dataset
    return Subset(dataset, range(limit))


def build_dataset(is_train: bool, args: argparse.Namespace) -> Tuple[Dataset, int]:
    """The training (``is_train``) or validation split of ``args.data_set`` and its class count."""
    transform = build_transform(is_train, args)
    split = 'train' if is_train else 'val'
    data_path = Path(args.data_path)
    if args.data_set == 'IMNET':
        dataset = _image_folder(data_path / split, f'ImageNet {split}', '--data_path', transform)
        num_classes = 1000
    elif args.data_set == 'image_folder':
        root = data_path if is_train else Path(args.eval_data_path or '')
        option = '--data_path' if is_train else '--eval_data_path'
        dataset = _image_folder(root, f'{split} image', option, transform)
        num_classes = len(dataset.classes)
    elif args.data_set == 'CIFAR':
        dataset, num_classes = _cifar100(data_path, is_train, transform), 100
    elif args.data_set == 'DIGITS':
        dataset, num_classes = Digits(is_train, args.input_size, transform), Digits.num_classes
    elif args.data_set == 'FAKE':
        size = (args.train_samples or FAKE_TRAIN_SIZE) if is_train else (args.val_samples or FAKE_VAL_SIZE)
        num_classes = args.nb_classes
        # different offsets: validation images are not training images
        dataset = datasets.FakeData(size, (3, args.input_size, args.input_size), num_classes, transform,
                                    random_offset=0 if is_train else 10 ** 6)
    else:
        raise UserError(f'unknown --data_set {args.data_set!r}; choose one of {", ".join(DATA_SETS)}.')
    if len(dataset) == 0:
        raise UserError(f'the {split} split of {args.data_set} is empty; check --data_path.')
    return _subset(dataset, args.train_samples if is_train else args.val_samples), num_classes



class EpochSampler(DistributedSampler):
    """Seeded shuffling that depends only on the seed and the epoch, sharded over processes, and
    able to start an epoch part-way (``set_epoch(epoch, start_index)``) to resume mid-epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_index = start_index

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start_index, None)

    def __len__(self) -> int:
        return self.num_samples - self.start_index


class ShardSampler(Sampler):
    """Every ``world_size``-th index starting at ``rank``: the shards cover the dataset exactly once
    (unlike DistributedSampler, which repeats samples to even the shards out)."""

    def __init__(self, dataset_size: int, rank: int, world_size: int):
        self.indices = range(rank, dataset_size, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
