"""Export a (KW) model to ONNX with a dynamic batch dimension, then check it with onnxruntime.

    python tools/export_onnx.py --kw_config configs/demo/kw1x_resnet18_digits.json \\
        --resume output/demo/kw1x_resnet18_digits/checkpoint-best.pth -o kw1x_resnet18_digits.onnx

The model is built and its checkpoint loaded as ``main.py --eval`` does: main.py's model options
(--model, --input_size, --nb_classes, --cell_num_ratio, ...) override the config, and the
attentions run at the temperature --eval uses (the checkpoint's; 0 for a finished or released
checkpoint, and without --resume). The KW layers are exported through
``modules.kernel_warehouse.export.batch_independent``: the original's batch-folded grouped
convolution would freeze the batch size into the graph.

The ONNX model takes ``image`` [batch, 3, input_size, input_size] and returns ``logits``
[batch, classes]. It is then run with onnxruntime on random batches (of 1 and 7 by default) and
compared with PyTorch; a difference above --tolerance is an error.
"""
import argparse
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from anywhere without installing

import main  # noqa: E402
from modules.kernel_warehouse.export import batch_independent  # noqa: E402
from utils import CheckpointError, UserError  # noqa: E402

EXAMPLE_BATCH = 2  # not 0 or 1, which torch.export would take for a constant


@contextmanager
def _explain_missing_packages() -> Iterator[None]:
    try:
        yield
    except ImportError as error:  # torch.onnx imports onnx and onnxscript when it exports
        raise UserError(f'the ONNX export needs the package {error.name or "onnx"}: '
                        f'pip install -e ".[tools]" installs it.') from None


def export(model: nn.Module, input_size: int, path: Path, exporter: str, opset: Optional[int]) -> None:
    """Write ``model`` (in eval mode) to ``path`` with a dynamic batch dimension."""
    example = torch.randn(EXAMPLE_BATCH, 3, input_size, input_size)
    names = dict(input_names=['image'], output_names=['logits'], opset_version=opset)
    with torch.no_grad(), batch_independent(model), _explain_missing_packages():
        if exporter == 'dynamo':
            torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim('batch')},), **names)
        else:
            torch.onnx.export(model, (example,), str(path), dynamo=False,
                              dynamic_axes={'image': {0: 'batch'}, 'logits': {0: 'batch'}}, **names)


def check(model: nn.Module, input_size: int, path: Path, batch_sizes: Sequence[int], tolerance: float) -> None:
    """Run the ONNX file with onnxruntime and compare it with the PyTorch model, batch by batch."""
    try:
        import onnxruntime
    except ImportError:
        print('onnxruntime is not installed: the export was not checked (pip install -e ".[tools]").')
        return
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    generator = torch.Generator().manual_seed(0)
    for batch in batch_sizes:
        images = torch.randn(batch, 3, input_size, input_size, generator=generator)
        with torch.no_grad():
            expected = model(images).numpy()
        [logits] = session.run(['logits'], {'image': images.numpy()})
        difference = float(abs(logits - expected).max())
        print(f'batch {batch}: onnxruntime output {tuple(logits.shape)}, max |onnxruntime - PyTorch| = '
              f'{difference:.3g}')
        if not difference <= tolerance:
            raise UserError(f'the exported model differs from PyTorch by {difference:.3g} at batch {batch} '
                            f'(--tolerance {tolerance:g}); please report this with the command you ran.')


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=Path(__file__).name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='Also accepted: every option of main.py (python main.py --help), e.g. --kw_config, --resume, '
               '--trust_checkpoint, --model, --input_size, --nb_classes, with the same meaning.')
    parser.add_argument('-o', '--onnx', type=Path, default=Path('model.onnx'),
                        help='ONNX file to write (default: model.onnx)')
    parser.add_argument('--exporter', choices=['dynamo', 'torchscript'], default='dynamo',
                        help="torch.onnx's exporter: dynamo (torch.export, the default) or the older, faster "
                             'TorchScript tracer')
    parser.add_argument('--opset', type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument('--check_batch_sizes', type=int, nargs='*', default=[1, 7],
                        help='batch sizes to compare with PyTorch (default: 1 7; none: no check)')
    parser.add_argument('--tolerance', type=float, default=1e-4,
                        help='largest absolute difference of the logits allowed (default: 1e-4)')
    return parser


def run(argv: Optional[List[str]] = None) -> None:
    parser = get_parser()
    args = main.parse_args(argv, tool_parser=parser)
    if any(batch < 1 for batch in args.check_batch_sizes):
        parser.error(f'--check_batch_sizes must be >= 1, got {args.check_batch_sizes}.')
    if not args.onnx.resolve().parent.is_dir():
        parser.error(f'the folder of --onnx {args.onnx} does not exist; create it or choose another path.')
    try:
        model = main.build_inference_model(args)
        export(model, args.input_size, args.onnx, args.exporter, args.opset)
        print(f'Wrote {args.onnx} ({args.model}, input [batch, 3, {args.input_size}, {args.input_size}])')
        check(model, args.input_size, args.onnx, args.check_batch_sizes, args.tolerance)
    except (UserError, CheckpointError) as error:
        sys.exit(f'error: {error}')


if __name__ == '__main__':
    run()
