"""Plot the training curves of main.py runs on one figure: train loss, validation top-1 and the
attention temperature per epoch, read from each run's ``log.txt``.

    python tools/plot_logs.py output/demo/kw1x_resnet18_digits output/demo/resnet18_digits -o curves.png
    python tools/plot_logs.py run_a/log.txt run_b --labels KW baseline -o curves.png

An epoch logged twice (a run resumed from an earlier checkpoint) is drawn with its last record.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use('Agg')  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# (log.txt key, panel title): one panel each
PANELS = [('train_loss', 'train loss (epoch mean)'), ('test_acc1', 'validation top-1 (%)'),
          ('train_temperature', 'temperature (end of epoch)')]
FIGURE_SIZE = (12.0, 3.6)  # inches; at the default --dpi 100 a 1200 x 360 PNG


class LogError(Exception):
    """A run folder or log.txt that cannot be plotted, with what to do."""


def read_log(run: str) -> Dict[int, dict]:
    """The records of ``run`` (a run folder or its log.txt) by epoch."""
    path = Path(run)
    if path.is_dir():
        path = path / 'log.txt'
    if not path.is_file():
        raise LogError(f'{path} does not exist; pass a main.py --output_dir that holds a log.txt.')
    records = {}
    for number, line in enumerate(path.read_text(encoding='utf-8').splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise LogError(f'{path} line {number} is not a JSON record; is it a main.py log.txt?') from None
        if not isinstance(record, dict) or not isinstance(record.get('epoch'), int):
            raise LogError(f'{path} line {number} has no "epoch"; is it a main.py log.txt?')
        records[record['epoch']] = record
    if not records:
        raise LogError(f'{path} holds no epoch yet; plot it after the first epoch has finished.')
    return records


def run_label(run: str) -> str:
    path = Path(run)
    return (path.parent if path.name == 'log.txt' else path).resolve().name


def plot(runs: Sequence[str], labels: Sequence[str], output: Path, dpi: int) -> None:
    logs = [read_log(run) for run in runs]
    figure, axes = plt.subplots(1, len(PANELS), figsize=FIGURE_SIZE, dpi=dpi)
    for ax, (key, title) in zip(axes, PANELS):
        for log, label in zip(logs, labels):
            epochs = [epoch for epoch in sorted(log) if key in log[epoch]]
            if epochs:  # e.g. no test_acc1 in a run with --disable_eval true
                ax.plot(epochs, [log[epoch][key] for epoch in epochs], marker='.', label=label)
        ax.set_title(title)
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(output, dpi=dpi)
    plt.close(figure)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', metavar='RUN_DIR', help='main.py --output_dir folders (or log.txt files)')
    parser.add_argument('-o', '--output', type=Path, default=Path('curves.png'),
                        help='image file; the extension picks the format (default: curves.png)')
    parser.add_argument('--labels', nargs='+', default=None, help='legend entries (default: the folder names)')
    parser.add_argument('--dpi', type=int, default=100, help='pixels per inch (default: 100)')
    return parser


def run(argv: Optional[List[str]] = None) -> None:
    parser = get_parser()
    args = parser.parse_args(argv)
    labels = args.labels or [run_label(run) for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f'--labels gives {len(labels)} labels for {len(args.runs)} runs; give one per run.')
    if args.dpi <= 0:
        parser.error(f'--dpi must be > 0, got {args.dpi}.')
    try:
        plot(args.runs, labels, args.output, args.dpi)
    except LogError as error:
        sys.exit(f'error: {error}')
    except (OSError, ValueError) as error:  # an unwritable path, an unknown image extension
        sys.exit(f'error: cannot write {args.output} ({error}); choose another -o path.')
    print(f'Wrote {args.output}')


if __name__ == '__main__':
    run()
