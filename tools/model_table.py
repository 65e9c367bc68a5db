"""Print the parameter table of the model configs as markdown.

    python tools/model_table.py                              # every config under configs/
    python tools/model_table.py resnet18/kw1x_resnet18 configs/convnext/kw1x_convnext_tiny.json
"""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from anywhere without installing

import models  # noqa: E402

CONFIG_DIR = REPO_ROOT / 'configs'


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


def describe(path: Path, num_classes: int) -> dict:
    config = json.loads(path.read_text())
    model = models.create_model_from_config(config, num_classes=num_classes)
    manager = getattr(model, 'warehouse_manager', None)
    warehouses = list(manager.weights) if manager is not None else []
    return dict(
        config=config_name(path), model=config['model'],
        params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        warehouses=len(warehouses), cells=sum(w.shape[0] for w in warehouses),
        warehouse_params=sum(w.numel() for w in warehouses))


def markdown_table(rows: List[dict]) -> str:
    lines = ['| config | model | params | params (exact) | warehouses | cells | warehouse params |',
             '|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f"| {r['config']} | {r['model']} | {r['params'] / 1e6:.2f}M | {r['params']:,} | "
                     f"{r['warehouses']} | {r['cells']} | {r['warehouse_params'] / 1e6:.2f}M |")
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('configs', nargs='*', help='config paths or names (default: every config)')
    parser.add_argument('--num_classes', type=int, default=1000, help='classifier outputs (default: 1000)')
    args = parser.parse_args(argv)
    paths = [find_config(name) for name in args.configs] or all_configs()
    print(markdown_table([describe(path, args.num_classes) for path in paths]))


if __name__ == '__main__':
    main()
