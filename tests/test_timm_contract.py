"""timm's model contract on every registered model: pretrained cfgs, heads, features, intermediates,
gradient checkpointing, timm's arguments and local pretrained files (timm's own model tests are the
yardstick: docs/development.md says how to run them against ours)."""
import argparse

import pytest
import timm
import torch

import models
import utils
from modules.kernel_warehouse import KWLinear

# one model per family and kind, small enough for the CPU; the pretrained cfgs are checked on all
SMALL = ['plain_resnet18', 'kw_resnet18', 'plain_mobilenetv2_050', 'kw_mobilenetv2_050', 'kw1d2x_mobilenetv2_050',
         'plain_convnext_tiny', 'kw_convnext_tiny', 'deit_tiny', 'kw_deit_tiny']
KW_SMALL = [name for name in SMALL if name.startswith('kw')]


def _args(name):
    """Model arguments for a small input: the DeiTs take their image size (patch 16, 2 x 2 tokens)."""
    return dict(img_size=32) if 'deit' in name else {}


def _input(name, batch=2, dtype=torch.float32, size=64):
    """Images for ``name``: ``size`` px (the DeiTs take 32)."""
    torch.manual_seed(1)
    size = 32 if 'deit' in name else size
    return torch.randn(batch, 3, size, size, dtype=dtype)


def _build(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **_args(name), **kwargs)


@pytest.mark.parametrize('name', models.REGISTERED_NAMES)
def test_pretrained_cfg_names_the_input_and_the_layers(name):
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 224, 224) and cfg['num_classes'] == 1000 and cfg['interpolation'] == 'bicubic'
    assert cfg['crop_pct'] == 0.875 and cfg['paper_ids'] == 'arXiv:2308.08361' and cfg['architecture'] == name
    assert timm.models.get_pretrained_cfg(name).input_size == cfg['input_size']
    state = model.state_dict()
    for key in ('classifier', 'first_conv'):  # plain layers timm may adapt; KW layers have no weight
        names = (cfg[key],) if isinstance(cfg[key], str) else cfg[key]
        assert all(f'{layer}.weight' in state for layer in names)
    assert model.in_chans == 3 and model.num_classes == 1000 and model.num_features == model.head_hidden_size > 0
    assert len(timm.list_pretrained(name)) == 0  # no downloadable weights: a local file loads (below)


@pytest.mark.parametrize('name', SMALL)
def test_head_and_classifier_reset(name):
    model = _build(name, num_classes=5).eval()
    x = _input(name)
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert model(x).shape == (2, 5) and pre_logits.shape == (2, model.head_hidden_size)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pre_logits, rtol=0, atol=0)
        assert _build(name, num_classes=0).eval()(x).shape == pre_logits.shape
        model.reset_classifier(7)
        assert model(x).shape == (2, 7) and model.num_classes == 7
        if 'deit' not in name:  # unpooled feature maps (ConvNeXt's normalised, as its head norm is kept)
            model.reset_classifier(0, '')
            assert model(x).shape == features.shape
            if 'convnext' not in name:
                torch.testing.assert_close(model(x), features, rtol=0, atol=0)
            assert _build(name, num_classes=0, global_pool='').eval()(x).shape == features.shape


@pytest.mark.parametrize('name', ['kw1d2x_mobilenetv2_050'])
def test_reset_classifier_rebuilds_a_kw_classifier_warehouse(name):
    """The KW classifier's warehouse is sized anew (as a model built for that many classes) and keeps the
    model's dtype, device and mode; without classes it goes."""
    model = _build(name, num_classes=5).double().train()
    model.reset_classifier(9)
    built = _build(name, num_classes=9)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}
    assert all(p.dtype == torch.float64 for p in model.parameters()) and model.classifier.training
    assert isinstance(model.classifier[1], KWLinear)
    model(_input(name, dtype=torch.float64)).sum().backward()
    assert model.warehouse_manager.weights[-1].grad is not None
    model.reset_classifier(0)
    unclassified = _build(name, num_classes=0)
    assert model.state_dict().keys() == unclassified.state_dict().keys()


@pytest.mark.parametrize('name', SMALL)
def test_features_only_and_intermediates(name):
    model = _build(name).eval()
    x = _input(name)
    info = model.feature_info
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        assert len(intermediates) == len(info) >= 3
        for tap, level in zip(intermediates, info):
            assert tap.shape[1] == level['num_chs'] and tap.shape[-1] == x.shape[-1] // level['reduction']
        last = len(info) - 1
        for index in range(len(info)):
            [tap] = model.forward_intermediates(x, indices=[index], stop_early=True, intermediates_only=True)
            torch.testing.assert_close(tap, intermediates[index], rtol=0, atol=0)
    extractor = _build(name, features_only=True, out_indices=(1, last)).eval()  # the same seed: the same weights
    assert extractor.feature_info.channels() == [info[1]['num_chs'], info[last]['num_chs']]
    with torch.no_grad():
        outputs = extractor(x)
    for output, expected in zip(outputs, (intermediates[1], intermediates[last])):
        torch.testing.assert_close(output, expected, rtol=0, atol=0)


@pytest.mark.parametrize('name', SMALL)
def test_pruned_feature_extractor_trains_every_trainable_parameter(name):
    """features_only up to level 1: later levels go; warehouses no remaining layer draws on are frozen,
    so that every trainable parameter gets a gradient."""
    extractor = _build(name, features_only=True, out_indices=(0, 1)).train()
    sum(f.sum() for f in extractor(_input(name))).backward()
    trainable = [n for n, p in extractor.named_parameters() if p.requires_grad]
    assert trainable and [n for n, p in extractor.named_parameters() if p.requires_grad and p.grad is None] == []
    if name.startswith('kw'):
        assert any(not p.requires_grad for p in extractor.model.warehouse_manager.weights)


@pytest.mark.parametrize('name', KW_SMALL)
def test_gradient_checkpointing_computes_the_same_gradients(name):
    """KW layers under timm's checkpointing: in float64, the outputs and every gradient are the same."""
    x = _input(name, dtype=torch.float64, size=32)
    results = []
    for checkpointing in (False, True):
        model = _build(name, num_classes=3, drop_path_rate=0.0).double().train()
        model.set_grad_checkpointing(checkpointing)
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (out, grads), (out_cp, grads_cp) = results
    torch.testing.assert_close(out_cp, out, rtol=1e-10, atol=1e-12)
    assert grads_cp.keys() == grads.keys() and len(grads) == sum(1 for _ in model.parameters())
    for key, grad in grads.items():
        torch.testing.assert_close(grads_cp[key], grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('name', ['kw_resnet18', 'kw_mobilenetv2_050', 'kw_convnext_tiny'])
def test_timm_arguments(name):
    """The arguments timm's scripts and libraries pass: in_chans, drop_rate, global_pool, device, dtype."""
    gray = _build(name, in_chans=1, num_classes=4)
    assert gray(torch.randn(2, 1, 64, 64)).shape == (2, 4) and gray.in_chans == 1
    head_dropout = _build(name, drop_rate=0.3)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in head_dropout.modules())
    with pytest.raises(TypeError, match='the same setting'):
        _build(name, drop_rate=0.3, dropout=0.1)
    assert _build(name, global_pool='max', num_classes=0).eval()(_input(name)).ndim == 2
    assert all(p.dtype == torch.float64 for p in _build(name, dtype=torch.float64).parameters())
    assert all(p.is_meta for p in _build(name, device='meta').parameters())
    with pytest.raises(TypeError, match='unknown argument'):
        _build(name, not_a_model_arg=1)


def test_group_matcher_gives_layer_decay_groups():
    for name in ('kw_resnet18', 'kw_mobilenetv2_050', 'kw_convnext_tiny'):
        model = _build(name)
        groups = timm.models.group_parameters(model, model.group_matcher())
        assert len(groups) > 4
        assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))


def _checkpoints(model, tmp_path):
    """The layouts a pretrained file comes in: ours / the original release's training checkpoint (weights
    under ``model`` beside ``args`` and ``optimizer``), a bare state dict, and one saved from DDP."""
    state = model.state_dict()
    files = {'training': {'model': state, 'optimizer': {}, 'epoch': 3, 'args': argparse.Namespace(model='x')},
             'bare': state, 'ddp': {'state_dict': {f'module.{k}': v for k, v in state.items()}}}
    for layout, content in files.items():
        torch.save(content, tmp_path / f'{layout}.pth')
    return [tmp_path / f'{layout}.pth' for layout in files]



def test_timm_loading_leaves_our_checkpoints_loadable(tmp_path):
    """timm's loader allows argparse.Namespace inside a safe_globals block; leaving it must not take
    away the process-wide permission that main.py's checkpoints (with ``args``) need."""
    path = tmp_path / 'checkpoint.pth'
    model = _build('kw_resnet18', num_classes=3)
    torch.save({'model': model.state_dict(), 'args': argparse.Namespace(model='kw_resnet18')}, path)
    timm.create_model('kw_resnet18', pretrained=True, num_classes=3,
                      pretrained_cfg_overlay=dict(file=str(path), num_classes=3))
    assert utils.load_checkpoint_file(path)['args'].model == 'kw_resnet18'

def test_headless_model_drops_only_the_removed_classifier_warehouse():
    """num_classes=0 on kw1d2x_mobilenetv2_050, whose KW classifier has the last warehouse to itself:
    the checkpoint filter drops that warehouse with the classifier, and no other warehouse key."""
    trained = _build('kw1d2x_mobilenetv2_050', num_classes=6)
    headless = _build('kw1d2x_mobilenetv2_050', num_classes=0)
    removed = len(headless.warehouse_manager.weights)
    assert removed == len(trained.warehouse_manager.weights) - 1
    stray = f'warehouse_manager.weights.{removed + 1}'
    kept = models.checkpoint_filter_fn({**trained.state_dict(), stray: torch.zeros(1)}, headless)
    assert f'warehouse_manager.weights.{removed}' not in kept and stray in kept
    assert all(k in kept for k in headless.state_dict())


@pytest.mark.parametrize('name', ['kw_resnet18', 'kw1d2x_mobilenetv2_050', 'kw_deit_tiny'])
def test_pretrained_local_file_loads_the_timm_way(name, tmp_path):
    trained = _build(name, num_classes=6)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.rand_like(p))
    for path in _checkpoints(trained, tmp_path):
        overlay = dict(file=str(path), num_classes=6)
        loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **_args(name))
        for key, value in trained.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    # another number of classes: every weight but the classifier's (a KW classifier's warehouse too)
    other = timm.create_model(name, pretrained=True, num_classes=3, **_args(name),
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'bare.pth'), num_classes=6))
    dropped = models.classifier_state_keys(trained)
    assert dropped and all(torch.equal(other.state_dict()[k], v) for k, v in trained.state_dict().items()
                           if k not in dropped)
    features = timm.create_model(name, pretrained=True, features_only=True, **_args(name),
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / 'bare.pth'), num_classes=6))
    assert all(torch.equal(features.model.state_dict()[k], v) for k, v in trained.state_dict().items()
               if k in features.model.state_dict() and k not in dropped)
