"""DeiT, plain and KW (built by the converter): layout, warehouses, grouping, configs, training steps."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from models.deit import KW_ROLES, KW_STAGE_DEPTHS
from modules.kernel_warehouse import KWConvNd, KWLinear

ROOT = Path(__file__).parent.parent
DEIT_CONFIGS = sorted(ROOT.glob('configs/deit_*/*.json'))
SMALL_INPUT = dict(img_size=32, patch_size=4)  # 8 x 8 patches: a fast CPU model


def _block_linears(model):
    return {name: m for name, m in model.named_modules() if name.startswith('blocks.') and isinstance(m, nn.Linear)}


@pytest.mark.parametrize('name, timm_name', [('deit_tiny', 'deit_tiny_patch16_224'),
                                             ('deit_small', 'deit_small_patch16_224')])
def test_plain_deit_is_timms_deit(name, timm_name):
    ours, theirs = models.create_model(name, num_classes=10), models.create_model(timm_name, num_classes=10)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)  # float64: no tolerance for kernel choice to fill
    with torch.no_grad():
        torch.testing.assert_close(ours.double().eval()(x), theirs.double().eval()(x))


def test_kw_deit_layers_and_warehouses():
    plain = models.create_model('deit_tiny', num_classes=10, **SMALL_INPUT)
    model = models.create_model('kw_deit_tiny', num_classes=10, **SMALL_INPUT)
    linears = _block_linears(plain)
    kw = {name: m for name, m in model.named_modules() if isinstance(m, KWLinear)}
    assert sorted(kw) == sorted(linears) and len(kw) == 4 * 12
    assert type(model.patch_embed.proj) is nn.Conv2d and type(model.head) is nn.Linear
    assert all(isinstance(m.conv.attention.norm1, nn.LayerNorm) for m in kw.values())

    manager = model.warehouse_manager
    expected_names = [f'stage{s}_layer_{role}' for s in range(len(KW_STAGE_DEPTHS)) for role in KW_ROLES]
    assert manager.warehouse_names == expected_names
    stage_of_block = [s for s, depth in enumerate(KW_STAGE_DEPTHS) for _ in range(depth)]
    for name, layer in kw.items():
        block, role = int(name.split('.')[1]), name.split('.')[-1]
        assert manager.warehouse_names[layer.conv.warehouse_id] == f'stage{stage_of_block[block]}_layer_{role}'
        # one warehouse per stage and role: the cell is the whole kernel, mixed from the stage's blocks
        assert layer.conv.num_mixtures == 1
        assert manager.weights[layer.conv.warehouse_id].shape[1:3] == linears[name].weight.shape


@pytest.mark.parametrize('cell_num_ratio', [1, 4])
def test_warehouses_hold_cell_num_ratio_times_the_block_kernels(cell_num_ratio):
    plain = models.create_model('deit_tiny', num_classes=10, **SMALL_INPUT)
    model = models.create_model('kw_deit_tiny', num_classes=10, cell_num_ratio=cell_num_ratio, **SMALL_INPUT)
    kernels = sum(m.weight.numel() for m in _block_linears(plain).values())
    assert sum(w.numel() for w in model.warehouse_manager.weights) == cell_num_ratio * kernels


@pytest.mark.parametrize('depths, sharing_range, num_warehouses', [((6, 6), 'layer', 8), ((4, 4, 4), 'layer', 12),
                                                                    ((3, 3, 3, 3), 'layer_fc', 12)])
def test_stage_grouping_is_an_argument(depths, sharing_range, num_warehouses):
    model = models.create_model('kw_deit_tiny', kw_stage_depths=depths, sharing_range=sharing_range, **SMALL_INPUT)
    assert len(model.warehouse_manager.weights) == num_warehouses


def test_bad_grouping_is_clear():
    with pytest.raises(ValueError, match=r'kw_stage_depths \(3, 3, 3\) must add up to the 12 blocks'):
        models.create_model('kw_deit_tiny', kw_stage_depths=(3, 3, 3))
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['img_szie'\]"):
        models.create_model('deit_tiny', img_szie=32)


@pytest.mark.parametrize('name', ['deit_tiny', 'kw_deit_tiny'])
def test_trains_a_few_steps_on_cpu(name):
    """32 px, patch 4, a fixed synthetic batch of 4 classes, AdamW: the loss falls. The temperature
    follows KW-SPEC section 3 for the first epoch of a run with ``steps`` iterations per epoch."""
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=4, **SMALL_INPUT).train()
    labels = torch.arange(8) % 4
    images = torch.randn(8, 3, 32, 32) + labels.view(-1, 1, 1, 1).float()  # class-dependent brightness
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    steps, temp_epoch, losses = 8, 20, []
    for step in range(steps):
        model.net_update_temperature(1.0 - (step + 1) / (steps * temp_epoch))
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_kw_deit_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    model = models.create_model('kw_deit_tiny', num_classes=5, **SMALL_INPUT).eval()
    torch.save(model.state_dict(), tmp_path / 'ckpt.pth')
    torch.manual_seed(1)
    restored = models.create_model('kw_deit_tiny', num_classes=5, **SMALL_INPUT).eval()
    restored.load_state_dict(torch.load(tmp_path / 'ckpt.pth', weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))


def test_configs_follow_the_deit_recipe():
    """Baseline, KW 1x and KW 4x per size; the KW configs add only KW settings to the baseline."""
    assert sorted(p.relative_to(ROOT / 'configs').as_posix() for p in DEIT_CONFIGS) == [
        f'deit_{size}/{prefix}deit_{size}.json' for size in ('small', 'tiny') for prefix in ('', 'kw1x_', 'kw4x_')]
    kw_keys = {'model', 'reduction', 'cell_num_ratio', 'cell_inplane_ratio', 'cell_outplane_ratio', 'sharing_range',
               'temp_epoch'}
    for path in DEIT_CONFIGS:
        config = json.loads(path.read_text())
        baseline = json.loads((path.parent / f'{path.parent.name}.json').read_text())
        recipe = {k: v for k, v in config.items() if k not in kw_keys}
        assert recipe == {k: v for k, v in baseline.items() if k != 'model'}
        if path.stem.startswith('kw'):
            assert config['model'] == f'kw_{path.parent.name}'
            assert config['cell_num_ratio'] == int(path.stem[2])  # kw1x_, kw4x_
        # lr for the total batch the recipe states: DeiT's 5e-4 per 512 images, 8 processes
        assert config['lr'] == pytest.approx(5e-4 * config['batch_size'] * 8 / 512)


@pytest.mark.parametrize('path', DEIT_CONFIGS, ids=lambda p: p.stem)
def test_configs_build(path):
    config = json.loads(path.read_text())
    model = models.create_model_from_config(config, num_classes=10, **SMALL_INPUT)
    assert config['model'] in models.MODEL_NAMES
    assert any(isinstance(m, KWConvNd) for m in model.modules()) == config['model'].startswith('kw')
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(config['drop_path'])


@pytest.mark.parametrize('model_name', ['deit_tiny', 'kw_deit_tiny'])
def test_main_trains_on_digits_and_eval_round_trips(model_name, tmp_path):
    """32 px, patch 4, through main.py: the loss falls and --eval reproduces the logged accuracy."""
    import main
    common = ['--model', model_name, '--data_set', 'DIGITS', '--input_size', '32', '--patch_size', '4',
              '--batch_size', '16', '--num_workers', '0', '--device', 'cpu', '--aa', 'none', '--reprob', '0',
              '--mixup', '0', '--cutmix', '0', '--smoothing', '0', '--color_jitter', '0', '--print_freq', '100',
              '--train_samples', '64', '--val_samples', '32', '--opt', 'adamw', '--lr', '2e-3',
              '--weight_decay', '0.05', '--warmup_epochs', '0', '--temp_epoch', '1']
    out = tmp_path / 'run'
    main.main(main.parse_args(common + ['--epochs', '4', '--output_dir', str(out)]))
    log = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert log[-1]['train_loss'] < 0.98 * log[0]['train_loss']
    stats = main.main(main.parse_args(common + ['--eval', 'true', '--resume', str(out / 'checkpoint-3.pth')]))
    assert stats['acc1'] == log[-1]['test_acc1'] and stats['num_images'] == 32
