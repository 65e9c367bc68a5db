"""Print the parameter and compute table of the model configs as markdown.

    python tools/model_table.py                              # every config under configs/
    python tools/model_table.py resnet18/kw1x_resnet18 configs/convnext/kw1x_convnext_tiny.json
    python tools/model_table.py kw1x_resnet18 --input_size 64 --num_classes 10

Models are built as main.py builds them from ``--kw_config``. MACs are those of one image at the
config's input size (``--input_size`` overrides it), counted by
``torch.utils.flop_counter.FlopCounterMode`` on the original release's algorithm (FLOPs = 2 x MACs):
matrix products and convolutions, element-wise operations not counted. In a KW layer they are the
attention branch, the per-sample kernel assembly (the product of the mixture weights and the
warehouse cells) and the convolution with the assembled kernel.
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from anywhere without installing

import main  # noqa: E402
from modules.kernel_warehouse import Attention, KWConvNd  # noqa: E402
from modules.kernel_warehouse.functional import use_implementation  # noqa: E402

CONFIG_DIR = REPO_ROOT / 'configs'
COLUMNS = ['config', 'model', 'params', 'params (exact)', 'warehouses', 'cells', 'warehouse params',
           'KW attention params', 'input', 'MACs', 'kernel assembly MACs', 'KW attention MACs']
# Inside a KW layer on the reference algorithm (its attention aside) the kernel assembly is the one
# matrix product; the other operation is the convolution.
ASSEMBLY_OP = torch.ops.aten.mm


def find_config(name: str) -> Path:
    """A config file from a path, ``family/name`` or a bare name such as ``kw1x_resnet18``."""
    candidates = [Path(name), CONFIG_DIR / name, CONFIG_DIR / f'{name}.json']
    candidates += sorted(CONFIG_DIR.glob(f'*/{Path(name).stem}.json'))
    for path in candidates:
        if path.is_file():
            return path
    raise SystemExit(f'error: no config named {name!r}; available: '
                     f'{", ".join(config_name(p) for p in all_configs())}')


def all_configs() -> List[Path]:
    return sorted(CONFIG_DIR.glob('*/*.json'))


def config_name(path: Path) -> str:
    return f'{path.parent.name}/{path.stem}'


def count_macs(model: nn.Module, input_size: int) -> Dict[str, int]:
    """MACs of one ``input_size`` image: ``total``, and the ``assembly`` and ``attention`` parts
    of the KW layers (see the module docstring), from the per-module counts of FlopCounterMode."""
    names = {module: name for name, module in model.named_modules()}
    counter = FlopCounterMode(display=False)
    # Counted on the reference algorithm (the original's: a matrix product assembles the kernels, a
    # convolution applies them), whose operations FlopCounterMode knows; the GEMM fast path computes
    # the same products with in-place ones it does not count. Likewise the math backend of scaled
    # dot-product attention (the ViTs): FlopCounterMode has no formula for the fused CPU kernel.
    with torch.no_grad(), use_implementation('reference'), sdpa_kernel(SDPBackend.MATH), counter:
        model(torch.randn(1, 3, input_size, input_size))
    counts = counter.get_flop_counts()
    # FlopCounterMode names modules by their path under the root module's class name.
    flops = {module: counts.get(f'{type(model).__name__}.{name}' if name else type(model).__name__, {})
             for module, name in names.items()}
    attention = sum(sum(flops[m].values()) for m in names if isinstance(m, Attention))
    assembly = sum(flops[m].get(ASSEMBLY_OP, 0) - flops[m.attention].get(ASSEMBLY_OP, 0)
                   for m in names if isinstance(m, KWConvNd))
    return dict(total=counter.get_total_flops() // 2, assembly=assembly // 2, attention=attention // 2)


def describe(path: Path, num_classes: int, input_size: Optional[int]) -> dict:
    """One table row: the model ``path`` configures, built as ``main.py --kw_config path`` builds it."""
    argv = ['--kw_config', str(path), '--nb_classes', str(num_classes)]
    if input_size is not None:
        argv += ['--input_size', str(input_size)]
    # an empty tool parser: a broken config is reported in one line under this tool's name
    errors = argparse.ArgumentParser(prog=Path(__file__).name, usage=argparse.SUPPRESS, add_help=False)
    args = main.parse_args(argv, tool_parser=errors)
    model = main.build_model(args).eval()
    manager = getattr(model, 'warehouse_manager', None)
    warehouses = list(manager.weights) if manager is not None else []
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    return dict(
        config=config_name(path), model=args.model,
        params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        warehouses=len(warehouses), cells=sum(w.shape[0] for w in warehouses),
        warehouse_params=sum(w.numel() for w in warehouses),
        attention_params=sum(p.numel() for m in attentions for p in m.parameters()),
        input_size=args.input_size, macs=count_macs(model, args.input_size))


def _macs(value: int) -> str:
    return f'{value / 1e9:.3f}G' if value >= 1e9 else f'{value / 1e6:.2f}M'


def markdown_table(rows: List[dict]) -> str:
    lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    for r in rows:
        macs = r['macs']
        cells = [r['config'], r['model'], f"{r['params'] / 1e6:.2f}M", f"{r['params']:,}", str(r['warehouses']),
                 str(r['cells']), f"{r['warehouse_params'] / 1e6:.2f}M", f"{r['attention_params'] / 1e6:.2f}M",
                 str(r['input_size']), _macs(macs['total']), _macs(macs['assembly']), _macs(macs['attention'])]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('configs', nargs='*', help='config paths or names (default: every config)')
    parser.add_argument('--num_classes', type=int, default=1000, help='classifier outputs (default: 1000)')
    parser.add_argument('--input_size', type=int, default=None,
                        help="image size for the MACs (default: each config's input_size, else main.py's 224)")
    return parser


def run(argv: Optional[List[str]] = None) -> None:
    parser = get_parser()
    args = parser.parse_args(argv)
    paths = [find_config(name) for name in args.configs] or all_configs()
    print(markdown_table([describe(path, args.num_classes, args.input_size) for path in paths]))


if __name__ == '__main__':
    run()
