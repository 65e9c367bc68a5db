"""The converter: selection and naming, equivalence with the built-in KW ResNets, timm models, errors."""
import copy
import io
import json
import pickle
import re
import warnings
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import create_conv2d
from torch import nn

import models
from modules.kernel_warehouse import (CONVERTIBLE_TYPES, Attention, KWConvNd, KWLinear, RegexRule, Stages, StageRule,
                                      convert, converter, plan)

REFERENCE = Path(__file__).parent / 'reference'
KW_SETTINGS = ('reduction', 'cell_num_ratio', 'cell_inplane_ratio', 'cell_outplane_ratio', 'sharing_range',
               'nonlocal_basis_ratio')


def resnet_rule(depths, num_convs, kw_first_block_of_stage0=True):
    """The naming of the KW ResNets (KW-SPEC section 5) for torchvision/timm ResNet module paths."""
    block = r'layer(?P<stage>\d)\.(?P<block>\d+)\.'
    handed_over = 'stage{handover_stage}_layer{handover_layer}_conv'
    pairs = [] if kw_first_block_of_stage0 else [(r'layer1\.0\.(conv1|downsample\.0)', None)]
    pairs += [(block + 'conv1', handed_over + '0'), (block + r'downsample\.0', handed_over + str(num_convs))]
    pairs += [(block + f'conv{c + 1}', f'stage{{stage}}_layer{{layer}}_conv{c}') for c in range(1, num_convs)]
    return RegexRule(pairs, fields=Stages(depths, first_stage=1))


def kw_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, KWConvNd)]


def allocation(name, layer):
    return dict(module=name, warehouse=layer.warehouse_id, kernel_size=list(layer.kernel_size),
                stride=list(layer.stride), padding=list(layer.padding), groups=layer.groups,
                bias=layer.bias is not None, num_mixtures=layer.num_mixtures, start_cell_idx=layer.start_cell_idx,
                end_cell_idx=layer.end_cell_idx, attention_hidden=layer.attention.fc1.out_features,
                nonlocal_basis=layer.attention.num_basis)


@pytest.mark.parametrize('manifest_name, depths, num_convs, kw_first', [
    ('resnet18__kw1x_resnet18', (2, 2, 2, 2), 2, True),
    ('resnet18__kw1d4x_resnet18', (2, 2, 2, 2), 2, True),
    ('resnet50__kw1d2x_resnet50', (3, 4, 6, 3), 3, False),
])
def test_converted_resnet_is_the_released_kw_resnet(manifest_name, depths, num_convs, kw_first):
    manifest = json.loads((REFERENCE / f'{manifest_name}.json').read_text())
    config = manifest['config_json']
    plain_name = config['model'].replace('kw_', '')
    settings = {k: config[k] for k in KW_SETTINGS if k in config}
    torch.manual_seed(0)
    model = convert(models.create_model(plain_name, num_classes=manifest['num_classes']),
                    resnet_rule(depths, num_convs, kw_first), **settings)

    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == manifest['state_dict']
    assert sum(p.numel() for p in model.parameters()) == manifest['num_params']
    manager = model.warehouse_manager
    assert len(manager.weights) == len(manifest['warehouses'])
    for warehouse in manifest['warehouses']:
        assert list(manager.weights[warehouse['index']].shape) == [warehouse['num_cells'], *warehouse['cell_shape']]
        assert [n for n, m in kw_layers(model) if m.warehouse_id == warehouse['index']] == warehouse['layers']
    expected = [{k: entry[k] for k in allocation('', kw_layers(model)[0][1])} for entry in manifest['kw_layers']]
    assert [allocation(name, layer) for name, layer in kw_layers(model)] == expected

    # Same computation: the built-in model's weights run identically in the converted one.
    builtin = models.create_model_from_config(config, num_classes=manifest['num_classes'])
    model.load_state_dict(builtin.state_dict(), strict=True)
    for m in (model, builtin):
        m.eval().net_update_temperature(0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), builtin(x), rtol=0, atol=0)


def _vit_rule():
    stages = Stages.even(12, 4)
    return RegexRule([(r'blocks\.(\d+)\.attn\.(qkv|proj)', 'stage{stage}_layer{0}_{1}'),
                      (r'blocks\.(\d+)\.mlp\.fc1', 'stage{stage}_layer{0}_fc'),  # fc1 and fc2 share
                      (r'blocks\.(\d+)\.mlp\.fc2', 'stage{stage}_layer{0}_fc')], fields=stages)


def _mobilenetv3_rule(path, layer):
    """A callable rule: every block conv by stage, the stem and the classifier on their own."""
    parts = path.split('.')
    if parts[0] == 'blocks' and len(parts) == 4:
        return f'stage{parts[1]}_layer{parts[2]}_{parts[3].replace("_", "")}'
    return {'conv_stem': 'stem', 'classifier': 'classifier'}.get(path)


TIMM_CASES = {
    # timm zero-initialises each block's last batch norm, which would hide the block convs' gradients
    'resnet34': dict(rule=resnet_rule((3, 4, 6, 3), 2), create=dict(zero_init_last=False),
                     kwargs=dict(sharing_range='layer_conv')),
    # these two rules share warehouses among layers of unrelated widths: convert() warns
    'efficientnet_b0': dict(rule=[(r'blocks\.(\d+)\.(\d+)\.(conv_pw|conv_dw|conv_pwl)', 'stage{0}_layer{1}_{2}')],
                            kwargs=dict(sharing_range='layer', depthwise=False, cell_num_ratio=2), warns=True),
    'mobilenetv3_small_100': dict(rule=_mobilenetv3_rule, kwargs=dict(
        sharing_range='layer', stem=True, classifier=True, exclude=[r'.*\.se\..*'],
        types=(*CONVERTIBLE_TYPES, timm.layers.Linear)), warns=True),
    'vit_tiny_patch16_224': dict(rule=_vit_rule(), create=dict(img_size=32, patch_size=4),
                                 kwargs=dict(sharing_range='layer', norm_layer=nn.LayerNorm)),
}


@pytest.mark.parametrize('name', TIMM_CASES)
def test_timm_models_convert_and_train(name):
    case = TIMM_CASES[name]
    torch.manual_seed(0)
    model = models.create_model(name, pretrained=False, num_classes=5, **case.get('create', {}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    selection = {k: v for k, v in case['kwargs'].items() if k in ('include', 'exclude', 'types', 'depthwise', 'stem',
                                                                   'classifier')}
    names = plan(model, case['rule'], **selection)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        convert(model, case['rule'], **case['kwargs'])
    assert any('attention parameters' in str(w.message) for w in caught) == case.get('warns', False)

    assert [n for n, _ in kw_layers(model)] == [p + '.conv' if isinstance(model.get_submodule(p), KWLinear) else p
                                                for p in names]
    assert len(model.warehouse_manager.weights) == len({model.warehouse_manager.fuse_warehouse_name(n)
                                                        for n in names.values()})
    after = model.state_dict()
    untouched = [k for k in before if not any(k.startswith(p + '.') for p in names)]
    assert all(torch.equal(before[k], after[k]) for k in untouched)
    # a KW linear holds its bias in its KW conv: <path>.conv.bias (KW-SPEC section 4)
    moved = {p + '.bias' for p in names if isinstance(model.get_submodule(p), KWLinear) and p + '.bias' in before}
    assert set(before) - set(after) == {p + '.weight' for p in names} | moved

    model.train().net_update_temperature(0.5)
    assert all(m.temperature == 0.5 for m in model.modules() if isinstance(m, Attention))
    # batch 4: with 2 samples, a batch norm over 1x1 maps outputs +-1 whatever its input (no gradient)
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    for cells in model.warehouse_manager.weights:
        assert cells.grad is not None and cells.grad.abs().sum() > 0
    assert all(layer.attention.fc1.weight.grad.abs().sum() > 0 for _, layer in kw_layers(model))


class ToyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 16, 1))
                                      for _ in range(2)])
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def every_layer(path, layer):
    return path.replace('.', '_')


@pytest.mark.parametrize('options, expected', [
    (dict(), ['blocks.0.0', 'blocks.0.1', 'blocks.1.0', 'blocks.1.1']),
    (dict(depthwise=False), ['blocks.0.1', 'blocks.1.1']),
    (dict(stem=True, classifier=True), ['stem', 'blocks.0.0', 'blocks.0.1', 'blocks.1.0', 'blocks.1.1', 'head']),
    (dict(include=[r'blocks\.1\..*'], exclude=[r'.*\.0']), ['blocks.1.1']),
    (dict(types=(nn.Linear,), classifier=True), ['head']),
])
def test_plan_selects_layers(options, expected):
    assert list(plan(ToyNet(), every_layer, **options)) == expected


def test_regex_rule_and_stages_fields():
    rule = RegexRule([(r'blocks\.(\d+)\.skip', None), (r'blocks\.(\d+)\.(\w+)', 's{stage}_l{layer}_h{handover_stage}'
                                                                                'l{handover_layer}_{1}')],
                     fields=Stages((2, 3)))
    assert rule('blocks.0.fc') == 's0_l0_h0l0_fc'
    assert rule('blocks.2.fc') == 's1_l0_h0l2_fc'  # first block of stage 1: handed over to stage 0
    assert rule('blocks.4.fc') == 's1_l2_h1l2_fc'
    assert rule('blocks.1.skip') is None and rule('head') is None
    nested = Stages((2, 2), first_stage=1)
    assert nested(re.fullmatch(r'layer(?P<stage>\d)\.(?P<block>\d)', 'layer2.1'))['stage'] == 1
    assert Stages.even(12, 4).depths == (3, 3, 3, 3)


@pytest.mark.parametrize('make, input_shape, expected_padding', [
    (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (3, 4, 9), (1,)),
    (lambda: nn.Conv2d(4, 8, 3, padding='same', dilation=2, groups=2), (3, 4, 7, 7), (2, 2)),
    (lambda: nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8, bias=False), (3, 8, 9, 9), (2, 2)),
    (lambda: nn.Conv3d(2, 4, (1, 3, 3), padding='valid'), (3, 2, 3, 5, 5), (0, 0, 0)),
    (lambda: nn.Linear(6, 10), (3, 5, 6), None),
])
def test_converted_layer_is_the_replaced_layer(make, input_shape, expected_padding):
    """With its cells set to the old kernel and temperature 1 (the attention is then exactly the
    one-hot prior), a converted layer computes what the layer it replaced did."""
    torch.manual_seed(0)
    model = nn.Module()
    model.layer = make().double()
    original = copy.deepcopy(model.layer)
    convert(model, lambda path, layer: 'only', stem=True, classifier=True)
    kw = model.layer.conv if isinstance(model.layer, KWLinear) else model.layer
    if expected_padding is not None:
        assert kw.padding == expected_padding
    weight = original.weight.reshape(original.weight.shape[0], original.weight.shape[1], -1)
    n, cell_out, cell_in, *cell_kernel = kw.cell_shape
    cells = weight.reshape(kw.groups_out_channel, cell_out, kw.groups_in_channel, cell_in, kw.groups_spatial)
    cells = cells.permute(4, 0, 2, 1, 3).reshape(n, cell_out, cell_in, *cell_kernel)  # mixture j takes cell j
    with torch.no_grad():
        model.warehouse_manager.weights[0].copy_(cells)
        if original.bias is not None:
            kw.bias.copy_(original.bias)
    model.net_update_temperature(1.0)
    x = torch.randn(input_shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.layer(x), original(x), rtol=1e-12, atol=1e-12)


def test_model_keeps_dtype_training_state_and_copies():
    model = ToyNet().double().eval()
    convert(model, every_layer)
    assert model.warehouse_manager.weights[0].dtype == torch.float64
    assert not any(m.training for m in model.modules())
    assert next(iter(model.state_dict())).startswith('warehouse_manager.')
    assert model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).shape == (2, 5)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.net_update_temperature(0.3)
        assert {m.temperature for m in clone.modules() if isinstance(m, Attention)} == {0.3}
    assert {m.temperature for m in model.modules() if isinstance(m, Attention)} == {0.0}


def test_incompatible_kernels_error_names_the_layers_and_leaves_the_model_unchanged():
    model = ToyNet()
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=r"holds kernels \(3, 3\) \('blocks\.0\.0'\) and \(1, 1\) \('blocks\.0\.1'\) "
                                         r"but spatial partition is off"):
        convert(model, lambda path, layer: 'stage0_conv', spatial_partition=False)
    assert list(model.state_dict()) == keys and not hasattr(model, 'warehouse_manager')


def test_cells_that_do_not_tile_name_the_layer():
    model = nn.Module()
    model.a, model.b, model.c = nn.Linear(8, 6), nn.Linear(8, 4), nn.Linear(8, 8)
    with pytest.raises(ValueError, match=r"do not tile a layer \('b'\) with 4 out"):
        convert(model, lambda path, layer: 'shared', stem=True, classifier=True, cell_outplane_ratio=1.5)


@pytest.mark.parametrize('make, rule, options, message', [
    (ToyNet, [(r'blocks\.(\d+)\.1', 'stage{stage}_pw{0}')], {}, r"template .* for layer 'blocks\.0\.1' uses the "
                                                                r"field 'stage'"),
    (ToyNet, [(r'block\.\d+', 'x')], {}, 'no layer was selected'),
    (ToyNet, lambda path, layer: 3, {}, r"returned 3 for layer 'blocks\.0\.0'"),
    (ToyNet, [(r'(', 'x')], {}, 'not a valid regular expression'),
    (ToyNet, every_layer, dict(types=(nn.MaxPool2d,)), 'types must be subclasses'),
    (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)), every_layer, {}, 'wrap the model'),
    (lambda: models.create_model('kw_resnet18'), every_layer, {}, 'already has a warehouse_manager'),
])
def test_user_mistakes_are_clear(make, rule, options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        convert(make(), rule, **options)


def _holder(layer):
    model = ToyNet()
    model.extra = layer
    return model


@pytest.mark.parametrize('layer, message', [
    (create_conv2d(16, 16, 3, stride=2, padding='same'), r"'extra' is a timm\.layers\..*Conv2dSame, which overrides "
                                                         r"Conv2d\.forward"),
    (nn.Conv2d(16, 16, 3, padding=1, padding_mode='reflect'), r"'extra' pads with 'reflect'"),
    (nn.Conv2d(16, 16, 2, padding='same'), r"'extra' uses padding='same' with an even kernel"),
])
def test_layers_a_kw_layer_cannot_reproduce_are_refused(layer, message):
    with pytest.raises(ValueError, match=message):
        convert(_holder(layer), every_layer, classifier=True)  # 'extra', the last layer, counts as the classifier


def test_shared_layer_is_refused():
    model = ToyNet()
    model.alias = model.blocks[0][1]
    with pytest.raises(ValueError, match=r"'blocks\.0\.1' is also registered as \['alias'\]"):
        convert(model, every_layer)


def test_stage_errors_are_clear():
    with pytest.raises(ValueError, match='block 4 is outside the 4 blocks'):
        Stages((2, 2)).locate(4)
    with pytest.raises(ValueError, match='do not split into 4 equal stages'):
        Stages.even(10, 4)
    with pytest.raises(ValueError, match='positive integers'):
        Stages((2, 0))
    with pytest.raises(ValueError, match=r'block 3 of stage 2 does not exist'):
        Stages((2, 2), first_stage=1).locate(3, 2)


# ---- convert(model) without a rule: StageRule ----

RESNET_MANIFESTS = ['resnet18__kw1x_resnet18', 'resnet18__kw2x_resnet18', 'resnet18__kw4x_resnet18',
                    'resnet18__kw1d2x_resnet18', 'resnet18__kw1d4x_resnet18', 'resnet50__kw1x_resnet50',
                    'resnet50__kw1d2x_resnet50', 'resnet50__kw4x_resnet50']


@pytest.mark.parametrize('manifest_name', RESNET_MANIFESTS)
def test_automatic_rule_gives_the_released_kw_resnets(manifest_name):
    """One warehouse per stage with the hand-over, found from feature_info and one traced pass, is
    the layout of every released KW ResNet (whose ResNet-50s keep layer1.0's conv1 and shortcut plain)."""
    manifest = json.loads((REFERENCE / f'{manifest_name}.json').read_text())
    config = manifest['config_json']
    settings = {k: config[k] for k in KW_SETTINGS if k in config and k != 'sharing_range'}
    exclude = [r'layer1\.0\.(conv1|downsample\.0)'] if 'resnet50' in manifest_name else None
    model = models.create_model(config['model'].replace('kw_', ''), num_classes=manifest['num_classes'])
    convert(model, exclude=exclude, **settings)

    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == manifest['state_dict']
    assert sum(p.numel() for p in model.parameters()) == manifest['num_params']
    for warehouse in manifest['warehouses']:
        assert [n for n, m in kw_layers(model) if m.warehouse_id == warehouse['index']] == warehouse['layers']


# name: timm.create_model arguments (timm zero-initialises each ResNet and RegNet block's last batch
# norm, which would hide the block convs' gradients)
AUTO_FAMILIES = {'resnet34': dict(zero_init_last=False), 'efficientnet_b0': {}, 'mobilenetv3_large_100': {},
                 'convnext_atto': {}, 'regnety_002': dict(zero_init_last=False)}
SIZE_PROMISE = 1.4  # a 1x conversion (1000 classes) has at most 1.4x the plain model's parameters
WAREHOUSE_NAME = re.compile(r'stage(\d+)_(conv|dwconv|gconv|linear)(_part\d+)?')


def _kind(layer):
    if isinstance(layer, KWLinear):
        return 'linear'
    return 'conv' if layer.groups == 1 else 'dwconv' if layer.groups == layer.in_planes else 'gconv'


@pytest.mark.parametrize('name', AUTO_FAMILIES)
def test_automatic_rule_on_timm_families(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **AUTO_FAMILIES[name])
    conversion = plan(model)
    assert conversion.params_after <= SIZE_PROMISE * conversion.params_before
    assert conversion.attention_params <= converter.ATTENTION_WARNING_RATIO * conversion.params_before

    model.reset_classifier(5)
    conversion = plan(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        convert(model)
    assert not [w for w in caught if 'attention parameters' in str(w.message)]
    assert sum(p.numel() for p in model.parameters()) == conversion.params_after
    manager = model.warehouse_manager
    assert manager.warehouse_names == [w.name for w in conversion.warehouses]
    for layer_path, warehouse in conversion.items():
        layer = model.get_submodule(layer_path)
        assert WAREHOUSE_NAME.fullmatch(warehouse)
        assert _kind(layer) == WAREHOUSE_NAME.fullmatch(warehouse).group(2)
        assert (layer.conv if isinstance(layer, KWLinear) else layer).warehouse_id == \
            manager.warehouse_names.index(warehouse)
    stages = {int(WAREHOUSE_NAME.fullmatch(w).group(1)) for w in conversion.values()}
    # every stage after the first (which may be just the plain stem) has KW layers; no stage is made up
    assert set(range(1, len(model.feature_info))) <= stages <= set(range(len(model.feature_info)))

    # a training step moves every warehouse
    model.train().net_update_temperature(0.5)
    before = [w.detach().clone() for w in manager.weights]
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.arange(4))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(old, new) for old, new in zip(before, manager.weights))

    # the state dict round-trips into the same conversion of a new model
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    again = convert(timm.create_model(name, num_classes=5, **AUTO_FAMILIES[name]))
    again.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    for m in (model, again):
        m.eval().net_update_temperature(0.0)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_automatic_rule_hands_over_reads_stages_and_keeps_pooled_inputs_plain():
    conversion = plan(timm.create_model('efficientnet_b0'))
    assert conversion.kept_plain['conv_stem'] == 'stem' and conversion.kept_plain['classifier'] == 'classifier'
    se_layers = [p for p in conversion.kept_plain if '.se.' in p]
    assert len(se_layers) == 32 and all(conversion.kept_plain[p] == 'sees a pooled 1x1 input' for p in se_layers)
    # blocks.1.0's expansion reads stage 0's output (16 channels at 1/2): stage 0's warehouse; its
    # depthwise conv reads the expanded 96 channels: stage 1
    assert conversion['blocks.1.0.conv_pw'] == 'stage0_conv'
    assert conversion['blocks.1.0.conv_dw'].startswith('stage1_dwconv')
    assert conversion['conv_head'].startswith('stage4_conv')  # after the last stage: the last stage's
    # timm's ResNet: layer2.0's conv1 and shortcut read layer1's output
    resnet = plan(timm.create_model('resnet34'))
    assert resnet['layer2.0.conv1'] == resnet['layer2.0.downsample.0'] == resnet['layer1.0.conv1'] == 'stage1_conv'
    assert resnet['layer2.0.conv2'] == 'stage2_conv'


def test_plan_describes_and_changes_nothing():
    model = timm.create_model('mobilenetv3_small_050').train()
    model.blocks[1].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    conversion = plan(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # batch norm statistics too
    assert [m.training for m in model.modules()] == modes
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())

    text = str(conversion)
    before, after = conversion.params_before, conversion.params_after
    assert f'{len(conversion)} of {len(conversion) + len(conversion.kept_plain)} conv/linear layers into ' \
           f'{len(conversion.warehouses)} warehouses' in text
    assert f'{before / 1e6:.2f}M -> {after / 1e6:.2f}M (x{after / before:.2f}' in text
    assert 'stem: conv_stem' in text and 'sees a pooled 1x1 input: blocks.0.0.se.conv_reduce' in text
    assert all(w.name in text for w in conversion.warehouses)
    convert(model)
    assert sum(p.numel() for p in model.parameters()) == after
    cells = model.warehouse_manager.weights
    assert [(w.num_cells, *w.cell_shape) for w in conversion.warehouses] == [tuple(c.shape) for c in cells]


def test_budget_splits_and_sharing_range_joins():
    model = timm.create_model('mobilenetv3_small_050')
    split = plan(model)
    assert any('_part' in w.name for w in split.warehouses)
    unsplit = plan(model, StageRule(attention_budget=float('inf')))
    assert {w.name for w in unsplit.warehouses} == {re.sub('_part\\d+', '', w.name) for w in split.warehouses}
    joined = plan(model, sharing_range='part')
    assert [w.layers for w in joined.warehouses] == [w.layers for w in unsplit.warehouses]


def test_conversion_that_multiplies_the_parameters_warns():
    """A hand-written rule that puts layers of unrelated widths together: tiny cells, huge attentions."""
    model = timm.create_model('mobilenetv3_small_050')
    rule = [(r'blocks\.(\d+)\.(\d+)\.(conv_pw|conv_dw|conv_pwl)', 'stage{0}_layer{1}_{2}')]
    with pytest.warns(UserWarning, match=r'converting MobileNetV3 adds [\d.]+M attention parameters \(1\.59M -> '):
        convert(model, rule, sharing_range='layer')


@pytest.mark.parametrize('make, options, message', [
    (ToyNet, {}, "reads the stages of the model from timm's feature_info, which ToyNet does not have"),
    (lambda: timm.create_model('resnet18'), dict(cell_num_ratio=[1, 2]),
     'cell_num_ratio has 2 values, one per warehouse, but convert.. without a rule chooses the warehouses'),
])
def test_automatic_rule_mistakes_are_clear(make, options, message):
    model = make()
    with pytest.raises(ValueError, match=message):
        convert(model, **options)
    assert not hasattr(model, 'warehouse_manager')
    with pytest.raises(ValueError, match='attention_budget must be > 0'):
        StageRule(attention_budget=0)
