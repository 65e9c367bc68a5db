"""Evaluate a detector checkpoint written by ``detection/train.py`` (COCO bbox and segm AP).

    python detection/test.py CONFIG CHECKPOINT
    torchrun --nproc_per_node=8 detection/test.py CONFIG CHECKPOINT --launcher pytorch

The weights are loaded through ``utils.py``'s safe checkpoint loader (imported as ``kernelwarehouse.utils``),
strictly: a checkpoint of another config fails with the names of the keys that do not fit.
"""
import argparse
import sys
from pathlib import Path

# The repository root, for a checkout that is not pip-installed: models, modules, kernelwarehouse, detection
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detection import detection_stack_required  # noqa: E402

with detection_stack_required():
    from mmengine.model import is_model_wrapper

    from detection.kw_mmdet.launch import add_common_arguments, build_runner, load_config, run_cli

from kernelwarehouse.utils import extract_state_dict, load_checkpoint_file, load_model_weights


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument('checkpoint', help='a checkpoint written by detection/train.py')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cfg = load_config(args)
    cfg.load_from = None  # loaded below, through utils.py
    state_dict = extract_state_dict(load_checkpoint_file(args.checkpoint), source=args.checkpoint)
    runner = build_runner(cfg)
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    load_model_weights(model, state_dict, source=args.checkpoint)
    runner.test()


if __name__ == '__main__':
    run_cli(main)
