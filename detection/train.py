"""Train a detector with KernelWarehouse backbones (mmdetection 3.x, mmengine's Runner).

    python detection/train.py detection/configs/mask_rcnn_kw1x_resnet50_fpn_1x_coco.py
    torchrun --nproc_per_node=8 detection/train.py CONFIG --launcher pytorch

The backbone's ImageNet checkpoint comes from the config's ``init_cfg`` (``pretrained/<name>.pth``
by default; override with ``--cfg-options model.backbone.init_cfg.checkpoint=PATH``).
"""
import argparse
import sys
from pathlib import Path

# The repository root, for a checkout that is not pip-installed: models, modules, kernelwarehouse, detection
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detection import detection_stack_required  # noqa: E402

with detection_stack_required():
    from detection.kw_mmdet.launch import add_common_arguments, build_runner, load_config, run_cli


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument('--resume', nargs='?', const='auto', metavar='CHECKPOINT',
                        help='resume from CHECKPOINT, or from the latest one in the work directory')
    parser.add_argument('--amp', action='store_true', help='mixed precision training')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help="scale the lr linearly from the recipe's total batch of 16 to this run's")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cfg = load_config(args)
    if args.resume:
        cfg.resume = True
        cfg.load_from = None if args.resume == 'auto' else args.resume
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        cfg.auto_scale_lr.enable = True
    build_runner(cfg).train()


if __name__ == '__main__':
    run_cli(main)
