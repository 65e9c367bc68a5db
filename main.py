"""Train and evaluate (KernelWarehouse) ConvNets on ImageNet and friends.

    python main.py --kw_config configs/demo/kw1x_resnet18_digits.json            # the CPU demo
    torchrun --nproc_per_node=8 main.py --kw_config configs/resnet18/kw1x_resnet18.json \\
        --data_path /path/to/imagenet --batch_size 128 --update_freq 4 --output_dir out/kw1x_r18
    python main.py --kw_config configs/resnet18/kw1x_resnet18.json --eval true --resume ckpt.pth \\
        --data_path /path/to/imagenet
    python main.py --model efficientnet_b0 --kw_convert true --cell_num_ratio 1 ...   # any timm CNN

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
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import timm
import torch
import torch.backends.cudnn as cudnn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler

import models
import utils
from datasets import DATA_SETS, EpochSampler, ShardSampler, build_dataset
from engine import NonFiniteLossError, capture_training_graph, evaluate, get_temperature, train_one_epoch
from optim_factory import create_optimizer, optimizer_state_from_original
from utils import CheckpointError, UserError, str2bool

AMP_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('KernelWarehouse training and evaluation', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, add_help=add_help)
    add = parser.add_argument
    add('--kw_config', default=None, type=str, help='JSON file of option defaults; explicit flags override it')
    add('--batch_size', default=64, type=int, help='per-process batch size')
    add('--epochs', default=300, type=int)
    add('--update_freq', default=1, type=int, help='gradient accumulation steps')

    group = parser.add_argument_group('model')
    group.add_argument('--model', default='convnext_tiny', type=str, help='model name (see docs/models.md)')
    group.add_argument('--drop_path', type=float, default=models.CONFIG_DEFAULTS['drop_path'],
                       help='stochastic depth rate (every ResNet block; rising with depth to it in ConvNeXt)')
    group.add_argument('--dropout', type=float, default=models.CONFIG_DEFAULTS['dropout'],
                       help='dropout before the classifier (0, as in the original, whatever the model\'s own default)')
    group.add_argument('--input_size', default=224, type=int, help='image size')
    group.add_argument('--patch_size', default=None, type=int, help='ViT patch size (default: the model\'s)')
    group.add_argument('--layer_scale_init_value', default=1e-6, type=float, help='ConvNeXt layer scale init')
    group.add_argument('--model_ema', type=str2bool, default=False)
    group.add_argument('--model_ema_decay', type=float, default=0.9999)
    group.add_argument('--model_ema_force_cpu', type=str2bool, default=False)
    group.add_argument('--model_ema_eval', type=str2bool, default=False, help='also evaluate the EMA model')

    group = parser.add_argument_group('KernelWarehouse (unset: the model\'s default)')
    group.add_argument('--kw_convert', type=str2bool, default=False,
                       help='turn --model, any timm CNN, into a KW model: one warehouse per stage and kind of layer '
                            '(docs/kw_layers.md)')
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
    group.add_argument('--layer_decay', type=float, default=1.0,
                       help='layer-wise lr decay (groups by depth: timm\'s group_matcher)')
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
    group.add_argument('--save_ckpt_num', default=3, type=int, help='epoch checkpoints to keep')
    group.add_argument('--save_ckpt_steps', default=0, type=int,
                       help='also checkpoint every N optimizer steps within an epoch (0: off)')
    group.add_argument('--start_epoch', default=0, type=int)
    group.add_argument('--eval', type=str2bool, default=False, help='only evaluate')
    group.add_argument('--dist_eval', type=str2bool, default=True,
                       help='accepted for compatibility: distributed evaluation is always sharded exactly')
    group.add_argument('--disable_eval', type=str2bool, default=False, help='no evaluation during training')
    group.add_argument('--print_freq', default=10, type=int, help='log every N iterations')
    group.add_argument('--use_amp', type=str2bool, default=False, help='automatic mixed precision')
    group.add_argument('--amp_dtype', default='float16', choices=sorted(AMP_DTYPES))
    group.add_argument('--channels_last', type=str2bool, default=False,
                       help='keep images and activations channels-last (faster on GPUs, with AMP most; docs/training.md)')
    group.add_argument('--cuda_graph', type=str2bool, default=False,
                       help='replay the training forward and backward as CUDA graphs (one GPU; docs/training.md)')
    group.add_argument('--compile', type=str2bool, default=False,
                       help='run the model through torch.compile (fewer, fused kernels; also under torchrun; docs/training.md)')
    group.add_argument('--compile_backend', default='inductor',
                       help="torch.compile's backend (torch.compiler.list_backends())")
    group.add_argument('--compile_mode', default=None,
                       help="the inductor backend's mode, e.g. reduce-overhead (the compiler's CUDA graphs) or "
                            'max-autotune (torch._inductor.list_mode_options())')
    group.add_argument('--keep_freed_memory', type=str2bool, default=True,
                       help='on the CPU, keep freed memory for reuse (glibc): faster training, but the process '
                            'keeps its peak memory (docs/training.md)')
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
    if args.kw_convert:
        check_convertible_model(args.model)
    elif args.model not in models.MODEL_NAMES:
        raise UserError(f'unknown model {args.model!r}; known models: {", ".join(models.MODEL_NAMES)} (or any timm '
                        f'CNN with --kw_convert true).')
    positive = ['lr', 'batch_size', 'epochs', 'update_freq', 'input_size', 'nb_classes', 'save_ckpt_freq',
                'save_ckpt_num', 'print_freq', 'model_ema_decay', 'reduction', 'cell_num_ratio',
                'cell_inplane_ratio', 'cell_outplane_ratio', 'nonlocal_basis_ratio', 'train_samples', 'val_samples']
    for name in positive:
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UserError(f'--{name} must be > 0, got {value}.')
    non_negative = ['min_lr', 'weight_decay', 'weight_decay_end', 'warmup_epochs', 'temp_epoch', 'num_workers',
                    'mixup', 'cutmix', 'color_jitter', 'clip_grad', 'start_epoch', 'save_ckpt_steps']
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
    if args.compile and args.cuda_graph:
        raise UserError('--compile true and --cuda_graph true are two ways to cut launch overhead and cannot be '
                        'combined; set one of them to false.')
    if args.compile:
        utils.check_compile_options(args.compile_backend, args.compile_mode)


def check_convertible_model(name: str) -> None:
    if name in models.MODEL_NAMES and name.startswith('kw'):
        raise UserError(f'{name} is a KW model already: drop --kw_convert, or name a plain model such as '
                        f'{name.split("_", 1)[1]}.')
    if not timm.is_model(models.resolve_model_name(name)):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise UserError(f'--kw_convert true: timm has no model {name!r}' +
                        (f' (did you mean {", ".join(close)}?)' if close else '; timm.list_models() lists them') + '.')


def parse_args(argv: Optional[List[str]] = None,
               tool_parser: Optional[argparse.ArgumentParser] = None) -> argparse.Namespace:
    """Command line over config file over built-in defaults.

    The tools (``tools/*.py``) pass their own parser: this one reads main.py's options from
    ``argv`` with the same config file and checks, the tool's parser reads the rest (its own
    options and positionals, ``--help``) and reports the errors; the namespace holds both.
    """
    parser = get_args_parser(add_help=tool_parser is None)
    if tool_parser is not None:
        # a tool's option must not pass for an abbreviation of ours, nor an error print our usage
        parser.allow_abbrev = parser.exit_on_error = False
    try:
        known, _ = parser.parse_known_args(argv)
        if known.kw_config:
            parser.set_defaults(**load_config_defaults(parser, known.kw_config))
        if tool_parser is None:
            args = parser.parse_args(argv)
        else:
            args, rest = parser.parse_known_args(argv)
            vars(args).update(vars(tool_parser.parse_args(rest)))
        if args.sharing_range is not None:  # "layer_conv" and "layer conv" mean the same
            args.sharing_range = '_'.join(args.sharing_range)
        if args.aa is not None and args.aa.lower() in ('', 'none'):  # --aa none: no auto-augment
            args.aa = None
        check_args(args)
    except (UserError, argparse.ArgumentError) as error:
        (tool_parser or parser).error(str(error))
    return args


# ----------------------------------------------------------------------------------------------
# Building blocks of a run
# ----------------------------------------------------------------------------------------------

def uses_mixup(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def build_loaders(args: argparse.Namespace):
    """Datasets, samplers and loaders; sets ``args.nb_classes`` from the data.

    The loaders draw their worker seeds from their own generators, never from the global random
    state, so that the data order and augmentation depend only on the seed, epoch and rank.
    """
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
    loader_train = loader_val = None
    if dataset_train is not None:
        if len(dataset_train) < args.batch_size * world_size:
            raise UserError(f'{len(dataset_train)} training images are fewer than one batch '
                            f'({args.batch_size} x {world_size} processes); lower --batch_size.')
        sampler = EpochSampler(dataset_train, num_replicas=world_size, rank=rank, seed=args.seed)
        loader_train = DataLoader(dataset_train, sampler=sampler, batch_size=args.batch_size, drop_last=True,
                                  generator=torch.Generator(), **loader_args)
    if dataset_val is not None:
        sampler = ShardSampler(len(dataset_val), rank, world_size) if args.distributed else \
            SequentialSampler(dataset_val)
        loader_val = DataLoader(dataset_val, sampler=sampler, batch_size=int(1.5 * args.batch_size),
                                drop_last=False, generator=torch.Generator().manual_seed(0), **loader_args)
    return loader_train, loader_val


def build_model(args: argparse.Namespace,
                on_conversion: Optional[Callable[[models.ConversionPlan], None]] = None) -> nn.Module:
    """The model of ``args``; with ``--kw_convert``, ``on_conversion`` receives the conversion's plan."""
    try:
        model = models.create_model_from_config(vars(args), on_conversion=on_conversion)
    except TypeError as error:  # a timm model refusing an option (our models take them all)
        if not args.kw_convert:
            raise
        raise UserError(f'--model {args.model} cannot be built with these options ({error}); a model without '
                        f'stochastic depth needs --drop_path 0.') from None
    except ValueError as error:  # what convert() refuses, e.g. a model that reports no stages
        if not args.kw_convert:
            raise
        raise UserError(f'--kw_convert true with --model {args.model}: {error}') from None
    if args.finetune:
        load_finetune_weights(model, args)
    return model


def weight_keys(args: argparse.Namespace) -> List[str]:
    """Where checkpoints keep the weights: ``--model_key``'s keys, then the usual places."""
    return list(dict.fromkeys([k for k in args.model_key.split('|') if k] + list(utils.STATE_DICT_KEYS)))


def weights_of(checkpoint: Any, path: str, args: argparse.Namespace) -> Dict[str, torch.Tensor]:
    """The weights of a loaded checkpoint, looked up under ``--model_key``, then the usual places."""
    return utils.extract_state_dict(checkpoint, keys=weight_keys(args), prefix=args.model_prefix,
                                    source=f'checkpoint {path}')


def load_checkpoint(path: str, args: argparse.Namespace):
    """A checkpoint file (loaded safely unless --trust_checkpoint) and its weights."""
    checkpoint = utils.load_checkpoint_file(path, trust=args.trust_checkpoint)
    return checkpoint, weights_of(checkpoint, path, args)


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
    """Everything that determines the rest of a run, saved to and restored from checkpoints:
    model, optimizer, scaler, EMA, position (epoch and step), best accuracies, temperature and the
    random states of every process."""

    def __init__(self, args, model, optimizer, scaler, model_ema):
        self.args, self.model, self.optimizer, self.scaler, self.model_ema = args, model, optimizer, scaler, model_ema
        self.temperature = 0.0  # the attention temperature the weights were last trained at
        # below any accuracy, so that the first evaluation always writes checkpoint-best.pth
        self.max_accuracy = self.max_accuracy_ema = -1.0
        self.start_step = 0  # optimizer steps already done in the epoch training resumes in
        self.last_saved: Optional[Path] = None

    def save(self, epoch: int, name: str, step: Optional[int] = None) -> None:
        """Write ``checkpoint-<name>.pth``; ``step`` marks a checkpoint taken part-way through ``epoch``.

        Every process must call it: the random states of all processes are gathered."""
        rng_states = utils.all_gather_objects(utils.capture_rng_state())
        if not utils.is_main_process():
            return
        checkpoint = {'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(), 'epoch': epoch,
                      'step': step, 'scaler': self.scaler.state_dict(), 'args': self.args,
                      'temperature': self.temperature, 'max_accuracy': self.max_accuracy,
                      'max_accuracy_ema': self.max_accuracy_ema, 'rng_states': rng_states}
        if self.model_ema is not None:
            checkpoint['model_ema'] = self.model_ema.module.state_dict()
        output_dir = Path(self.args.output_dir)
        path = output_dir / f'checkpoint-{name}.pth'
        utils.save_checkpoint(checkpoint, path)
        if not name.startswith('best'):  # best, best-ema
            self.last_saved = path
            self._prune(output_dir)

    def _prune(self, output_dir: Path) -> None:
        """Keep the newest ``--save_ckpt_num`` epoch checkpoints and the step checkpoint, if any,
        that is newer than all of them."""
        found = utils.run_checkpoints(output_dir)
        epochs = [(position, path) for position, path in found if position[1] == 0]
        steps = [(position, path) for position, path in found if position[1] > 0]
        stale = epochs[:-self.args.save_ckpt_num] + steps[:-1]
        if steps and epochs and steps[-1][0] < epochs[-1][0]:
            stale.append(steps[-1])
        for _, path in stale:
            path.unlink(missing_ok=True)

    def load_weights(self, path: str, checkpoint: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Load the weights and the temperature (all ``--eval`` and the tools need); returns the checkpoint."""
        args = self.args
        if checkpoint is None:
            checkpoint, state_dict = load_checkpoint(path, args)
        else:
            state_dict = weights_of(checkpoint, path, args)
        saved_args = checkpoint.get('args') if isinstance(checkpoint, dict) else None
        if getattr(saved_args, 'model', args.model) != args.model:
            raise UserError(f'{path} is a checkpoint of {saved_args.model}, not {args.model}; resume it with '
                            f'--model {saved_args.model}, or use another --output_dir (or --auto_resume false).')
        utils.load_model_weights(self.model, state_dict, source=f'checkpoint {path}')
        # Released checkpoints carry no temperature: they are fully trained (temperature 0). EMA
        # weights (--model_key model_ema) belong to temperature 0 too: the EMA copy never leaves it.
        ema_weights = utils.state_dict_key(checkpoint, weight_keys(args)) == 'model_ema'
        self.temperature = 0.0 if ema_weights else float(checkpoint.get('temperature', 0.0))
        print(f'Loaded weights from {path}')
        return checkpoint

    def resume(self, path: str, checkpoint: Optional[Dict[str, Any]] = None) -> None:
        """Load weights (all ``--eval`` needs) and, for training, everything else the checkpoint has."""
        args = self.args
        checkpoint = self.load_weights(path, checkpoint)
        if args.eval:
            return
        if self.model_ema is not None:
            self._resume_ema(path, checkpoint)
        if not isinstance(checkpoint.get('epoch'), int) or 'optimizer' not in checkpoint:
            return  # weights only: training starts from them
        optimizer_state = checkpoint['optimizer']
        if 'temperature' not in checkpoint:  # written by the original release: its groups are ordered otherwise
            optimizer_state = optimizer_state_from_original(optimizer_state, self.model, self.optimizer, path)
        try:
            self.optimizer.load_state_dict(optimizer_state)
        except ValueError as error:  # another --opt or --layer_decay than the run that wrote it
            raise UserError(f'the optimizer state in {path} does not fit this run\'s optimizer ({error}); resume '
                            f'with the options it was trained with, or use --finetune {path} to start from its '
                            f'weights with a new optimizer.') from None
        if 'scaler' in checkpoint:
            self.scaler.load_state_dict(checkpoint['scaler'])
        self.max_accuracy = checkpoint.get('max_accuracy', -1.0)
        self.max_accuracy_ema = checkpoint.get('max_accuracy_ema', -1.0)
        step = checkpoint.get('step')
        args.start_epoch, self.start_step = (checkpoint['epoch'], step) if step else (checkpoint['epoch'] + 1, 0)
        rng_states = checkpoint.get('rng_states')
        if rng_states and len(rng_states) == utils.get_world_size():
            utils.restore_rng_state(rng_states[utils.get_rank()])
        elif rng_states:
            print(f'Warning: {path} holds the random states of {len(rng_states)} processes, not '
                  f'{utils.get_world_size()}: random augmentation will not repeat the interrupted run exactly.')
        self.last_saved = Path(path)
        where = f'epoch {args.start_epoch}' + (f', after step {self.start_step}' if self.start_step else '')
        print(f'Continuing training at {where}')

    def _resume_ema(self, path: str, checkpoint: Dict[str, Any]) -> None:
        """The EMA weights of the checkpoint; without them the EMA starts from the checkpoint's model,
        as in the original (not from the model's initialisation)."""
        if utils.state_dict_key(checkpoint, ['model_ema']) is None:
            self.model_ema.set(self.model)
            return
        ema_weights = utils.extract_state_dict(checkpoint, keys=['model_ema'], prefix=self.args.model_prefix)
        utils.load_model_weights(self.model_ema.module, ema_weights, source=f'the EMA weights of {path}')

    def auto_resume(self, output_dir: Path) -> None:
        """Resume from the newest readable checkpoint of ``output_dir``, skipping corrupt ones."""
        for _, path in reversed(utils.run_checkpoints(output_dir)):
            try:
                checkpoint = utils.load_checkpoint_file(path, trust=self.args.trust_checkpoint)
            except CheckpointError as error:
                print(f'Warning: skipping {path}: {error}')
                continue
            self.args.resume = str(path)
            self.resume(str(path), checkpoint)
            return


def build_inference_model(args: argparse.Namespace) -> nn.Module:
    """The model ``--eval`` evaluates, for the tools: built from ``args`` with the weights of
    ``--resume`` (if given), in eval mode at the temperature ``--eval`` uses (the checkpoint's; 0
    without one). A checkpoint of ours fixes the class count, which main.py takes from the data
    (10 for DIGITS), not from ``--nb_classes``."""
    checkpoint = utils.load_checkpoint_file(args.resume, trust=args.trust_checkpoint) if args.resume else None
    saved_args = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    if isinstance(getattr(saved_args, 'nb_classes', None), int):
        args.nb_classes = saved_args.nb_classes
    model = build_model(args)
    state = RunState(args, model, optimizer=None, scaler=None, model_ema=None)
    if checkpoint is not None:
        state.load_weights(args.resume, checkpoint)
    model.eval()
    model.net_update_temperature(state.temperature)
    return model


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
    if args.cuda_graph and device.type != 'cuda':
        raise UserError('--cuda_graph true needs a CUDA GPU and this run is on the CPU; set --cuda_graph false.')
    if args.cuda_graph and args.distributed:
        raise UserError('--cuda_graph true supports one process only; run without torchrun or set --cuda_graph false.')
    if device.type == 'cpu' and args.keep_freed_memory and utils.keep_freed_memory():
        print('Keeping freed memory for reuse (set --keep_freed_memory false to hand it back to the system).')
    seed_everything(args.seed + utils.get_rank())
    cudnn.benchmark = True

    loader_train, loader_val = build_loaders(args)
    model = build_model(args, on_conversion=print).to(device)
    if args.channels_last:
        utils.to_channels_last(model)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, device='cpu' if args.model_ema_force_cpu else None)
    model_without_ddp = model
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if args.gpu is not None else None)
    if args.compile:  # checkpoints, EMA and the optimizer keep using the uncompiled model_without_ddp
        model = torch.compile(model, backend=args.compile_backend, mode=args.compile_mode)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    amp_dtype = AMP_DTYPES[args.amp_dtype] if args.use_amp else None
    optimizer = create_optimizer(args, model_without_ddp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    state = RunState(args, model_without_ddp, optimizer, scaler, model_ema)

    output_dir = Path(args.output_dir) if args.output_dir else None
    if args.resume:
        state.resume(args.resume)
    elif args.auto_resume and output_dir is not None and not args.eval:
        state.auto_resume(output_dir)
    print(f'Model {args.model}: {n_parameters / 1e6:.2f}M parameters, {args.nb_classes} classes')

    layout = utils.memory_format(args.channels_last)
    if args.eval:
        return evaluate(loader_val, model, device, amp_dtype, args.print_freq, state.temperature,
                        memory_format=layout)

    if args.cuda_graph:  # the batches' shape: the training loader drops the last, incomplete one
        sample = torch.zeros(args.batch_size, 3, args.input_size, args.input_size, device=device)
        capture_training_graph(model_without_ddp, sample.contiguous(memory_format=layout), amp_dtype)

    # everything is checked: from here on the run writes its outputs
    log_writer = None
    if utils.is_main_process():
        if output_dir is not None:
            output_dir.mkdir(parents=True, exist_ok=True)
            utils.remove_stale_temporaries(output_dir)
        if args.log_dir:
            from tensorboardX import SummaryWriter
            log_writer = SummaryWriter(logdir=args.log_dir)
    return train(args, model, state, loader_train, loader_val, device, amp_dtype, log_writer, n_parameters)


def train(args, model, state: RunState, loader_train, loader_val, device, amp_dtype, log_writer,
          n_parameters: int) -> Dict[str, float]:
    """The epochs from ``args.start_epoch`` on: train, checkpoint, evaluate, log."""
    output_dir = Path(args.output_dir) if args.output_dir else None
    saving = output_dir is not None and args.save_ckpt
    iters_per_epoch = loader_train.sampler.num_samples // args.batch_size
    steps_per_epoch = iters_per_epoch // args.update_freq
    total_batch = args.batch_size * args.update_freq * utils.get_world_size()
    print(f'Total batch {total_batch}, {steps_per_epoch} optimizer steps per epoch, lr {args.lr}')
    lr_schedule = utils.cosine_scheduler(args.lr, args.min_lr, args.epochs, steps_per_epoch,
                                         args.warmup_epochs, warmup_steps=args.warmup_steps)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_schedule = utils.cosine_scheduler(args.weight_decay, wd_end, args.epochs, steps_per_epoch)
    criterion = build_criterion(args)
    mixup_fn = build_mixup(args)

    def temperature_fn(epoch: int, data_iter_step: int) -> float:
        return get_temperature(data_iter_step, epoch, iters_per_epoch, args.temp_epoch, args.temp_init_value)

    def step_callback(epoch: int, steps_done: int) -> None:
        if saving and args.save_ckpt_steps and steps_done % args.save_ckpt_steps == 0 \
                and steps_done < steps_per_epoch:
            state.save(epoch, f'{epoch}-step{steps_done}', step=steps_done)

    layout = utils.memory_format(args.channels_last)
    test_stats: Dict[str, float] = {}
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        start_step = state.start_step if epoch == args.start_epoch else 0
        loader_train.sampler.set_epoch(epoch, start_index=start_step * args.update_freq * args.batch_size)
        loader_train.generator.manual_seed(args.seed * 1_000_003 + epoch * 1_009 + utils.get_rank())
        try:
            train_stats = train_one_epoch(
                model, criterion, loader_train, optimizer=state.optimizer, device=device, epoch=epoch,
                scaler=state.scaler, amp_dtype=amp_dtype, update_freq=args.update_freq, max_norm=args.clip_grad,
                model_ema=state.model_ema, mixup_fn=mixup_fn, log_writer=log_writer, lr_schedule=lr_schedule,
                wd_schedule=wd_schedule, temperature_fn=temperature_fn, print_freq=args.print_freq,
                iters_per_epoch=iters_per_epoch, start_step=start_step, step_callback=step_callback,
                memory_format=layout)
        except NonFiniteLossError as error:
            last = f'the last good checkpoint is {state.last_saved}' if state.last_saved else 'no checkpoint was saved'
            raise UserError(f'{error} Nothing was saved after it; {last}.') from None
        state.temperature = train_stats['temperature']
        if saving and ((epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs):
            state.save(epoch, str(epoch))
        log_stats = {f'train_{k}': v for k, v in train_stats.items()}
        if loader_val is not None:
            test_stats = evaluate(loader_val, model, device, amp_dtype, args.print_freq, state.temperature,
                                  memory_format=layout)
            if test_stats['acc1'] > state.max_accuracy:
                state.max_accuracy = test_stats['acc1']
                if saving:
                    state.save(epoch, 'best')
            print(f'Max accuracy: {state.max_accuracy:.2f}%')
            log_stats.update({f'test_{k}': v for k, v in test_stats.items()})
            if state.model_ema is not None and args.model_ema_eval:
                # at temperature 0: the EMA copy is taken at 0 and never follows the schedule (KW-SPEC section 8)
                ema_stats = evaluate(loader_val, state.model_ema.module, device, amp_dtype, args.print_freq,
                                     temperature=0.0, memory_format=layout)
                if ema_stats['acc1'] > state.max_accuracy_ema:
                    state.max_accuracy_ema = ema_stats['acc1']
                    if saving:
                        state.save(epoch, 'best-ema')
                print(f'Max EMA accuracy: {state.max_accuracy_ema:.2f}%')
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


def user_message(error: Exception) -> str:
    """The one-sentence message of a user error, also when a DataLoader worker re-raised it (with the
    worker's traceback folded into the message)."""
    text = str(error).strip()
    if 'Original Traceback' in text:
        text = text.splitlines()[-1].split(': ', 1)[-1]
    return text


def run(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    try:
        main(args)
    except (UserError, CheckpointError) as error:
        # Exit at once: under torchrun the other processes are stopped by the launcher instead of
        # waiting for this one in a collective.
        print(f'error: {user_message(error)}', file=sys.stderr, flush=True)
        sys.exit(1)
    if utils.is_dist():
        torch.distributed.destroy_process_group()


if __name__ == '__main__':
    run()
