"""The command-line tools (tools/*.py), run as a user runs them, and the export path they use."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image
from torch import nn

import main
import utils
from datasets import build_transform
from modules.kernel_warehouse import Attention, KWConvNd, WarehouseManager, set_temperature
from modules.kernel_warehouse.export import batch_independent
from tests.test_kernel_warehouse import LAYER_CASES, _build

ROOT = Path(__file__).parent.parent
REFERENCE = Path(__file__).parent / 'reference'


def _run(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True)


def _tool(name):
    """A tool's module, imported from its file (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f'tool_{name}', ROOT / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOLS = {name: _tool(name) for name in ['model_table', 'plot_logs', 'export_onnx', 'predict']}
model_table, plot_logs, export_onnx, predict = TOOLS.values()


def _table_rows(stdout):
    header, _, *rows = [line.split('|')[1:-1] for line in stdout.splitlines() if line.startswith('|')]
    return [dict(zip([h.strip() for h in header], [c.strip() for c in row])) for row in rows]


def _perturb(model, seed=0):
    """Random norm statistics and classifier: logits of order 1 rather than the initialisation's ~0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0, 0.2, generator=generator)
                m.running_mean.normal_(0, 0.2, generator=generator)
                m.running_var.uniform_(0.5, 1.5, generator=generator)
        for p in model.get_classifier().parameters():
            p.normal_(0, 0.05, generator=generator)
    return model


def _checkpoint(path, argv, temperature=0.0):
    """A main.py-style checkpoint of a perturbed model built from main.py options; returns the model."""
    args = main.parse_args([str(a) for a in argv])
    torch.manual_seed(0)
    model = _perturb(main.build_model(args)).eval()
    utils.save_checkpoint({'model': model.state_dict(), 'args': args, 'epoch': 0, 'temperature': temperature}, path)
    model.net_update_temperature(temperature)
    return model


# ----------------------------------------------------------------------------------------------
# model_table.py
# ----------------------------------------------------------------------------------------------

def test_model_table_counts_match_manifests():
    result = _run('tools/model_table.py', 'resnet18/kw1x_resnet18', 'kw1d2x_mobilenetv2_050')
    assert result.returncode == 0, result.stderr
    rows = _table_rows(result.stdout)
    assert len(rows) == 2
    for row, manifest in zip(rows, ['resnet18__kw1x_resnet18', 'mobilenetv2_050__kw1d2x_mobilenetv2_050']):
        reference = json.loads((REFERENCE / f'{manifest}.json').read_text())
        assert row['config'] == reference['config']
        assert int(row['params (exact)'].replace(',', '')) == reference['num_params']
        assert int(row['warehouses']) == len(reference['warehouses'])
        assert int(row['cells']) == sum(w['num_cells'] for w in reference['warehouses'])
        assert row['input'] == '224'  # main.py's default: the released configs set no input_size
        for column in ('KW attention params', 'MACs', 'kernel assembly MACs', 'KW attention MACs'):
            assert float(row[column][:-1]) > 0, column


def test_model_table_unknown_config():
    with pytest.raises(SystemExit) as exit_info:
        model_table.run(['kw9x_resnet18'])
    assert "no config named 'kw9x_resnet18'" in exit_info.value.code
    assert 'resnet18/kw1x_resnet18' in exit_info.value.code


def test_model_table_bad_config_is_one_line(tmp_path, capsys):
    config = tmp_path / 'bad.json'
    config.write_text(json.dumps({'model': 'kw_resnet18', 'cell_num_ratio': 0}))
    with pytest.raises(SystemExit) as exit_info:
        model_table.run([str(config)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == 'model_table.py: error: --cell_num_ratio must be > 0, got 0.0.'


def _expected_assembly_macs(model):
    """Per KW layer and image: num_mixtures rows of n mixture weights times the n x cell-size cells."""
    return sum(layer.num_mixtures * layer.cell_shape[0] * math.prod(layer.cell_shape[1:])
               for layer in model.modules() if isinstance(layer, KWConvNd))


def _expected_attention_macs(model):
    """fc1 and fc2 map one pooled vector per image; the non-local basis fc3 maps one row per mixture."""
    total = 0
    for attention in (m for m in model.modules() if isinstance(m, Attention)):
        total += attention.fc1.in_features * attention.fc1.out_features
        total += attention.fc2.in_features * attention.fc2.out_features
        if attention.num_basis is not None:
            total += attention.num_mixtures * attention.fc3.in_features * attention.fc3.out_features
    return total


def test_model_table_macs_are_the_plain_model_plus_attention_and_assembly():
    """A KW ResNet convolves like the plain one; its extra MACs are its attentions and kernel assembly.

    kw1d4x_resnet18 has cells smaller than its kernels, kw1d2x_resnet50 the non-local basis."""
    def row(name):
        return model_table.describe(model_table.find_config(name), 10, 64)

    plains = {}
    for name, plain_name in [('resnet18/kw1d4x_resnet18', 'resnet18/resnet18'),
                             ('resnet50/kw1d2x_resnet50', 'resnet50/resnet50')]:
        kw = row(name)
        plain = plains[plain_name] = row(plain_name)
        model = main.build_model(main.parse_args(['--kw_config', str(model_table.find_config(name)),
                                                  '--nb_classes', '10']))
        assert kw['macs']['assembly'] == _expected_assembly_macs(model) > 0
        assert kw['macs']['attention'] == _expected_attention_macs(model) > 0
        assert kw['attention_params'] == sum(p.numel() for m in model.modules() if isinstance(m, Attention)
                                             for p in m.parameters())
        assert kw['macs']['total'] - kw['macs']['assembly'] - kw['macs']['attention'] == plain['macs']['total']
    plain = plains['resnet18/resnet18']
    assert plain['macs']['assembly'] == plain['macs']['attention'] == 0
    # the convolutions alone: k x k x C_in x C_out per output position, summed over the layers
    model = main.build_model(main.parse_args(['--model', 'resnet18', '--nb_classes', '10']))
    positions = {}
    hooks = [m.register_forward_hook(lambda m, i, o: positions.__setitem__(m, o.shape[2] * o.shape[3]))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    model.eval()(torch.zeros(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    convs = sum(m.weight.numel() * positions[m] for m in positions)
    assert plain['macs']['total'] == convs + model.fc.weight.numel()


# ----------------------------------------------------------------------------------------------
# plot_logs.py
# ----------------------------------------------------------------------------------------------

def _write_log(folder, records):
    folder.mkdir(parents=True)
    (folder / 'log.txt').write_text(''.join(json.dumps(r) + '\n' for r in records))


def test_plot_logs_draws_every_run(tmp_path):
    kw = [dict(epoch=e, train_loss=2.0 / (e + 1), test_acc1=40.0 + 5 * e, train_temperature=max(0.0, 1 - e / 2))
          for e in range(6)]
    kw.insert(3, dict(kw[2], train_loss=9.0))  # epoch 2 logged twice (a resumed run): the last record counts
    baseline = [dict(epoch=e, train_loss=2.5 / (e + 1), train_temperature=0.0) for e in range(4)]  # no eval
    _write_log(tmp_path / 'kw', kw)
    _write_log(tmp_path / 'baseline', baseline)
    assert plot_logs.read_log(str(tmp_path / 'kw'))[2] == kw[3]
    output = tmp_path / 'curves.png'
    result = _run('tools/plot_logs.py', tmp_path / 'kw', tmp_path / 'baseline' / 'log.txt', '-o', output,
                  '--dpi', 50)
    assert result.returncode == 0, result.stderr
    with Image.open(output) as image:
        assert image.format == 'PNG'
        assert image.size == tuple(round(inches * 50) for inches in plot_logs.FIGURE_SIZE)
        colors = {tuple(c) for c in np.asarray(image.convert('RGB')).reshape(-1, 3)}
    # both runs are drawn, in matplotlib's first two default colours
    assert {(0x1f, 0x77, 0xb4), (0xff, 0x7f, 0x0e)} <= colors


@pytest.mark.parametrize('content, message', [
    (None, 'does not exist; pass a main.py --output_dir that holds a log.txt'),
    ('', 'holds no epoch yet'),
    ('{"epoch": 0, "train_loss": 1.0}\nnot json\n', 'line 2 is not a JSON record'),
])
def test_plot_logs_bad_log_is_one_line(tmp_path, content, message):
    if content is not None:
        (tmp_path / 'log.txt').write_text(content)
    with pytest.raises(SystemExit) as exit_info:  # sys.exit(message): exit status 1
        plot_logs.run([str(tmp_path), '-o', str(tmp_path / 'curves.png')])
    assert exit_info.value.code.startswith('error: ') and message in exit_info.value.code
    assert '\n' not in exit_info.value.code
    assert not (tmp_path / 'curves.png').exists()


# ----------------------------------------------------------------------------------------------
# The batch-independent KW forward used for export
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('temperature', [0.0, 0.5])
@pytest.mark.parametrize('case', sorted(LAYER_CASES))
def test_batch_independent_forward_equals_the_layer_forward(case, temperature):
    net, x = _build(case)
    net.eval()
    set_temperature(net, temperature)
    with torch.no_grad():
        expected = net(x)
        with batch_independent(net):
            swapped = net(x)
        restored = net(x)
    for a, b, c in zip(swapped, expected, restored):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert torch.equal(c, b)
    assert not any('forward' in vars(layer) for layer in net.kw_layers)


class _TinyKWNet(nn.Module):
    """KW 3x3 (stride 2), depthwise, 1x1 with bias and linear layers: quick to export."""

    def __init__(self):
        super().__init__()
        self.warehouse_manager = WarehouseManager(reduction=0.25, sharing_range='layer')
        reserve = self.warehouse_manager.reserve
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = reserve(8, 16, 3, stride=2, padding=1, bias=False, warehouse_name='stage0_layer0_conv0')
        self.depthwise = reserve(16, 16, 3, padding=1, groups=16, bias=False, warehouse_name='stage0_layer1_dw')
        self.pointwise = reserve(16, 16, 1, bias=True, warehouse_name='stage0_layer2_conv0')
        self.head = reserve(16, 5, layer_type='linear', warehouse_name='stage1_layer0_fc')
        self.warehouse_manager.store()
        self.warehouse_manager.allocate(self)

    def forward(self, x):
        x = torch.relu(self.pointwise(self.depthwise(torch.relu(self.conv(self.stem(x))))))
        return self.head(x.mean((2, 3)))


def _onnx_outputs(path, images):
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return session.run(None, {'image': images.numpy()})[0]


@pytest.mark.parametrize('exporter', ['dynamo', 'torchscript'])
def test_export_has_a_dynamic_batch(exporter, tmp_path):
    torch.manual_seed(0)
    model = _TinyKWNet()
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    model.eval()
    path = tmp_path / 'tiny.onnx'
    export_onnx.export(model, 16, path, exporter, opset=None)
    for batch in (1, 7):
        images = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            expected = model(images).numpy()
        logits = _onnx_outputs(path, images)
        assert logits.shape == (batch, 5)
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)
    assert np.abs(expected).max() > 0.1  # the comparison is not between near-zero outputs
    with torch.no_grad():  # a model that no longer computes what was exported fails the check
        model.head.conv.bias.add_(1e-3)
    with pytest.raises(utils.UserError, match='differs from PyTorch by'):
        export_onnx.check(model, 16, path, [7], tolerance=1e-4)


@pytest.mark.parametrize('model_name', ['kw_resnet18', 'kw_mobilenetv2_050'])
def test_export_onnx_round_trip(model_name, tmp_path):
    """The exporter of a checkpoint; onnxruntime and PyTorch agree at batch 1 and 7 (temperature 0).

    The TorchScript exporter keeps the test quick; the default dynamo exporter runs the same
    batch-independent layers (test_export_has_a_dynamic_batch)."""
    options = ['--model', model_name, '--nb_classes', 10, '--input_size', 64]
    model = _checkpoint(tmp_path / 'checkpoint.pth', options)
    path = tmp_path / 'model.onnx'
    result = _run('tools/export_onnx.py', *options, '--resume', tmp_path / 'checkpoint.pth', '-o', path,
                  '--exporter', 'torchscript')
    assert result.returncode == 0, result.stderr
    assert 'batch 1: onnxruntime output (1, 10)' in result.stdout
    assert 'batch 7: onnxruntime output (7, 10)' in result.stdout
    for batch in (1, 7):
        images = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            expected = model(images).numpy()
        np.testing.assert_allclose(_onnx_outputs(path, images), expected, rtol=0, atol=1e-4)
    assert np.abs(expected).max() > 0.1


def test_export_onnx_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.run(['--model', 'kw_resnet18', '--resume', str(tmp_path / 'missing.pth')])
    assert exit_info.value.code == f'error: checkpoint {tmp_path / "missing.pth"} does not exist; check the path.'
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.run(['--model', 'kw_resnet18', '-o', str(tmp_path / 'no' / 'model.onnx')])
    assert exit_info.value.code == 2 and 'the folder of --onnx' in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a main.py option with a bad value: reported by the tool
        export_onnx.run(['--model', 'kw_resnet18', '--input_size', 'large'])
    assert exit_info.value.code == 2
    assert "export_onnx.py: error: argument --input_size: invalid int value: 'large'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# predict.py
# ----------------------------------------------------------------------------------------------

def _printed_predictions(stdout):
    """{image path: [(probability %, class name), ...]} from predict.py's output."""
    predictions, current = {}, None
    for line in stdout.splitlines():
        if line.startswith('  '):
            _, probability, name = line.split(maxsplit=2)
            predictions[current].append((float(probability[:-1]), name))
        elif not line.startswith('Loaded weights'):
            current = line
            predictions[current] = []
    return predictions


def test_predict_prints_the_top5_of_a_checkpoint(tmp_path):
    """The DIGITS demo config with a checkpoint of ours: 10 classes (the checkpoint's, not main.py's
    default 1000), named by their index, at the checkpoint's temperature, after --eval's transform."""
    config = ROOT / 'configs' / 'demo' / 'kw1x_resnet18_digits.json'
    model = _checkpoint(tmp_path / 'checkpoint.pth', ['--kw_config', config, '--nb_classes', 10], temperature=0.3)
    image_path = tmp_path / 'digit.png'
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(image_path)
    result = _run('tools/predict.py', '--kw_config', config, '--resume', tmp_path / 'checkpoint.pth', image_path)
    assert result.returncode == 0, result.stderr
    [(path, top)] = _printed_predictions(result.stdout).items()
    assert path == str(image_path)

    args = main.parse_args(['--kw_config', str(config)])
    with Image.open(image_path) as image:
        images = build_transform(False, args)(image.convert('RGB')).unsqueeze(0)
    with torch.no_grad():
        probabilities = model(images).softmax(dim=1)[0]
    values, indices = probabilities.topk(5)
    assert [name for _, name in top] == [str(i) for i in indices.tolist()]
    assert [p for p, _ in top] == pytest.approx((100 * values).tolist(), abs=0.006)


def test_predict_names_imagenet_classes_and_resizes_any_image(tmp_path, capsys):
    from timm.data import ImageNetInfo
    image_path = tmp_path / 'wide.jpg'
    Image.fromarray(np.random.RandomState(1).randint(0, 256, (40, 90, 3), dtype=np.uint8)).save(image_path)
    predict.run([str(image_path), '--model', 'resnet18', '--input_size', '64', '--topk', '3'])
    [top] = _printed_predictions(capsys.readouterr().out).values()
    info = ImageNetInfo()
    descriptions = {info.index_to_description(i) for i in range(1000)}
    assert len(top) == 3 and all(name in descriptions for _, name in top)


def test_predict_class_names_file_and_errors(tmp_path, capsys):
    image_path = tmp_path / 'image.png'
    Image.new('RGB', (32, 32), (200, 30, 30)).save(image_path)
    names = tmp_path / 'names.txt'
    names.write_text('\n'.join(['cat', 'dog', 'bird']))
    model = ['--model', 'kw_resnet18', '--input_size', '32']
    predict.run([*model, '--nb_classes', '3', str(image_path), '--class_names', str(names)])
    [top] = _printed_predictions(capsys.readouterr().out).values()
    assert sorted(name for _, name in top) == ['bird', 'cat', 'dog']  # top-5 of 3 classes: all three

    (tmp_path / 'broken.png').write_bytes(b'not an image')
    for argv, message in [
            ([str(tmp_path / 'broken.png')], f'error: cannot read image {tmp_path / "broken.png"}'),
            ([str(image_path), '--nb_classes', '4', '--class_names', str(names)],
             f'error: --class_names {names} has 3 names for a model with 4 classes')]:
        with pytest.raises(SystemExit) as exit_info:
            predict.run([*model, *argv])
        assert exit_info.value.code.startswith(message)


@pytest.mark.parametrize('tool', ['model_table', 'plot_logs', 'export_onnx', 'predict'])
def test_every_tool_has_help(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        TOOLS[tool].run(['--help'])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith('usage: ')
