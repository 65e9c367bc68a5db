"""Runs that survive kills, bad input and untrusted checkpoints without losing work (CPU)."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import main
import utils
from datasets import EpochSampler

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}
# kw_resnet18 with EMA, 2 optimizer steps per epoch, no evaluation: small and deterministic
RUN = ['--model', 'kw_resnet18', '--data_set', 'FAKE', '--nb_classes', '4', '--input_size', '32', '--batch_size', '8',
       '--train_samples', '16', '--epochs', '3', '--warmup_epochs', '1', '--temp_epoch', '2', '--num_workers', '0',
       '--device', 'cpu', '--model_ema', 'true', '--model_ema_decay', '0.9', '--disable_eval', 'true',
       '--print_freq', '100', '--drop_path', '0.1']


def _launch(output_dir, *extra):
    return subprocess.Popen([sys.executable, 'main.py', *RUN, '--output_dir', str(output_dir), *extra], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when(process, path, timeout=600):
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _final_weights(output_dir):
    checkpoint = torch.load(Path(output_dir) / 'checkpoint-2.pth', weights_only=False)
    return checkpoint['model'], checkpoint['model_ema']


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp('uninterrupted')
    process = _launch(out, '--save_ckpt_steps', '1')
    _, stderr = process.communicate()
    assert process.returncode == 0, stderr
    return _final_weights(out)


@pytest.mark.parametrize('kill_after', ['checkpoint-0.pth', 'checkpoint-1-step1.pth'])
def test_killed_run_resumes_to_identical_weights(uninterrupted, kill_after, tmp_path):
    """SIGKILL after epoch 0, or in the middle of epoch 1; auto-resume ends bitwise equal."""
    process = _launch(tmp_path, '--save_ckpt_steps', '1')
    _kill_when(process, tmp_path / kill_after)
    resumed = _launch(tmp_path, '--save_ckpt_steps', '1')
    stdout, stderr = resumed.communicate()
    assert resumed.returncode == 0, stderr
    assert 'Continuing training at epoch' in stdout
    for ours, reference in zip(_final_weights(tmp_path), uninterrupted):
        assert ours.keys() == reference.keys()
        assert all(torch.equal(ours[k], reference[k]) for k in ours)


SAVE_LOOP = '''
import sys, torch, utils
for epoch in range(10 ** 6):
    utils.save_checkpoint({'model': {'w': torch.full((2_000_000,), float(epoch))}, 'epoch': epoch},
                          f'{sys.argv[1]}/checkpoint-{epoch}.pth')
'''


def test_save_killed_at_random_points_never_breaks_auto_resume(tmp_path):
    rng = random.Random(0)
    for trial in range(4):
        out = tmp_path / str(trial)
        out.mkdir()
        process = subprocess.Popen([sys.executable, '-c', SAVE_LOOP, str(out)], cwd=ROOT, env=ENV)
        _kill_when(process, out / 'checkpoint-1.pth')
        time.sleep(rng.uniform(0, 0.3))  # the writer was killed at a random point of some save
        found = utils.run_checkpoints(out)
        assert found, 'no checkpoint survived'
        for _, path in found:  # every file auto-resume may pick is complete
            checkpoint = utils.load_checkpoint_file(path)
            assert torch.equal(checkpoint['model']['w'], torch.full((2_000_000,), float(checkpoint['epoch'])))


def test_auto_resume_skips_a_corrupt_newest_checkpoint(tmp_path, capsys):
    main.main(main.parse_args(RUN + ['--epochs', '1', '--output_dir', str(tmp_path)]))
    (tmp_path / 'checkpoint-1.pth').write_bytes(b'not a checkpoint')
    main.main(main.parse_args(RUN + ['--epochs', '2', '--output_dir', str(tmp_path)]))
    out = capsys.readouterr().out
    assert f'Warning: skipping {tmp_path}/checkpoint-1.pth' in out and 'Continuing training at epoch 1' in out


class _WritesMarker:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@pytest.mark.parametrize('option', ['--resume', '--finetune', '--eval'])
def test_malicious_checkpoint_is_refused(option, tmp_path, capsys):
    marker, evil = tmp_path / 'marker', tmp_path / 'evil.pth'
    torch.save({'model': {'w': torch.zeros(1)}, 'payload': _WritesMarker(marker)}, evil)
    argv = RUN + ['--output_dir', str(tmp_path / 'out')]
    argv += ['--eval', 'true', '--resume', str(evil)] if option == '--eval' else [option, str(evil)]
    with pytest.raises(SystemExit) as exit_info:
        main.run(argv)
    assert exit_info.value.code == 1
    assert 'needs arbitrary code to unpickle' in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / 'out').exists()


def _run_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.run([str(a) for a in argv])
    assert exit_info.value.code == 1
    return capsys.readouterr().err.strip()


def test_non_finite_loss_stops_and_names_the_last_good_checkpoint(tmp_path, capsys):
    argv = RUN + ['--output_dir', tmp_path, '--opt', 'sgd', '--warmup_epochs', '0',
                  '--model_ema', 'false']
    main.main(main.parse_args([str(a) for a in argv + ['--epochs', '1', '--lr', '0.01']]))
    before = (tmp_path / 'checkpoint-0.pth').read_bytes()
    error = _run_error(argv + ['--lr', '1e30'], capsys)
    assert error.startswith('error: the loss is nan at epoch 1, iteration ') or 'the loss is inf' in error
    assert error.endswith(f'the last good checkpoint is {tmp_path}/checkpoint-0.pth.')
    assert sorted(p.name for p in tmp_path.glob('checkpoint-*')) == ['checkpoint-0.pth']
    assert (tmp_path / 'checkpoint-0.pth').read_bytes() == before


def test_checkpoint_of_another_model_or_config(tmp_path, capsys):
    main.main(main.parse_args(RUN + ['--epochs', '1', '--output_dir', str(tmp_path)]))
    checkpoint = tmp_path / 'checkpoint-0.pth'
    error = _run_error(RUN + ['--output_dir', tmp_path, '--model', 'kw_resnet50'], capsys)
    assert error == (f'error: {checkpoint} is a checkpoint of kw_resnet18, not kw_resnet50; resume it with '
                     f'--model kw_resnet18, or use another --output_dir (or --auto_resume false).')
    error = _run_error(RUN + ['--eval', 'true', '--resume', checkpoint, '--cell_num_ratio', '2'], capsys)
    assert error.startswith(f'error: checkpoint {checkpoint} does not fit this model (')
    assert 'wrong shape (checkpoint vs model): warehouse_manager.weights.0 (56, 64, 64, 1, 1) vs (112, 64, 64, 1, ' \
           '1)' in error and error.count('\n') == 0


def test_truncated_checkpoint(tmp_path, capsys):
    main.main(main.parse_args(RUN + ['--epochs', '1', '--output_dir', str(tmp_path)]))
    path = tmp_path / 'checkpoint-0.pth'
    path.write_bytes(path.read_bytes()[:4096])
    error = _run_error(RUN + ['--resume', path, '--auto_resume', 'false'], capsys)
    assert error.startswith(f'error: checkpoint {path} is truncated or corrupt (')


def _image_folder(root, classes=('a', 'b'), per_class=4):
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new('RGB', (40, 40), (i * 50, 10, 200)).save(root / name / f'{i}.png')


FOLDER_RUN = ['--model', 'resnet18', '--data_set', 'image_folder', '--input_size', '32', '--batch_size', '4',
              '--epochs', '1', '--num_workers', '0', '--device', 'cpu', '--print_freq', '100', '--mixup', '0',
              '--cutmix', '0']


@pytest.mark.parametrize('num_workers', ['0', '2'])
def test_unreadable_image_is_reported_with_its_path(tmp_path, capsys, num_workers):
    _image_folder(tmp_path / 'train')
    _image_folder(tmp_path / 'val')
    bad = tmp_path / 'train' / 'b' / 'empty.png'
    bad.write_bytes(b'')
    error = _run_error(FOLDER_RUN + ['--data_path', tmp_path / 'train', '--eval_data_path', tmp_path / 'val',
                                     '--batch_size', '9', '--num_workers', num_workers], capsys)
    assert error.startswith(f'error: cannot read image {bad} (') and error.endswith('remove or replace the file.')
    assert error.count('\n') == 0


def test_empty_class_folder(tmp_path, capsys):
    _image_folder(tmp_path / 'train')
    (tmp_path / 'train' / 'c').mkdir()
    error = _run_error(FOLDER_RUN + ['--data_path', tmp_path / 'train', '--disable_eval', 'true'], capsys)
    assert error.startswith(f'error: train image folder {tmp_path}/train is not usable: ')
    assert "Found no valid file for the classes c" in error


def test_full_disk_when_saving_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    main.main(main.parse_args(RUN + ['--epochs', '1', '--output_dir', str(tmp_path)]))
    before = (tmp_path / 'checkpoint-0.pth').read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b'partial')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(utils.torch, 'save', disk_full)
    error = _run_error(RUN + ['--epochs', '2', '--output_dir', tmp_path], capsys)
    assert error == (f'error: could not save checkpoint {tmp_path}/checkpoint-1.pth (No space left on device); '
                     f'free disk space or choose another --output_dir.')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint-0.pth', 'log.txt']
    assert (tmp_path / 'checkpoint-0.pth').read_bytes() == before


def test_failing_rank_stops_the_whole_job_promptly(tmp_path):
    """One process meets a bad image; torchrun stops the other instead of letting it wait in a collective."""
    _image_folder(tmp_path / 'train', per_class=8)
    files = sorted((tmp_path / 'train').rglob('*.png'))
    # the first image rank 1 draws in epoch 0 becomes unreadable
    sampler = EpochSampler(files, num_replicas=2, rank=1, seed=0)
    sampler.set_epoch(0)
    bad = files[next(iter(sampler))]
    bad.write_bytes(b'')
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29533',
               'main.py', *FOLDER_RUN, '--data_path', str(tmp_path / 'train'), '--disable_eval', 'true']
    start = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode != 0
    assert time.time() - start < 120
    assert f'error: cannot read image {bad}' in result.stderr
