"""The command-line tools, run as a user runs them."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
REFERENCE = Path(__file__).parent / 'reference'


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)


def test_model_table_counts_match_manifests():
    result = _run('tools/model_table.py', 'resnet18/kw1x_resnet18', 'kw1d2x_mobilenetv2_050')
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith('| resnet18') or
            line.startswith('| mobilenetv2')]
    assert len(rows) == 2
    for row, manifest in zip(rows, ['resnet18__kw1x_resnet18', 'mobilenetv2_050__kw1d2x_mobilenetv2_050']):
        reference = json.loads((REFERENCE / f'{manifest}.json').read_text())
        cells = row.split('|')
        assert cells[1].strip() == reference['config']
        assert int(cells[4].replace(',', '')) == reference['num_params']
        assert int(cells[5]) == len(reference['warehouses'])
        assert int(cells[6]) == sum(w['num_cells'] for w in reference['warehouses'])


def test_model_table_unknown_config():
    result = _run('tools/model_table.py', 'kw9x_resnet18')
    assert result.returncode != 0
    assert "no config named 'kw9x_resnet18'" in result.stderr and 'resnet18/kw1x_resnet18' in result.stderr
