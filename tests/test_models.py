"""Model registry, construction arguments, checkpoints, and float64 outputs of all released configs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import models
from modules.kernel_warehouse import Attention, KWConvNd
from tests.kw_reference import NaiveForward, naive_kw_forward

ROOT = Path(__file__).parent.parent
MANIFESTS = sorted((Path(__file__).parent / 'reference').glob('*__*.json'))
KW_MODELS = [name for name in models.MODEL_NAMES if name.startswith('kw')]


def test_import_registers_every_model_without_warnings():
    code = ('import warnings; warnings.simplefilter("error"); import models, timm; '
            'print(sorted(set(models.REGISTERED_NAMES) - set(timm.list_models())))')
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '[]'
    assert result.stderr == ''


def test_installed_library_imports_beside_a_project_with_its_own_models(tmp_path):
    """In a project with its own ``models`` and ``modules`` packages, ``kernelwarehouse.models`` is ours
    and builds with our KW layers, while ``import models`` stays the project's."""
    for package in ('models', 'modules'):
        (tmp_path / package).mkdir()
        (tmp_path / package / '__init__.py').write_text("OWNER = 'project'\n")
    code = ('import models, modules, timm; import kernelwarehouse.models as kw; '
            'from kernelwarehouse.modules.kernel_warehouse import KWConvNd; '
            'model = kw.create_model("kw_resnet18", num_classes=3); '
            'print(models.OWNER, modules.OWNER, type(model).__module__, '
            'any(isinstance(m, KWConvNd) for m in model.modules()), type(timm.create_model("resnet18")).__module__)')
    env = {key: value for key, value in os.environ.items() if key != 'PYTHONPATH'}
    result = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ['project', 'project', 'kernelwarehouse.models.resnet', 'True', 'timm.models.resnet']


@pytest.mark.parametrize('name, cls', [('resnet18', models.ResNet), ('resnet50', models.ResNet),
                                       ('mobilenetv2_100', models.MobileNetV2), ('mobilenetv2_050', models.MobileNetV2),
                                       ('convnext_tiny', models.ConvNeXt)])
def test_released_names_build_the_release_models(name, cls):
    """The configs' plain names are the release's baselines through our factories, ``plain_<name>`` in timm."""
    assert type(models.create_model(name, num_classes=3)) is cls
    assert type(timm.create_model(f'plain_{name}', num_classes=3)) is cls
    assert models.create_model_from_config({'model': name, 'nb_classes': 3}).num_classes == 3


def test_timm_names_are_left_alone():
    """After ``import models`` every timm name builds what it built before, and its pretrained tags stay."""
    code = ('import timm, json, sys; before = {n: (type(timm.create_model(n)).__module__, '
            'sorted(timm.list_pretrained(n + ".*"))) for n in sys.argv[1:]}; import models; '
            'after = {n: (type(timm.create_model(n)).__module__, sorted(timm.list_pretrained(n + ".*"))) '
            'for n in sys.argv[1:]}; print(json.dumps([before, after]))')
    names = sorted(models.RELEASED_NAMES)
    result = subprocess.run([sys.executable, '-c', code, *names], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    before, after = json.loads(result.stdout)
    assert before == after
    assert all(module.startswith('timm.') and tags for module, tags in after.values())


@pytest.mark.parametrize('name', models.MODEL_NAMES)
def test_none_arguments_mean_model_defaults(name):
    none_args = dict.fromkeys(['num_classes', 'drop_path_rate', 'dropout', 'reduction', 'cell_num_ratio',
                               'cell_inplane_ratio', 'cell_outplane_ratio', 'sharing_range',
                               'nonlocal_basis_ratio', 'layer_scale_init_value', 'head_init_scale'])
    shapes = {k: v.shape for k, v in models.create_model(name, **none_args).state_dict().items()}
    assert shapes == {k: v.shape for k, v in models.create_model(name).state_dict().items()}


def test_explicit_arguments_reach_the_model():
    model = models.create_model('kw_resnet18', num_classes=7, dropout=0.3, drop_path_rate=0.2, cell_num_ratio=2,
                              reduction=0.125, sharing_range='layer')
    assert model.fc.out_features == 7 and model.dropout.p == 0.3
    assert model.layer4[1].drop_path.drop_prob == pytest.approx(0.2)
    assert model.warehouse_manager.sharing_range == ('layer',)
    assert model.layer4[1].conv2.attention.fc1.out_features == 512 * 0.125
    assert model.warehouse_manager.cell_num_ratio == [2] * len(model.warehouse_manager.weights)
    convnext = models.create_model('kw_convnext_tiny', layer_scale_init_value=0.5, head_init_scale=0.)
    assert torch.all(convnext.stages[0][0].gamma == 0.5) and not convnext.head.weight.any()


def test_dropout_defaults_per_variant():
    assert models.create_model('mobilenetv2_100').classifier[0].p == 0.2
    assert models.create_model('kw1d2x_mobilenetv2_050').classifier[0].p == 0.1
    assert models.create_model('kw1d2x_mobilenetv2_050', dropout=0.4).classifier[0].p == 0.4
    assert models.create_model('kw_mobilenetv2_050').head_drop.p == 0.0


def test_string_sharing_range_equals_list():
    by_string = models.create_model('kw_resnet18', sharing_range='layer_conv')
    by_list = models.create_model('kw_resnet18', sharing_range=['layer', 'conv'])
    assert [w.shape for w in by_string.warehouse_manager.weights] == [w.shape for w in by_list.warehouse_manager.weights]
    assert len(by_list.warehouse_manager.weights) == 4


def test_bad_arguments_are_clear():
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['cell_num_ration'\]"):
        models.create_model('kw_resnet18', cell_num_ration=2)
    with pytest.raises(RuntimeError, match='No pretrained weights exist for plain_resnet18'):
        models.create_model('resnet18', pretrained=True)
    with pytest.raises(ValueError, match='cell_num_ratio must be a number > 0'):
        models.create_model('kw_resnet18', cell_num_ratio=0)


@pytest.mark.parametrize('name', models.MODEL_NAMES)
def test_net_update_temperature(name):
    model = models.create_model(name, num_classes=4)
    model.net_update_temperature(0.25)
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert bool(attentions) == name.startswith('kw')
    assert all(a.temperature == 0.25 for a in attentions)


@pytest.mark.parametrize('name', ['kw_resnet18', 'kw1d2x_mobilenetv2_050', 'kw_convnext_tiny'])
def test_state_dict_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=5).eval()
    torch.save(model.state_dict(), tmp_path / 'ckpt.pth')
    torch.manual_seed(1)
    restored = models.create_model(name, num_classes=5).eval()
    restored.load_state_dict(torch.load(tmp_path / 'ckpt.pth', weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))


@pytest.mark.parametrize('name', KW_MODELS)
def test_same_seed_same_model(name):
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        states.append(models.create_model(name, num_classes=5).state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.fixture(scope='module', params=MANIFESTS, ids=lambda p: p.stem.split('__')[1])
def float64_model(request):
    config = json.loads(request.param.read_text())['config_json']
    torch.manual_seed(0)
    # stochastic depth and dropout off: the comparison is about the deterministic computation
    model = models.create_model_from_config(config, num_classes=10, drop_path_rate=0., dropout=0.).double()
    with torch.no_grad():  # random batch-norm statistics, so eval mode is not an identity
        for name, buffer in model.named_buffers():
            if name.endswith('running_mean'):
                buffer.normal_(0, 0.1)
            elif name.endswith('running_var'):
                buffer.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize('temperature', [0.0, 0.5, 1.0])
def test_float64_eval_outputs_match_naive_reference(float64_model, temperature):
    """Whole released models equal the same weights run through the naive per-sample KW conv."""
    model = float64_model.eval()
    model.net_update_temperature(temperature)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(x)
        with NaiveForward():
            reference = model(x)
    assert ours.dtype == torch.float64 and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('temperature', [0.0, 0.7])
def test_float64_train_mode_layers_match_naive_reference(float64_model, temperature):
    """In train mode, batch norm over a tiny batch amplifies rounding through the depth of the
    network, so each KW layer is compared on the input it actually received."""
    model = float64_model.train()
    model.net_update_temperature(temperature)
    records = []
    hooks = [layer.register_forward_hook(lambda layer, args, out: records.append((layer, args[0], out)))
             for layer in model.modules() if isinstance(layer, KWConvNd)]
    if not hooks:
        pytest.skip('plain model: no KW layer')
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model(x)
            assert len(records) == len(hooks)
            for layer, layer_input, out in records:
                torch.testing.assert_close(out, naive_kw_forward(layer, layer_input), rtol=1e-9, atol=1e-12)
    finally:
        for hook in hooks:
            hook.remove()
