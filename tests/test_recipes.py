"""The released recipes as users run them: every config's whole training recipe through main.py, the
train-time regularisers against the original release's, EMA, the augmentation at its largest
magnitude, and continuing a training checkpoint of the original release (KW-SPEC sections 7-8)."""
import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import _LEVEL_DENOM
from timm.layers import DropPath
from timm.utils import ModelEmaV3
from torch import nn

import datasets
import main
import models
from engine import get_temperature
from optim_factory import create_optimizer
from utils import UserError

ROOT = Path(__file__).parent.parent
CONFIG_DIR = ROOT / 'configs'
REGULARISERS = json.loads((Path(__file__).parent / 'reference' / 'train_regularisers.json').read_text())['configs']
RECIPES = sorted(str(p.relative_to(CONFIG_DIR).with_suffix('')) for p in CONFIG_DIR.glob('*/*.json')
                 if p.parent.name != 'demo')  # the demo configs have tests of their own (test_main.py)
# Tiny images, few steps; everything else is the config's recipe (augmentation, mixup/cutmix, label
# smoothing, EMA, optimizer, lr / weight-decay / temperature schedules).
# One optimizer step per epoch: a KW model's per-sample kernels cost the same at any image size.
TINY = ['--data_set', 'FAKE', '--nb_classes', '10', '--input_size', '48', '--batch_size', '4',
        '--train_samples', '4', '--val_samples', '4', '--epochs', '2', '--num_workers', '0', '--device', 'cpu',
        '--print_freq', '100']


def run_main(*argv):
    return main.main(main.parse_args([str(a) for a in argv]))


def read_log(output_dir: Path):
    return [json.loads(line) for line in (output_dir / 'log.txt').read_text().splitlines()]


def config_path(name: str) -> Path:
    return CONFIG_DIR / f'{name}.json'


def active_regularisers(model: nn.Module):
    """Module path -> (kind, probability) of every drop path and dropout that acts (p > 0)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, DropPath) and module.drop_prob > 0:
            found[name] = ('drop_path', module.drop_prob)
        elif isinstance(module, nn.Dropout) and module.p > 0:
            found[name] = ('dropout', module.p)
    return found


def assert_regularisers_match(model: nn.Module, reference: dict):
    expected = {path: (kind, p) for path, (kind, p) in reference.items() if p > 0}
    found = active_regularisers(model)
    assert list(found) == list(expected)  # the same modules, in module order
    for path, (kind, p) in expected.items():
        assert found[path][0] == kind
        assert found[path][1] == pytest.approx(p, rel=1e-6)  # the reference stores float32 rates


def test_every_released_config_has_reference_regularisers():
    assert len(REGULARISERS) == 20
    assert all(config_path(name).is_file() for name in REGULARISERS)


@pytest.mark.parametrize('name', sorted(REGULARISERS))
def test_released_config_builds_the_originals_regularisers(name):
    args = main.parse_args(['--kw_config', str(config_path(name)), '--nb_classes', '10'])
    assert_regularisers_match(main.build_model(args), REGULARISERS[name])
    config = json.loads(config_path(name).read_text())
    assert_regularisers_match(models.create_model_from_config(config, num_classes=10), REGULARISERS[name])


def test_models_built_directly_keep_their_own_classifier_dropout():
    """Only main.py and the configs pass dropout 0: built directly, the models keep the original classes'
    defaults (KW-SPEC section 8)."""
    assert models.create_model('mobilenetv2_100').classifier[0].p == 0.2
    assert models.create_model('kw1d2x_mobilenetv2_050').classifier[0].p == 0.1


# ----------------------------------------------------------------------------------------------
# The whole recipes
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', RECIPES)
def test_released_recipe_trains_through_main(name, tmp_path):
    config = json.loads(config_path(name).read_text())
    with_ema = config.get('model_ema', False) and config.get('model_ema_eval', False)
    # checkpoints (up to 1 GB for KW ResNet50 4x with AdamW) only where the test reads one
    run_main('--kw_config', config_path(name), '--output_dir', tmp_path, '--save_ckpt', with_ema, *TINY)
    log = read_log(tmp_path)
    assert [record['epoch'] for record in log] == [0, 1]
    assert all(math.isfinite(record['train_loss']) for record in log)
    iters_per_epoch = 1
    temperature = get_temperature(iters_per_epoch - 1, 1, iters_per_epoch, config.get('temp_epoch', 20))
    assert log[-1]['train_temperature'] == pytest.approx(temperature)
    assert (tmp_path / 'checkpoint-best-ema.pth').is_file() == with_ema
    if with_ema:
        assert all(record['test_ema_temperature'] == 0 for record in log)


def test_largest_augmentation_magnitude_trains(tmp_path, monkeypatch):
    """RandAugment at magnitude 10 every time, 15 ops an image: posterize keeps 0 bits (which Pillow 13
    refuses) many times in two epochs."""
    zero_bit_calls = []
    posterize = datasets.posterize_any_bits

    def counting_posterize(img, bits_to_keep, **kwargs):
        zero_bit_calls.append(bits_to_keep <= 0)
        return posterize(img, bits_to_keep, **kwargs)

    monkeypatch.setattr(datasets, 'posterize_any_bits', counting_posterize)
    run_main('--kw_config', config_path('resnet18/kw1x_resnet18'), '--aa', 'rand-m10-n15-mstd0-inc1',
             '--output_dir', tmp_path, *TINY, '--train_samples', 16)
    assert any(zero_bit_calls)
    assert len(read_log(tmp_path)) == 2


def test_every_augment_op_of_the_released_recipe_runs_at_its_largest_magnitude():
    args = main.parse_args(['--kw_config', str(config_path('convnext/kw1x_convnext_tiny')), '--input_size', '48'])
    ops = list(datasets._augment_ops(datasets.build_transform(True, args)))
    assert len(ops) == 15
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (48, 48, 3), dtype=np.uint8))
    for op in ops:
        op.magnitude, op.magnitude_std, op.prob = _LEVEL_DENOM, 0, 1.0
        out = op(image)
        assert out.size == image.size and out.mode == 'RGB'
        if op.name == 'PosterizeIncreasing':  # 0 bits kept
            assert not np.asarray(out).any()


@pytest.mark.parametrize('bits', range(9))
def test_posterize_any_bits_is_pillows_posterize(bits):
    """Pillow's posterize masks off the low 8 - bits bits of every band; with 0 bits, everything (as
    Pillow < 13 did, and the original release trained with)."""
    pixels = np.random.RandomState(bits).randint(0, 256, (16, 16, 3), dtype=np.uint8)
    out = datasets.posterize_any_bits(Image.fromarray(pixels), bits)
    mask = (0xFF << (8 - bits)) & 0xFF
    np.testing.assert_array_equal(np.asarray(out), pixels & mask)


def test_guard_posterize_covers_autoaugment_and_augmix():
    args = main.parse_args(['--model', 'resnet18', '--input_size', '48', '--aa', 'v0'])
    for policy in ('v0', 'augmix-m5-w4-d2'):
        args.aa = policy
        ops = list(datasets._augment_ops(datasets.build_transform(True, args)))
        assert ops
        assert all(op.aug_fn is not datasets.timm_posterize for op in ops)


# ----------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------

EMA_RUN = ['--model', 'kw_resnet18', '--model_ema', 'true', '--model_ema_eval', 'true', '--model_ema_decay', '0.5',
           '--temp_epoch', '10', '--aa', 'none', '--mixup', '0', '--cutmix', '0', '--reprob', '0', *TINY]


def test_ema_is_evaluated_at_temperature_0_and_its_best_saved(tmp_path):
    run_main(*EMA_RUN, '--output_dir', tmp_path)
    log = read_log(tmp_path)
    assert all(record['test_temperature'] > 0.5 for record in log)  # the model: its training temperature
    assert all(record['test_ema_temperature'] == 0 for record in log)
    best = torch.load(tmp_path / 'checkpoint-best-ema.pth', weights_only=False)
    assert best['max_accuracy_ema'] == max(record['test_ema_acc1'] for record in log)
    # --model_key model_ema evaluates the EMA weights of that checkpoint, at temperature 0
    stats = run_main(*EMA_RUN, '--eval', 'true', '--resume', tmp_path / 'checkpoint-best-ema.pth',
                     '--model_key', 'model_ema')
    best_epoch = log[best['epoch']]
    assert stats['temperature'] == 0 and stats['acc1'] == best_epoch['test_ema_acc1']
    assert stats['loss'] == pytest.approx(best_epoch['test_ema_loss'], rel=1e-5)


def _run_state(argv, tmp_path):
    args = main.parse_args([str(a) for a in argv])
    model = main.build_model(args)
    state = main.RunState(args, model, create_optimizer(args, model), torch.amp.GradScaler('cpu', enabled=False),
                          ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None)
    return args, model, state


@pytest.mark.parametrize('with_ema_weights', [False, True])
def test_resume_starts_the_ema_from_the_checkpoint(tmp_path, with_ema_weights):
    argv = ['--model', 'kw_resnet18', '--nb_classes', '10', '--model_ema', 'true']
    torch.manual_seed(1)
    _, trained, _ = _run_state(argv, tmp_path)
    checkpoint = {'model': trained.state_dict(), 'epoch': 0, 'temperature': 0.5}
    if with_ema_weights:
        checkpoint['model_ema'] = {k: v + 1 if v.is_floating_point() else v for k, v in trained.state_dict().items()}
    torch.save(checkpoint, tmp_path / 'checkpoint-0.pth')
    torch.manual_seed(2)  # another initialisation
    _, _, state = _run_state(argv, tmp_path)
    state.resume(str(tmp_path / 'checkpoint-0.pth'))
    expected = checkpoint['model_ema' if with_ema_weights else 'model']
    for key, value in state.model_ema.module.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Continuing a training checkpoint of the original release
# ----------------------------------------------------------------------------------------------

def _original_training_checkpoint(path: Path, model_name: str, split_no_decay: bool = False):
    """A checkpoint as the original's main.py writes it: AdamW over its parameter groups (ConvNeXt's
    get_parameter_groups: "decay", then "no_decay", by first appearance), after one step."""
    torch.manual_seed(3)
    model = models.create_model_from_config({'model': model_name, 'nb_classes': 10})
    decay = [p for n, p in model.named_parameters() if not (p.ndim == 1 or n.endswith('.bias'))]
    no_decay = [p for n, p in model.named_parameters() if p.ndim == 1 or n.endswith('.bias')]
    groups = [{'params': decay, 'weight_decay': 0.05, 'lr_scale': 1.0},
              {'params': no_decay, 'weight_decay': 0.0, 'lr_scale': 1.0}]
    if split_no_decay:  # e.g. layer-wise lr decay: groups per layer
        groups[1:] = [{'params': no_decay[:3], 'weight_decay': 0.0}, {'params': no_decay[3:], 'weight_decay': 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.8, 0.99))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': 0,
                'scaler': torch.amp.GradScaler('cpu').state_dict(),
                'args': argparse.Namespace(model=model_name, lr=4e-3)}, path)
    return model, optimizer


def test_resume_continues_a_training_checkpoint_of_the_original_release(tmp_path):
    path = tmp_path / 'checkpoint-0.pth'
    original, original_optimizer = _original_training_checkpoint(path, 'kw_resnet18')
    argv = ['--model', 'kw_resnet18', '--nb_classes', '10']
    _, model, state = _run_state(argv, tmp_path)
    state.resume(str(path))
    original_state = {name: original_optimizer.state[p] for name, p in original.named_parameters()}
    ours = {name: state.optimizer.state[p] for name, p in model.named_parameters()}
    assert ours.keys() == original_state.keys()
    for name, param_state in original_state.items():
        for key in ('exp_avg', 'exp_avg_sq', 'step'):
            torch.testing.assert_close(ours[name][key], param_state[key], rtol=0, atol=0)
    for group in state.optimizer.param_groups:  # the original's hyperparameters, by group
        assert group['betas'] == (0.8, 0.99)
        assert group['weight_decay'] == (0.05 if group['params'][0].ndim > 1 else 0.0)
    assert state.args.start_epoch == 1
    # and main.py trains on from it
    run_main(*argv, '--resume', path, '--epochs', 2, '--aa', 'none', '--mixup', 0, '--cutmix', 0,
             '--output_dir', tmp_path / 'run', *TINY)
    assert [record['epoch'] for record in read_log(tmp_path / 'run')] == [1]


def test_resume_refuses_other_optimizer_groups_and_names_finetune(tmp_path):
    path = tmp_path / 'checkpoint-0.pth'
    _original_training_checkpoint(path, 'kw_resnet18', split_no_decay=True)
    _, _, state = _run_state(['--model', 'kw_resnet18', '--nb_classes', '10'], tmp_path)
    with pytest.raises(UserError, match=f'--finetune {path}'):
        state.resume(str(path))


def test_resume_of_our_checkpoint_with_another_optimizer_is_one_sentence(tmp_path):
    path = tmp_path / 'checkpoint-0.pth'
    _, model, state = _run_state(['--model', 'kw_resnet18', '--nb_classes', '10', '--opt', 'sgd'], tmp_path)
    torch.save({'model': model.state_dict(), 'optimizer': {'state': {}, 'param_groups': [{'params': [0]}]},
                'epoch': 0, 'temperature': 0.0}, path)
    with pytest.raises(UserError, match='--finetune'):
        state.resume(str(path))
