"""main.py as users run it: training, evaluation, configs, errors, distributed launch (all on the CPU)."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import main
import utils
from engine import get_temperature, train_one_epoch
from modules.kernel_warehouse import Attention, WarehouseManager, plan

ROOT = Path(__file__).parent.parent
# A tiny, deterministic recipe: no augmentation randomness beyond crops/flips, no mixup.
QUICK = ['--input_size', '32', '--batch_size', '8', '--epochs', '1', '--warmup_epochs', '0', '--num_workers', '0',
         '--device', 'cpu', '--aa', 'none', '--reprob', '0', '--mixup', '0', '--cutmix', '0', '--smoothing', '0',
         '--color_jitter', '0', '--print_freq', '100', '--train_samples', '16', '--val_samples', '12']


def run_main(*argv):
    return main.main(main.parse_args([str(a) for a in argv]))


def read_log(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / 'log.txt').read_text().splitlines()]


@pytest.mark.parametrize('data_set', ['FAKE', 'DIGITS'])
@pytest.mark.parametrize('model', ['kw_resnet18', 'kw_mobilenetv2_050', 'kw_convnext_tiny'])
def test_one_epoch_writes_log_and_checkpoint_and_eval_reproduces_it(model, data_set, tmp_path):
    out = tmp_path / 'run'
    run_main('--model', model, '--data_set', data_set, '--nb_classes', 5, '--output_dir', out,
             '--log_dir', tmp_path / 'tb', '--temp_epoch', 3, *QUICK)
    [record] = read_log(out)
    assert record['epoch'] == 0 and record['test_num_images'] == 12
    assert record['train_temperature'] == pytest.approx(get_temperature(1, 0, 2, temp_epoch=3))  # last of 2 steps
    assert {p.name for p in out.iterdir()} == {'log.txt', 'checkpoint-0.pth', 'checkpoint-best.pth'}
    assert any(tmp_path.joinpath('tb').iterdir())  # tensorboard events

    stats = run_main('--model', model, '--data_set', data_set, '--nb_classes', 5, '--eval', 'true',
                     '--resume', out / 'checkpoint-0.pth', *QUICK)
    assert stats['acc1'] == record['test_acc1'] and stats['acc5'] == record['test_acc5']
    assert stats['loss'] == pytest.approx(record['test_loss'], rel=1e-6)


def test_auto_resume_continues_from_the_newest_checkpoint(tmp_path, capsys):
    common = ['--model', 'kw_resnet18', '--data_set', 'FAKE', '--nb_classes', 3, '--output_dir', tmp_path,
              '--save_ckpt_num', 1, '--disable_eval', 'true', *QUICK]
    run_main(*common)
    run_main(*common, '--epochs', 2)
    assert [r['epoch'] for r in read_log(tmp_path)] == [0, 1]
    assert 'Continuing training at epoch 1' in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob('checkpoint-*.pth')) == ['checkpoint-1.pth']


@pytest.fixture
def float64():
    """Runs main.py in float64: the model is built in the default dtype and torchvision's ``to_tensor``
    converts images to it. Two float32 runs that only sum in another order (another memory layout,
    another split of the batch) differ by rounding that training amplifies: up to 7.4e-5 in the weights
    after two steps on one CPU, about 1e3 float32 epsilons. The same amplification of float64's epsilon
    (1.1e-16) stays below 1e-12, while a real difference moves the weights by the learning rate times a
    gradient (1e-4 and more here), so ``FLOAT64_TOLERANCE`` tells the two apart on any CPU."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


FLOAT64_TOLERANCE = dict(rtol=1e-9, atol=1e-9)


def test_gradient_accumulation_equals_a_larger_batch(tmp_path, float64):
    """update_freq 2 at batch 4 makes the same first update as batch 8 (no batch norm in KW ConvNeXt)."""
    weights = []
    for batch, update_freq in [(8, 1), (4, 2)]:
        out = tmp_path / f'b{batch}'
        run_main('--model', 'kw_convnext_tiny', '--data_set', 'FAKE', '--nb_classes', 4, '--opt', 'sgd',
                 '--lr', 0.5, '--temp_epoch', 0, '--disable_eval', 'true',
                 '--output_dir', out, *QUICK, '--train_samples', 8, '--batch_size', batch,
                 '--update_freq', update_freq)
        weights.append(torch.load(out / 'checkpoint-0.pth', weights_only=False)['model'])
    torch.manual_seed(0)  # main seeds with --seed 0 before building the model
    initial = main.build_model(main.parse_args(['--model', 'kw_convnext_tiny', '--nb_classes', '4'])).state_dict()
    moved = [k for k in weights[0] if not torch.equal(weights[0][k], initial[k])]
    assert len(moved) > 100  # the step changed the weights...
    for key in weights[0]:  # ...identically
        torch.testing.assert_close(weights[1][key], weights[0][key], **FLOAT64_TOLERANCE)


def _assert_trained_alike(out, expected_out):
    """The run in ``out`` logged the losses of the one in ``expected_out`` and saved the same weights under
    the same keys; returns its weights."""
    record, expected = read_log(out)[0], read_log(expected_out)[0]
    assert record['train_loss'] == pytest.approx(expected['train_loss'], rel=1e-9)
    # evaluation casts the logits to float32 (engine.evaluate) before the loss: one float32 rounding apart
    assert record['test_loss'] == pytest.approx(expected['test_loss'], rel=1e-6)
    weights, expected_weights = (torch.load(d / 'checkpoint-0.pth', weights_only=False)['model']
                                 for d in (out, expected_out))
    assert weights.keys() == expected_weights.keys()
    for key, value in expected_weights.items():
        torch.testing.assert_close(weights[key], value, **FLOAT64_TOLERANCE)
    return weights


def test_channels_last_trains_like_the_default_layout(tmp_path, float64):
    for channels_last in ['false', 'true']:
        run_main('--model', 'kw_resnet18', '--data_set', 'FAKE', '--nb_classes', 4, '--opt', 'sgd', '--lr', 0.01,
                 '--output_dir', tmp_path / channels_last, '--channels_last', channels_last, *QUICK)
    weights_cl = _assert_trained_alike(tmp_path / 'true', tmp_path / 'false')
    assert any(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
               for w in weights_cl.values())  # the run did store its convolutions channels-last


def test_compiled_model_trains_like_the_eager_one(tmp_path, float64):
    """--compile: the same losses and weights (the temperature changes every step, and at 32 px
    layer 4 runs the input-mixing path), checkpoints without the compile wrapper's key prefix."""
    for compile in ['false', 'true']:
        run_main('--model', 'kw_resnet18', '--data_set', 'FAKE', '--nb_classes', 4, '--opt', 'sgd', '--lr', 0.01,
                 '--temp_epoch', 1, '--output_dir', tmp_path / compile, '--compile', compile,
                 '--compile_backend', 'aot_eager', *QUICK)
    _assert_trained_alike(tmp_path / 'true', tmp_path / 'false')


class _TinyKW(nn.Module):
    def __init__(self):
        super().__init__()
        self.warehouse_manager = WarehouseManager(norm_layer=nn.LayerNorm)
        self.conv = self.warehouse_manager.reserve(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)
        self.warehouse_manager.store()
        self.warehouse_manager.allocate(self)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))

    def net_update_temperature(self, temperature):
        for m in self.modules():
            if isinstance(m, Attention):
                m.temperature = temperature


def test_temperature_per_iteration_follows_the_schedule():
    model = _TinyKW()
    seen = []
    model.conv.attention.register_forward_pre_hook(lambda module, args: seen.append(module.temperature))
    loader = [(torch.randn(2, 3, 6, 6), torch.tensor([0, 1]))] * 4
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    for epoch in range(3):
        train_one_epoch(model, nn.CrossEntropyLoss(), loader, optimizer, torch.device('cpu'), epoch, scaler,
                        temperature_fn=lambda e, step: get_temperature(step, e, 4, temp_epoch=2), print_freq=100)
    # 4 iterations per epoch over 2 epochs: 8 steps from 1 down to 0, then 0
    assert seen == pytest.approx([7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0, 0, 0, 0, 0])
    assert get_temperature(0, 0, 10, temp_epoch=1, temp_init_value=0.5) == pytest.approx(0.45)


@pytest.mark.parametrize('config, message', [
    ({'model': 'kw_resnet18', 'cell_num_ration': 2}, 'unknown option "cell_num_ration"; did you mean "cell_num_ratio"'),
    ({'model': 'kw_resnet18', 'lr': 'fast'}, '"lr" must be a number, got "fast"'),
    ({'model': 'kw_resnet18', 'model_ema': 'sometimes'}, '"model_ema" must be true or false'),
    ({'model': 'kw_resnet9000'}, "unknown model 'kw_resnet9000'; known models: resnet18, resnet50, kw_resnet18"),
    ({'model': 'kw_resnet18', 'lr': -0.1}, '--lr must be > 0, got -0.1'),
    ({'model': 'kw_resnet18', 'cell_num_ratio': 0}, '--cell_num_ratio must be > 0, got 0.0'),
    ({'model': 'kw_resnet18', 'data_set': 'MNIST'}, '"data_set" must be one of IMNET, image_folder, CIFAR'),
    ({'model': 'kw_resnet18', 'compile': True, 'compile_backend': 'fast'},
     "unknown --compile_backend 'fast'; choose from "),
    ({'model': 'kw_resnet18', 'compile': True, 'compile_backend': 'aot_eager', 'compile_mode': 'max-autotune'},
     "--compile_mode is a mode of the inductor backend, not of 'aot_eager'"),
    ({'model': 'kw_resnet18', 'compile': True, 'compile_mode': 'fastest'},
     "unknown --compile_mode 'fastest'; choose from default, "),
    ({'model': 'kw_resnet18', 'compile': True, 'cuda_graph': True},
     '--compile true and --cuda_graph true are two ways to cut launch overhead and cannot be combined'),
    ({'model': 'kw_resnet18', 'kw_convert': True},
     'kw_resnet18 is a KW model already: drop --kw_convert, or name a plain model such as resnet18.'),
    ({'model': 'efficientnet_b00', 'kw_convert': True},
     "--kw_convert true: timm has no model 'efficientnet_b00' (did you mean efficientnet_b0"),
    ({'model': 'efficientnet_b0'}, "unknown model 'efficientnet_b0'; known models: resnet18, resnet50, kw_resnet18, "),
    ({'model': 'efficientnet_b0'}, '(or any timm CNN with --kw_convert true).'),
])
def test_config_errors_are_one_clear_sentence(config, message, tmp_path, capsys):
    path = tmp_path / 'config.json'
    path.write_text(json.dumps({**config, 'output_dir': str(tmp_path / 'out')}))
    with pytest.raises(SystemExit) as exit_info:
        main.run(['--kw_config', str(path)])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_cuda_graph_on_the_cpu_fails_cleanly(tmp_path, capsys):
    out = tmp_path / 'out'
    with pytest.raises(SystemExit) as exit_info:
        main.run(['--model', 'kw_resnet18', '--data_set', 'FAKE', '--cuda_graph', 'true', '--output_dir', str(out),
                  *QUICK])
    assert exit_info.value.code != 0
    assert '--cuda_graph true needs a CUDA GPU and this run is on the CPU' in capsys.readouterr().err
    assert not out.exists()


class _Stop(Exception):
    pass


def _raising(error: Exception):
    """A function that raises ``error``, whatever it is called with."""
    def raise_error(*args, **kwargs):
        raise error
    return raise_error


@pytest.mark.parametrize('device, flag, expected_calls', [('cpu', 'true', 1), ('cpu', 'false', 0), ('cuda', 'true', 0)])
def test_main_keeps_freed_memory_on_the_cpu_unless_told_not_to(device, flag, expected_calls, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: device == 'cuda')  # no GPU is touched before the stop
    calls = []
    monkeypatch.setattr(utils, 'keep_freed_memory', lambda: calls.append(1) or True)
    monkeypatch.setattr(main, 'build_loaders', _raising(_Stop()))  # the step after the choice
    with pytest.raises(_Stop):
        run_main('--model', 'kw_resnet18', '--data_set', 'FAKE', *QUICK, '--device', device,
                 '--keep_freed_memory', flag)
    assert len(calls) == expected_calls
    assert ('Keeping freed memory for reuse' in capsys.readouterr().out) == bool(expected_calls)


# Frees touched 256 MiB blocks (argv[2] of them) from C and prints how much the resident memory fell (KiB).
_FREED_MEMORY_PROBE = """
import ctypes, sys
import utils
if sys.argv[1] == 'keep':
    assert utils.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def resident_kib():
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:'))
size = 256 << 20
blocks = [libc.malloc(size) for _ in range(int(sys.argv[2]))]
for block in blocks:
    ctypes.memset(block, 1, size)
before = resident_kib()
for block in reversed(blocks):
    libc.free(block)
print(before - resident_kib())
"""


def _resident_fall_kib(mode: str, blocks: int) -> int:
    return int(subprocess.run([sys.executable, '-c', _FREED_MEMORY_PROBE, mode, str(blocks)], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_keep_freed_memory_keeps_a_freed_block_resident():
    """With glibc's defaults a freed 256 MiB block goes back to the kernel; after keep_freed_memory it stays."""
    fall_kib = {mode: _resident_fall_kib(mode, 1) for mode in ('default', 'keep')}
    assert fall_kib['default'] > 200 << 10
    assert fall_kib['keep'] < 16 << 10


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_keep_freed_memory_keeps_more_than_a_c_int_of_freed_memory():
    """2.5 GiB freed at once (the original algorithm's KW ResNet18 step at batch 32 peaks at 4 GiB) stays
    resident: a trim threshold stops at 2 GiB, so trimming must be off."""
    assert _resident_fall_kib('keep', 10) < 16 << 10


def test_keep_freed_memory_is_a_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(sys, 'platform', 'darwin')
    assert utils.keep_freed_memory() is False
    monkeypatch.setattr(sys, 'platform', 'linux')
    monkeypatch.setattr(utils.ctypes, 'CDLL', _raising(OSError('no C library')))
    assert utils.keep_freed_memory() is False


def test_missing_data_folder_fails_cleanly_from_the_command_line(tmp_path):
    out = tmp_path / 'out'
    result = subprocess.run(
        [sys.executable, 'main.py', '--kw_config', 'configs/resnet18/kw1x_resnet18.json', '--data_path',
         str(tmp_path / 'imagenet'), '--output_dir', str(out), '--device', 'cpu'],
        cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f'error: ImageNet train folder {tmp_path}/imagenet/train does not exist; set --data_path to a folder of '
        f'class sub-folders.']
    assert not out.exists()


def test_eval_needs_weights(capsys):
    with pytest.raises(SystemExit):
        main.run(['--model', 'kw_resnet18', '--eval', 'true'])
    assert '--eval true needs the weights to evaluate' in capsys.readouterr().err


def test_finetune_on_other_classes_keeps_everything_but_the_classifier(tmp_path):
    source = main.build_model(main.parse_args(['--model', 'kw1d2x_mobilenetv2_050', '--nb_classes', '7']))
    torch.save({'model': source.state_dict()}, tmp_path / 'pretrained.pth')
    args = main.parse_args(['--model', 'kw1d2x_mobilenetv2_050', '--nb_classes', '3', '--finetune',
                            str(tmp_path / 'pretrained.pth')])
    model = main.build_model(args)
    state, reference = model.state_dict(), source.state_dict()
    classifier = {k for k in state if k.startswith('classifier.') or k == 'warehouse_manager.weights.9'}
    assert all(torch.equal(state[k], reference[k]) for k in state if k not in classifier)
    assert state['warehouse_manager.weights.9'].shape[1] == 3


def test_original_release_checkpoint_layouts_evaluate(tmp_path):
    model = main.build_model(main.parse_args(['--model', 'kw_resnet18', '--nb_classes', '5']))
    bare, ddp = tmp_path / 'bare.pth', tmp_path / 'ddp.pth'
    torch.save(model.state_dict(), bare)
    torch.save({'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}}, ddp)
    results = [run_main('--model', 'kw_resnet18', '--data_set', 'FAKE', '--nb_classes', 5, '--eval', 'true',
                        '--resume', path, *QUICK) for path in (bare, ddp)]
    assert results[0] == results[1]


def test_demo_configs_parse():
    for name in ('kw1x_resnet18_digits', 'resnet18_digits'):
        args = main.parse_args(['--kw_config', f'configs/demo/{name}.json'])
        assert args.data_set == 'DIGITS' and args.model.endswith('resnet18')


# main.py in float64 (see the float64 fixture), for launchers that start their own processes
FLOAT64_MAIN = """import runpy, sys, torch
torch.set_default_dtype(torch.float64)
sys.path.insert(0, {root!r})
runpy.run_path({main!r}, run_name='__main__')
"""


def _torchrun(out, *options):
    """main.py in float64 in two CPU processes (gloo), 13 validation images; SGD, which unlike Adam does
    not turn rounding-level gradients into full-size steps."""
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    launcher = out.parent / 'main_float64.py'
    launcher.write_text(FLOAT64_MAIN.format(root=str(ROOT), main=str(ROOT / 'main.py')))
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29531',
               str(launcher), '--model', 'kw_resnet18', '--data_set', 'FAKE', '--nb_classes', '4', '--opt', 'sgd',
               '--lr', '0.01', '--output_dir', str(out), *QUICK, '--batch_size', '4', '--val_samples', '13', *options]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope='module')
def torchrun_eager(tmp_path_factory):
    out = tmp_path_factory.mktemp('torchrun') / 'out'
    return out, _torchrun(out)


def test_torchrun_two_cpu_processes(torchrun_eager, float64):
    """torchrun with gloo: trains, evaluates each validation image once, only rank 0 writes."""
    out, result = torchrun_eager
    assert result.stdout.count('* Acc@1') == 1 and '(13 images' in result.stdout
    assert {p.name for p in out.iterdir()} == {'log.txt', 'checkpoint-0.pth', 'checkpoint-best.pth'}
    [record] = read_log(out)
    single = run_main('--model', 'kw_resnet18', '--data_set', 'FAKE', '--nb_classes', 4, '--eval', 'true',
                      '--resume', out / 'checkpoint-0.pth', *QUICK, '--val_samples', 13)
    assert single['acc1'] == pytest.approx(record['test_acc1']) and single['num_images'] == 13


def test_torchrun_compiled_trains_like_eager(torchrun_eager, tmp_path):
    """--compile under torchrun (the DDP model compiled): the losses and weights of the eager run."""
    eager_out, _ = torchrun_eager
    _torchrun(tmp_path / 'out', '--compile', 'true', '--compile_backend', 'aot_eager')
    _assert_trained_alike(tmp_path / 'out', eager_out)


def test_kw_convert_trains_and_evaluates_a_timm_model(tmp_path, capsys):
    """``--model NAME --kw_convert true``: any timm CNN, converted without a rule, with the KW options."""
    out = tmp_path / 'run'
    common = ['--model', 'mobilenetv3_small_050', '--kw_convert', 'true', '--cell_num_ratio', 2, '--data_set', 'FAKE',
              '--nb_classes', 5, *QUICK]
    run_main(*common, '--output_dir', out)
    [record] = read_log(out)
    printed = capsys.readouterr().out
    conversion = plan(timm.create_model('mobilenetv3_small_050', num_classes=5), cell_num_ratio=2)
    assert str(conversion).splitlines()[0] in printed
    weights = torch.load(out / 'checkpoint-0.pth', weights_only=False)['model']
    assert [tuple(weights[f'warehouse_manager.weights.{i}'].shape) for i in range(len(conversion.warehouses))] == \
        [(w.num_cells, *w.cell_shape) for w in conversion.warehouses]
    assert sum(v.numel() for k, v in weights.items() if 'running_' not in k and 'num_batches' not in k) == \
        conversion.params_after

    stats = run_main(*common, '--eval', 'true', '--resume', out / 'checkpoint-0.pth')
    assert stats['acc1'] == record['test_acc1'] and stats['loss'] == pytest.approx(record['test_loss'], rel=1e-6)


def test_kw_convert_reports_options_a_model_refuses(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.run(['--model', 'vgg11', '--kw_convert', 'true', '--drop_path', '0.1', '--data_set', 'FAKE',
                  '--output_dir', str(tmp_path / 'out'), *QUICK])
    assert exit_info.value.code != 0
    assert "--model vgg11 cannot be built with these options (" in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()
