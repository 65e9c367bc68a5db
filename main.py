"""Train and evaluate (KernelWarehouse) ConvNets on ImageNet and friends.

    python main.py --kw_config configs/demo/kw1x_resnet18_digits.json            # the CPU demo
    torchrun --nproc_per_node=8 main.py --kw_config configs/resnet18/kw1x_resnet18.json \\
        --data_path /path/to/imagenet --batch_size 128 --update_freq 4 --output_dir out/kw1x_r18
    python main.py --kw_config configs/resnet18/kw1x_resnet18.json --eval true --resume ckpt.pth \\
        --data_path /path/to/imagenet

``--kw_config FILE`` supplies option defaults (the released JSON configs); explicit flags win.
"""
import argparse
import datetime
import difflib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.backends.cudnn as cudnn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler, SequentialSampler

import models
import utils
from datasets import DATA_SETS, build_dataset
from engine import evaluate, get_temperature, train_one_epoch
from optim_factory import create_optimizer
from utils import CheckpointError, UserError, str2bool

AMP_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('KernelWarehouse training and evaluation', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add('--kw_config', default=None, type=str, help='JSON file of option defaults; explicit flags override it')
    add('--batch_size', default=64, type=int, help='per-process batch size')
    add('--epochs', default=300, type=int)
    add('--update_freq', default=1, type=int, help='gradient accumulation steps')

    group = parser.add_argument_group('model')
    group.add_argument('--model', default='convnext_tiny', type=str, help='model name (see README)')
    group.add_argument('--drop_path', type=float, default=0, help='stochastic depth rate')
    group.add_argument('--dropout', type=float, default=None, help='dropout before the classifier (default: model\'s)')
    group.add_argument('--input_size', default=224, type=int, help='image size')
    group.add_argument('--patch_size', default=None, type=int, help='ViT patch size (default: the model\'s)')
    group.add_argument('--layer_scale_init_value', default=1e-6, type=float, help='ConvNeXt layer scale init')
    group.add_argument('--model_ema', type=str2bool, default=False)
    group.add_argument('--model_ema_decay', type=float, default=0.9999)
    group.add_argument('--model_ema_force_cpu', type=str2bool, default=False)
    group.add_argument('--model_ema_eval', type=str2bool, default=False, help='also evaluate the EMA model')

    group = parser.add_argument_group('KernelWarehouse (unset: the model\'s default)')
    group.add_argument('--reduction', type=float, default=None, help='attention width / input channels')
    group.add_argument('--cell_num_ratio', type=float, default=None, help='cells relative to mixtures (1/4x .. 4x)')
    group.add_argument('--cell_inplane_ratio', type=float, default=None)
    group.add_argument('--cell_outplane_ratio', type=float, default=None)
    group.add_argument('--sharing_range', type=str, nargs='+', default=None,
                       help='warehouse sharing prefixes, e.g. layer conv (or layer_conv)')
    group.add_argument('--nonlocal_basis_ratio', type=float, default=None)
    group.add_argument('--temp_epoch', type=float, default=20, help='epochs of temperature decay')
    group.add_argument('--temp_init_value', type=float, default=1.0, help='initial temperature')

    group = parser.add_argument_group('optimization')
    group.add_argument('--opt', default='adamw', type=str, help='optimizer (timm name)')
    group.add_argument('--opt_eps', default=1e-8, type=float)
    group.add_argument('--opt_betas', default=None, type=float, nargs='+')
    group.add_argument('--clip_grad', type=float, default=None, help='gradient norm clipping (default: off)')
    group.add_argument('--momentum', type=float, default=0.9)
    group.add_argument('--weight_decay', type=float, default=0.05)
    group.add_argument('--weight_decay_end', type=float, default=None, help='final weight decay (cosine)')
    group.add_argument('--lr', type=float, default=4e-3, help='peak learning rate (for the total batch)')
    group.add_argument('--layer_decay', type=float, default=1.0, help='layer-wise lr decay (ConvNeXt models)')
    group.add_argument('--min_lr', type=float, default=1e-6)
    group.add_argument('--warmup_epochs', type=int, default=20)
    group.add_argument('--warmup_steps', type=int, default=-1, help='overrides --warmup_epochs when > 0')

    group = parser.add_argument_group('augmentation')
    group.add_argument('--color_jitter', type=float, default=0.4)
    group.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', help='timm auto-augment policy')
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    group.add_argument('--train_interpolation', type=str, default='bicubic')
    group.add_argument('--traditional_preprocess', type=str2bool, default=False,
                       help='random-resized-crop + flip / resize + center crop instead of timm\'s pipeline')
    group.add_argument('--crop_pct', type=float, default=None)
    group.add_argument('--reprob', type=float, default=0.25, help='random erase probability')
    group.add_argument('--remode', type=str, default='pixel')
    group.add_argument('--recount', type=int, default=1)
    group.add_argument('--resplit', type=str2bool, default=False)
    group.add_argument('--mixup', type=float, default=0.8)
    group.add_argument('--cutmix', type=float, default=1.0)
    group.add_argument('--cutmix_minmax', type=float, nargs='+', default=None)
    group.add_argument('--mixup_prob', type=float, default=1.0)
    group.add_argument('--mixup_switch_prob', type=float, default=0.5)
    group.add_argument('--mixup_mode', type=str, default='batch', choices=['batch', 'pair', 'elem'])

    group = parser.add_argument_group('fine-tuning')
    group.add_argument('--finetune', default='', help='initialise from this checkpoint (classifier may differ)')
    group.add_argument('--head_init_scale', default=1.0, type=float)
    group.add_argument('--model_key', default='model|module', type=str, help='where checkpoints keep the weights')
    group.add_argument('--model_prefix', default='', type=str)

    group = parser.add_argument_group('data')
    group.add_argument('--data_path', default='/datasets01/imagenet_full_size/061417/', type=str)
    group.add_argument('--eval_data_path', default=None, type=str)
    group.add_argument('--nb_classes', default=1000, type=int, help='classes (FAKE; others read it from the data)')
    group.add_argument('--imagenet_default_mean_and_std', type=str2bool, default=True)
    group.add_argument('--data_set', default='IMNET', choices=DATA_SETS, type=str)
    group.add_argument('--train_samples', default=None, type=int, help='use only this many training images')
    group.add_argument('--val_samples', default=None, type=int, help='use only this many validation images')
    group.add_argument('--num_workers', default=10, type=int)
    group.add_argument('--pin_mem', type=str2bool, default=True)

    group = parser.add_argument_group('run')
    group.add_argument('--output_dir', default='', help='where checkpoints and log.txt go (empty: nowhere)')
    group.add_argument('--log_dir', default=None, help='tensorboard folder')
    group.add_argument('--device', default='cuda', help='cuda, cuda:N or cpu (cuda falls back to cpu)')
    group.add_argument('--seed', default=0, type=int)
    group.add_argument('--resume', default='', help='resume training from this checkpoint')
    group.add_argument('--auto_resume', type=str2bool, default=True, help='resume from the newest checkpoint in output_dir')
    group.add_argument('--save_ckpt', type=str2bool, default=True)
    group.add_argument('--save_ckpt_freq', default=1, type=int)
    group.add_argument('--save_ckpt_num', default=3, type=int, help='numbered checkpoints to keep')
    group.add_argument('--start_epoch', default=0, type=int)
    group.add_argument('--eval', type=str2bool, default=False, help='only evaluate')
    group.add_argument('--dist_eval', type=str2bool, default=True,
                       help='accepted for compatibility: distributed evaluation is always sharded exactly')
    group.add_argument('--disable_eval', type=str2bool, default=False, help='no evaluation during training')
    group.add_argument('--print_freq', default=10, type=int, help='log every N iterations')
    group.add_argument('--use_amp', type=str2bool, default=False, help='automatic mixed precision')
    group.add_argument('--amp_dtype', default='float16', choices=sorted(AMP_DTYPES))
    group.add_argument('--trust_checkpoint', type=str2bool, default=False,
                       help='allow checkpoints that need arbitrary code to load (only from trusted sources)')

    group = parser.add_argument_group('distributed (set by torchrun)')
    group.add_argument('--world_size', default=1, type=int)
    group.add_argument('--local_rank', '--local-rank', default=-1, type=int)
    group.add_argument('--dist_url', default='env://')
    return parser


# ----------------------------------------------------------------------------------------------
# Options: the config file, validation
# ----------------------------------------------------------------------------------------------

def _config_value(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """A config value checked against the option's type; raises UserError naming key and file."""
    def check(item: Any) -> Any:
        if action.type is str2bool:
            ok = isinstance(item, bool) or (isinstance(item, str) and item.lower() in ('true', 'false'))
            expected = 'true or false'
        elif action.type is int:
            ok, expected = isinstance(item, int) and not isinstance(item, bool), 'an integer'
        elif action.type is float:
            ok, expected = isinstance(item, (int, float)) and not isinstance(item, bool), 'a number'
        else:
            ok, expected = isinstance(item, str), 'a string'
        if ok and action.choices is not None and item not in action.choices:
            ok, expected = False, f'one of {", ".join(map(str, action.choices))}'
        if not ok:
            raise UserError(f'{path}: "{key}" must be {expected}, got {json.dumps(value)}.')
        if action.type is str2bool:
            return str2bool(item)
        return float(item) if action.type is float else item

    if value is None:
        if action.default is None or action.type is str:
            return None
        raise UserError(f'{path}: "{key}" must be set (null is not allowed for it).')
    if action.nargs in ('+', '*'):
        return [check(item) for item in (value if isinstance(value, list) else [value])]
    return check(value)


def load_config_defaults(parser: argparse.ArgumentParser, path: str) -> Dict[str, Any]:
    """Option defaults from a JSON config; unknown keys and wrong types are errors."""
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f'config file {path} does not exist; check --kw_config.') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f'config file {path} is not valid JSON ({error}).') from None
    if not isinstance(config, dict):
        raise UserError(f'config file {path} must hold a JSON object of option names and values.')
    actions = {action.dest: action for action in parser._actions if action.dest not in ('help', 'kw_config')}
    defaults = {}
    for key, value in config.items():
        if key not in actions:
            close = difflib.get_close_matches(key, list(actions), n=1)
            hint = f'; did you mean "{close[0]}"?' if close else '; see python main.py --help.'
            raise UserError(f'{path}: unknown option "{key}"{hint}')
        defaults[key] = _config_value(actions[key], key, value, path)
    return defaults


def check_args(args: argparse.Namespace) -> None:
    """Impossible values are errors before anything runs."""
    if args.model not in models.MODEL_NAMES:
        raise UserError(f'unknown model {args.model!r}; known models: {", ".join(models.MODEL_NAMES)}.')
    positive = ['lr', 'batch_size', 'epochs', 'update_freq', 'input_size', 'nb_classes', 'save_ckpt_freq',
                'save_ckpt_num', 'print_freq', 'model_ema_decay', 'reduction', 'cell_num_ratio',
                'cell_inplane_ratio', 'cell_outplane_ratio', 'nonlocal_basis_ratio', 'train_samples', 'val_samples']
    for name in positive:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UserError(f'--{name} must be > 0, got {value}.')
    non_negative = ['min_lr', 'weight_decay', 'weight_decay_end', 'warmup_epochs', 'temp_epoch', 'num_workers',
                    'mixup', 'cutmix', 'color_jitter', 'clip_grad', 'start_epoch']
    for name in non_negative:
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UserError(f'--{name} must be >= 0, got {value}.')
    for name in ['drop_path', 'dropout', 'smoothing', 'reprob', 'mixup_prob', 'mixup_switch_prob']:
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1:
            raise UserError(f'--{name} must be between 0 and 1, got {value}.')
    if not (args.device == 'cpu' or args.device.split(':')[0] == 'cuda'):
        raise UserError(f'--device must be cpu, cuda or cuda:N, got {args.device!r}.')
    if args.eval and not args.resume and not args.finetune:
        raise UserError('--eval true needs the weights to evaluate: add --resume CHECKPOINT.')
    if uses_mixup(args) and args.mixup_mode == 'batch' and args.batch_size % 2:
        raise UserError(f'--batch_size must be even with mixup/cutmix in batch mode, got {args.batch_size}.')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command line over config file over built-in defaults."""
    parser = get_args_parser()
    known, _ = parser.parse_known_args(argv)
    try:
        if known.kw_config:
            parser.set_defaults(**load_config_defaults(parser, known.kw_config))
        args = parser.parse_args(argv)
        if args.sharing_range is not None:  # "layer_conv" and "layer conv" mean the same
            args.sharing_range = '_'.join(args.sharing_range)
        if args.aa is not None and args.aa.lower() in ('', 'none'):  # --aa none: no auto-augment
            args.aa = None
        check_args(args)
    except UserError as error:
        parser.error(str(error))
    return args


# ----------------------------------------------------------------------------------------------
# Building blocks of a run
# ----------------------------------------------------------------------------------------------

def uses_mixup(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


class ShardSampler(Sampler):
    """Every ``world_size``-th index starting at ``rank``: the shards cover the dataset exactly once
    (unlike DistributedSampler, which repeats samples to even the shards out)."""

    def __init__(self, dataset_size: int, rank: int, world_size: int):
        self.indices = range(rank, dataset_size, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loaders(args: argparse.Namespace):
    """Datasets, samplers and loaders; sets ``args.nb_classes`` from the data."""
    dataset_train = dataset_val = None
    class_counts = set()
    if not args.eval:
        dataset_train, num_classes = build_dataset(True, args)
        class_counts.add(num_classes)
    if args.eval or not args.disable_eval:
        dataset_val, num_classes = build_dataset(False, args)
        class_counts.add(num_classes)
    if len(class_counts) > 1:
        raise UserError(f'the training and validation data have different numbers of classes '
                        f'({sorted(class_counts)}); check --data_path and --eval_data_path.')
    args.nb_classes = class_counts.pop()
    rank, world_size = utils.get_rank(), utils.get_world_size()
    loader_args = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and args.device.startswith('cuda'))
    loader_train = loader_val = sampler_train = None
    if dataset_train is not None:
        if len(dataset_train) < args.batch_size * world_size:
            raise UserError(f'{len(dataset_train)} training images are fewer than one batch '
                            f'({args.batch_size} x {world_size} processes); lower --batch_size.')
        # seeded shuffling, also in a single process: the data order depends only on seed and epoch
        sampler_train = DistributedSampler(dataset_train, num_replicas=world_size, rank=rank, shuffle=True,
                                           seed=args.seed)
        loader_train = DataLoader(dataset_train, sampler=sampler_train, batch_size=args.batch_size,
                                  drop_last=True, **loader_args)
    if dataset_val is not None:
        sampler_val = ShardSampler(len(dataset_val), rank, world_size) if args.distributed else \
            SequentialSampler(dataset_val)
        loader_val = DataLoader(dataset_val, sampler=sampler_val, batch_size=int(1.5 * args.batch_size),
                                drop_last=False, **loader_args)
    return loader_train, sampler_train, loader_val


def build_model(args: argparse.Namespace) -> nn.Module:
    model = models.create_model_from_config(vars(args))
    if args.finetune:
        load_finetune_weights(model, args)
    return model


def load_checkpoint(path: str, args: argparse.Namespace):
    """A checkpoint file and its weights (looked up under ``--model_key``, then the usual places)."""
    checkpoint = utils.load_checkpoint_file(path, trust=args.trust_checkpoint)
    keys = dict.fromkeys([k for k in args.model_key.split('|') if k] + list(utils.STATE_DICT_KEYS))
    state_dict = utils.extract_state_dict(checkpoint, keys=list(keys), prefix=args.model_prefix,
                                          source=f'checkpoint {path}')
    return checkpoint, state_dict


def load_finetune_weights(model: nn.Module, args: argparse.Namespace) -> None:
    """Initialise from ``--finetune``; a classifier of another size is left at its initialisation."""
    _, state_dict = load_checkpoint(args.finetune, args)
    model_state = model.state_dict()
    dropped = [k for k in sorted(models.classifier_state_keys(model))
               if k in state_dict and state_dict[k].shape != model_state[k].shape]
    for key in dropped:
        print(f'Not loading {key} from the fine-tuning checkpoint: its shape differs (another number of classes)')
        del state_dict[key]
    utils.load_model_weights(model, state_dict, source=f'--finetune {args.finetune}', ignore_missing=dropped)


def build_criterion(args: argparse.Namespace) -> nn.Module:
    if uses_mixup(args):
        return SoftTargetCrossEntropy()  # smoothing is applied inside the mixup targets
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def build_mixup(args: argparse.Namespace) -> Optional[Mixup]:
    if not uses_mixup(args):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=args.nb_classes)


class RunState:
    """Model, optimizer, scaler and EMA of a run, saved to and restored from checkpoints."""

    def __init__(self, args, model, optimizer, scaler, model_ema):
        self.args, self.model, self.optimizer, self.scaler, self.model_ema = args, model, optimizer, scaler, model_ema
        # the attention temperature the weights were last trained at; evaluation uses it
        self.temperature = 0.0

    def save(self, epoch: int, name: str) -> None:
        if not utils.is_main_process():
            return
        checkpoint = {'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(), 'epoch': epoch,
                      'scaler': self.scaler.state_dict(), 'args': self.args, 'temperature': self.temperature}
        if self.model_ema is not None:
            checkpoint['model_ema'] = self.model_ema.module.state_dict()
        output_dir = Path(self.args.output_dir)
        utils.save_checkpoint(checkpoint, output_dir / f'checkpoint-{name}.pth')
        for _, old in utils.numbered_checkpoints(output_dir)[:-self.args.save_ckpt_num]:
            old.unlink(missing_ok=True)

    def resume(self, path: str) -> None:
        """Load weights (all that ``--eval`` needs) and, for training, the optimizer, scaler, EMA and epoch."""
        args = self.args
        checkpoint, state_dict = load_checkpoint(path, args)
        utils.load_model_weights(self.model, state_dict, source=f'--resume {path}')
        # released checkpoints carry no temperature: they are fully trained (temperature 0)
        self.temperature = float(checkpoint.get('temperature', 0.0)) if isinstance(checkpoint, dict) else 0.0
        print(f'Resumed weights from {path}')
        if args.eval or not isinstance(checkpoint.get('epoch'), int) or 'optimizer' not in checkpoint:
            return
        self.optimizer.load_state_dict(checkpoint['optimizer'])
        if 'scaler' in checkpoint:
            self.scaler.load_state_dict(checkpoint['scaler'])
        if self.model_ema is not None and 'model_ema' in checkpoint:
            self.model_ema.module.load_state_dict(checkpoint['model_ema'])
        args.start_epoch = checkpoint['epoch'] + 1
        print(f'Continuing training at epoch {args.start_epoch}')


def resolve_device(args: argparse.Namespace) -> None:
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        print('CUDA is not available: running on the CPU (use --device cpu to silence this).')
        args.device = 'cpu'


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> Dict[str, float]:
    resolve_device(args)
    utils.init_distributed_mode(args)
    device = torch.device(args.device)
    seed_everything(args.seed + utils.get_rank())
    cudnn.benchmark = True

    loader_train, sampler_train, loader_val = build_loaders(args)
    model = build_model(args).to(device)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, device='cpu' if args.model_ema_force_cpu else None)
    model_without_ddp = model
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if args.gpu is not None else None)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    amp_dtype = AMP_DTYPES[args.amp_dtype] if args.use_amp else None
    optimizer = create_optimizer(args, model_without_ddp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    state = RunState(args, model_without_ddp, optimizer, scaler, model_ema)

    output_dir = Path(args.output_dir) if args.output_dir else None
    if args.auto_resume and not args.resume and output_dir is not None:
        found = utils.numbered_checkpoints(output_dir)
        if found:
            args.resume = str(found[-1][1])
    if args.resume:
        state.resume(args.resume)
    print(f'Model {args.model}: {n_parameters / 1e6:.2f}M parameters, {args.nb_classes} classes')

    if args.eval:
        return evaluate(loader_val, model, device, amp_dtype, args.print_freq, state.temperature)

    # everything is checked: from here on the run writes its outputs
    log_writer = None
    if utils.is_main_process():
        if output_dir is not None:
            output_dir.mkdir(parents=True, exist_ok=True)
        if args.log_dir:
            from tensorboardX import SummaryWriter
            log_writer = SummaryWriter(logdir=args.log_dir)

    total_batch = args.batch_size * args.update_freq * utils.get_world_size()
    steps_per_epoch = len(loader_train) // args.update_freq
    print(f'Total batch {total_batch}, {steps_per_epoch} optimizer steps per epoch, lr {args.lr}')
    lr_schedule = utils.cosine_scheduler(args.lr, args.min_lr, args.epochs, steps_per_epoch,
                                         args.warmup_epochs, warmup_steps=args.warmup_steps)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_schedule = utils.cosine_scheduler(args.weight_decay, wd_end, args.epochs, steps_per_epoch)
    criterion = build_criterion(args)
    mixup_fn = build_mixup(args)

    def temperature_fn(epoch: int, data_iter_step: int) -> float:
        return get_temperature(data_iter_step, epoch, len(loader_train), args.temp_epoch, args.temp_init_value)

    max_accuracy, max_accuracy_ema = 0.0, 0.0
    test_stats: Dict[str, float] = {}
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        sampler_train.set_epoch(epoch)
        train_stats = train_one_epoch(
            model, criterion, loader_train, optimizer, device, epoch, scaler, amp_dtype, args.update_freq,
            args.clip_grad, model_ema, mixup_fn, log_writer, lr_schedule, wd_schedule, temperature_fn,
            args.print_freq)
        state.temperature = train_stats['temperature']
        if output_dir is not None and args.save_ckpt and (
                (epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs):
            state.save(epoch, str(epoch))
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()}}
        if loader_val is not None:
            test_stats = evaluate(loader_val, model, device, amp_dtype, args.print_freq, state.temperature)
            if test_stats['acc1'] > max_accuracy:
                max_accuracy = test_stats['acc1']
                if output_dir is not None and args.save_ckpt:
                    state.save(epoch, 'best')
            print(f'Max accuracy: {max_accuracy:.2f}%')
            log_stats.update({f'test_{k}': v for k, v in test_stats.items()})
            if model_ema is not None and args.model_ema_eval:
                ema_stats = evaluate(loader_val, model_ema.module, device, amp_dtype, args.print_freq,
                                     state.temperature)
                max_accuracy_ema = max(max_accuracy_ema, ema_stats['acc1'])
                print(f'Max EMA accuracy: {max_accuracy_ema:.2f}%')
                log_stats.update({f'test_ema_{k}': v for k, v in ema_stats.items()})
            if log_writer is not None:
                for key in ('acc1', 'acc5', 'loss'):
                    log_writer.add_scalar(f'test/{key}', test_stats[key], epoch)
        log_stats.update(epoch=epoch, n_parameters=n_parameters)
        if output_dir is not None and utils.is_main_process():
            utils.append_json_line(output_dir / 'log.txt', log_stats)
        if log_writer is not None:
            log_writer.flush()
    print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    return test_stats


def run(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    try:
        main(args)
    except (UserError, CheckpointError) as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(1)
    finally:
        if utils.is_dist():
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    run()
