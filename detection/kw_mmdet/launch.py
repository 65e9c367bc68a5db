"""What ``detection/train.py`` and ``detection/test.py`` share: options, config, errors."""
import argparse
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn

import torch
from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from kernelwarehouse.utils import CheckpointError, UserError


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('config', help='config file, e.g. detection/configs/mask_rcnn_kw1x_resnet50_fpn_1x_coco.py')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: work_dirs/<config name>)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override config entries, e.g. train_dataloader.batch_size=4 '
                             'model.backbone.init_cfg.checkpoint=pretrained/kw1x_resnet50.pth')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help="'pytorch' under torchrun for several GPUs (mmengine's launchers need CUDA)")
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK instead.
    parser.add_argument('--local-rank', '--local_rank', type=int, default=0, help=argparse.SUPPRESS)


def load_config(args: argparse.Namespace) -> Config:
    """The config with the command line's overrides, work directory and launcher applied."""
    if not Path(args.config).is_file():
        raise UserError(f'config {args.config} does not exist; pick one of detection/configs/*.py.')
    if args.launcher == 'pytorch' and not torch.cuda.is_available():
        raise UserError("--launcher pytorch needs CUDA GPUs (mmengine's launcher gives each process one); "
                        "on the CPU run a single process without --launcher.")
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or str(Path('work_dirs') / Path(args.config).stem)
    return cfg


def build_runner(cfg: Config) -> Runner:
    """mmengine's Runner, or the one a config names with ``runner_type``."""
    return RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)


def run_cli(main: Callable[[], None]) -> NoReturn:
    """Run ``main``; a user mistake ends the process with one line on stderr and exit status 2."""
    try:
        main()
    except (UserError, CheckpointError) as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(2)
    sys.exit(0)
