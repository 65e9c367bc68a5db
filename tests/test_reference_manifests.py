"""Every released config builds exactly the model the reference manifests describe.

``tests/reference/*.json`` are measurements of the original release (copied from the project's
shared reference data, never edited by hand): state-dict keys and shapes, parameter counts,
warehouses and the allocation of every KW layer.
"""
import json
from pathlib import Path

import pytest

import models
from modules.kernel_warehouse import KWConvNd

REFERENCE_DIR = Path(__file__).parent / 'reference'
MANIFESTS = sorted(REFERENCE_DIR.glob('*__*.json'))
CONFIG_DIR = Path(__file__).parent.parent / 'configs'
# Config families of this project, not of the original release (no manifest to match).
OUR_FAMILIES = {'demo', 'deit_tiny', 'deit_small'}


def test_every_released_config_is_shipped():
    index = json.loads((REFERENCE_DIR / 'INDEX.json').read_text())
    assert len(index) == len(MANIFESTS) == 20
    shipped = sorted(str(p.relative_to(CONFIG_DIR).with_suffix('')) for p in CONFIG_DIR.glob('*/*.json')
                     if p.parent.name not in OUR_FAMILIES)
    assert sorted(name for name, _ in index) == shipped
    for path in MANIFESTS:
        manifest = json.loads(path.read_text())
        assert json.loads((CONFIG_DIR / f"{manifest['config']}.json").read_text()) == manifest['config_json']


@pytest.fixture(scope='module', params=MANIFESTS, ids=lambda p: p.stem.split('__')[1])
def built(request):
    manifest = json.loads(request.param.read_text())
    model = models.create_model_from_config(manifest['config_json'], num_classes=manifest['num_classes'])
    return manifest, model


def test_state_dict_keys_and_shapes(built):
    manifest, model = built
    assert [[key, list(value.shape)] for key, value in model.state_dict().items()] == manifest['state_dict']


def test_num_params(built):
    manifest, model = built
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == manifest['num_params']


def _kw_layers(model):
    return [(name, layer) for name, layer in model.named_modules() if isinstance(layer, KWConvNd)]


def test_warehouses(built):
    manifest, model = built
    manager = getattr(model, 'warehouse_manager', None)
    num_warehouses = len(manager.weights) if manager is not None else 0
    assert num_warehouses == len(manifest['warehouses'])
    for warehouse in manifest['warehouses']:
        cells = manager.weights[warehouse['index']]
        assert list(cells.shape) == [warehouse['num_cells'], *warehouse['cell_shape']]
        users = [name for name, layer in _kw_layers(model) if layer.warehouse_id == warehouse['index']]
        assert users == warehouse['layers']


def test_kw_layer_allocation(built):
    manifest, model = built
    measured = [dict(
        module=name, warehouse=layer.warehouse_id, in_planes=layer.in_planes, out_planes=layer.out_planes,
        kernel_size=list(layer.kernel_size), stride=list(layer.stride), padding=list(layer.padding),
        groups=layer.groups, bias=layer.bias is not None, groups_spatial=layer.groups_spatial,
        groups_out_channel=layer.groups_out_channel, groups_in_channel=layer.groups_in_channel,
        num_mixtures=layer.num_mixtures, start_cell_idx=layer.start_cell_idx, end_cell_idx=layer.end_cell_idx,
        attention_hidden=layer.attention.fc1.out_features, nonlocal_basis=layer.attention.num_basis,
    ) for name, layer in _kw_layers(model)]
    assert measured == manifest['kw_layers']
