"""KW layers against the naive reference of KW-SPEC sections 2-4, and the manager's checks."""
import pytest
import torch
from torch import nn

from modules.kernel_warehouse import (Attention, KWConv1d, KWConv2d, KWConv3d, KWLinear, WarehouseManager,
                                      parse_sharing_range, set_temperature)
from tests.kw_reference import KWNet, naive_kw_forward

torch.set_default_dtype(torch.float32)


def _spec(in_planes, out_planes, kernel_size, layer_type='conv2d', name='stage0_layer0_conv0', **kwargs):
    return dict(in_planes=in_planes, out_planes=out_planes, kernel_size=kernel_size, layer_type=layer_type,
                warehouse_name=name, **kwargs)


# Each case: layer specs sharing a warehouse (so start indices > 0 are exercised), input shape,
# manager settings.
LAYER_CASES = {
    'conv2d_3x3_and_1x1': ([_spec(8, 8, 3, padding=1, bias=False, name='stage0_layer0_conv0'),
                            _spec(8, 16, 1, name='stage0_layer1_conv1', bias=True)],
                           (3, 8, 6, 6), dict(sharing_range='layer_conv')),
    'conv2d_stride_dilation_padding': ([_spec(6, 4, 3, stride=2, padding=2, dilation=2, bias=True),
                                        _spec(6, 4, 3, stride=1, padding=1, bias=False, name='stage0_layer1_conv0')],
                                       (2, 6, 7, 7), dict(sharing_range=['layer'])),
    'conv2d_depthwise': ([_spec(8, 8, 3, padding=1, groups=8, name='s_layer0_dw'),
                          _spec(8, 16, 3, padding=1, groups=8, name='s_layer1_dw')],
                         (3, 8, 5, 5), dict(sharing_range='layer')),
    'conv2d_grouped_half_cells': ([_spec(8, 8, 3, padding=1, groups=2, bias=False)],
                                  (2, 8, 5, 5), dict(cell_num_ratio=0.5, cell_inplane_ratio=0.5,
                                                     cell_outplane_ratio=0.5)),
    'conv2d_whole_kernel_cells': ([_spec(4, 8, 3, padding=1, name='a_layer0'), _spec(4, 4, 3, name='a_layer1')],
                                  (2, 4, 5, 5), dict(sharing_range='layer', spatial_partition=False,
                                                     cell_num_ratio=2)),
    'conv2d_nonlocal_basis': ([_spec(4, 4, 3, padding=1, name='a_layer0'), _spec(4, 8, 1, name='a_layer1'),
                               _spec(4, 4, 3, padding=1, name='a_layer2')],
                              (2, 4, 5, 5), dict(sharing_range='layer', nonlocal_basis_ratio=0.5,
                                                 cell_num_ratio=0.5, cell_inplane_ratio=0.5)),
    'conv1d': ([_spec(4, 6, 3, 'conv1d', padding=1, bias=True), _spec(4, 6, 5, 'conv1d', stride=2,
                                                                      name='stage0_layer1_conv0')],
               (3, 4, 9), dict(sharing_range='layer', cell_num_ratio=4)),
    'conv2d_quarter_cells': ([_spec(8, 8, 1, bias=True)], (2, 8, 4, 4),
                             dict(cell_num_ratio=0.25, cell_inplane_ratio=0.5, cell_outplane_ratio=0.25)),
    'conv3d': ([_spec(4, 4, 3, 'conv3d', padding=1, groups=2, bias=True)], (2, 4, 4, 4, 4),
               dict(cell_num_ratio=0.5, cell_inplane_ratio=1, cell_outplane_ratio=0.5)),
    'batch_of_one': ([_spec(4, 8, 3, padding=1, bias=True)], (1, 4, 5, 5), dict(norm_layer=nn.LayerNorm)),
}


def _build(case, dtype=torch.float64, seed=0):
    specs, shape, settings = LAYER_CASES[case]
    torch.manual_seed(seed)
    net = KWNet(specs, **settings).to(dtype)
    for p in net.parameters():  # non-trivial values for the zero-initialised biases too
        nn.init.normal_(p, std=0.5)
    return net, torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize('temperature', [0.0, 0.5, 1.0])
@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('case', sorted(LAYER_CASES))
def test_layer_matches_naive_reference(case, train, temperature):
    net, x = _build(case)
    net.train(train)
    set_temperature(net, temperature)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = net(x_ours)
    ref = [naive_kw_forward(layer, x_ref) for layer in net.kw_layers]
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    params = [p for p in net.parameters()]
    upstream = [torch.randn_like(o) for o in ours]
    grads_ours = torch.autograd.grad(ours, [x_ours] + params, upstream, allow_unused=True)
    grads_ref = torch.autograd.grad(ref, [x_ref] + params, upstream, allow_unused=True)
    for g_ours, g_ref in zip(grads_ours, grads_ref):
        if g_ref is None:
            assert g_ours is None or not g_ours.any()
        else:
            torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize('case', ['conv2d_3x3_and_1x1', 'conv1d', 'conv3d', 'conv2d_nonlocal_basis'])
def test_gradcheck(case):
    net, x = _build(case)
    net.eval()  # batch-norm statistics fixed: the layer is a smooth function of its inputs
    set_temperature(net, 0.5)
    names, params = zip(*net.named_parameters())

    def f(inp, *flat_params):
        out = torch.func.functional_call(net, dict(zip(names, flat_params)), (inp,))
        return tuple(out)

    inputs = (x.requires_grad_(),) + tuple(p.detach().clone().requires_grad_() for p in params)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


def test_kw_linear_pools_tokens_per_sample():
    torch.manual_seed(0)
    net = KWNet([_spec(6, 5, 1, 'linear', bias=True)], cell_inplane_ratio=0.5).double().eval()
    layer = net.kw_layers[0]
    assert isinstance(layer, KWLinear) and isinstance(layer.conv, KWConv1d)
    tokens = torch.randn(3, 4, 2, 6, dtype=torch.float64)  # [B, ..., in]
    out = layer(tokens)
    assert out.shape == (3, 4, 2, 5)
    ref = naive_kw_forward(layer.conv, tokens.reshape(3, 8, 6).transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, ref.reshape(3, 4, 2, 5))
    # a [B, in] input is one token per sample
    assert layer(tokens[:, 0, 0]).shape == (3, 5)


def _prior_rows(attention):
    return attention.temperature_prior.reshape(attention.num_mixtures, attention.planes_per_mixture)


def _attention(num_cells, num_mixtures, ratio, start):
    attention = Attention(8, 0.0625, num_cells, num_mixtures, cell_num_ratio=ratio)
    end = attention.init_temperature(start, ratio)
    return attention, end


@pytest.mark.parametrize('ratio', [1, 2, 4])
def test_prior_ratio_at_least_one(ratio):
    # mixture j is a one-hot on cell start + j * ratio; the layer claims m * ratio cells
    m, start = 6, 5
    attention, end = _attention(start + m * ratio + 3, m, ratio, start)
    rows = _prior_rows(attention)
    assert end == start + m * ratio
    assert torch.equal(rows.sum(1), torch.ones(m))
    assert rows.argmax(1).tolist() == [start + j * ratio for j in range(m)]


def test_prior_half():
    # r = 2: mixtures 0 and 3 of every block of 4 take the next cell, 1 and 2 the zero cell
    attention, end = _attention(12, 8, 0.5, start=3)
    zero_cell = 12
    assert _prior_rows(attention).argmax(1).tolist() == [3, zero_cell, zero_cell, 4, 5, zero_cell, zero_cell, 6]
    assert end == 7


def test_prior_quarter():
    # r = 4: mixtures 0, 5, 10, 15 of every 16 take a cell, the rest the zero cell
    attention, end = _attention(10, 16, 0.25, start=2)
    rows = _prior_rows(attention)
    assert torch.equal(rows.sum(1), torch.ones(16))
    zero_cell = attention.planes_per_mixture - 1
    assert rows.argmax(1).tolist() == [2 if j == 0 else 3 if j == 5 else 4 if j == 10 else 5 if j == 15
                                       else zero_cell for j in range(16)]
    assert end == 6


def test_prior_is_not_saved_but_follows_dtype_and_device():
    net, _ = _build('conv2d_3x3_and_1x1')
    assert not any('prior' in key for key in net.state_dict())
    assert all(layer.attention.temperature_prior.dtype == torch.float64 for layer in net.kw_layers)


@pytest.mark.parametrize('temperature', [0.0, 1.0])
def test_temperature_one_selects_prior(temperature):
    net, x = _build('conv2d_3x3_and_1x1')
    set_temperature(net, temperature)
    attention = net.kw_layers[0].attention
    weights = attention(x).reshape(x.shape[0], attention.num_mixtures, -1)
    prior = _prior_rows(attention)[:, :-1].expand_as(weights)
    assert torch.equal(weights, prior) == (temperature == 1.0)


def test_temperature_buffer_follows_the_float_and_blending_at_zero_changes_nothing():
    """A CUDA graph reads the temperature from ``temperature_value`` (``engine.capture_training_graph``)."""
    net, x = _build('conv2d_3x3_and_1x1')
    attention = net.kw_layers[0].attention
    set_temperature(net, 0.25)
    assert attention.temperature == 0.25 and attention.temperature_value.item() == 0.25
    set_temperature(net, 0.0)
    unblended = attention(x)
    attention.blend_always = True
    assert torch.equal(attention(x), unblended)
    attention.temperature_value.fill_(0.5)  # what the graph sees when the schedule moves on
    through_buffer = attention(x)
    set_temperature(net, 0.5)
    assert torch.equal(attention(x), through_buffer) and not torch.equal(through_buffer, unblended)


def test_sharing_range_fuses_names():
    manager = WarehouseManager(sharing_range='layer_conv')
    assert manager.sharing_range == ('layer', 'conv')
    assert manager.fuse_warehouse_name('stage2_layer3_conv1') == 'stage2_layer_conv'
    assert WarehouseManager(sharing_range=['layer']).fuse_warehouse_name('stage2_layer3_conv1') == 'stage2_layer_conv1'
    assert parse_sharing_range(None) == ()


def test_warehouse_numbering_and_cells():
    net = KWNet([_spec(16, 32, 3, name='stage1_layer0_conv0'), _spec(32, 32, 3, name='stage2_layer0_conv0'),
                 _spec(32, 64, 1, name='stage1_layer1_conv1')], sharing_range='layer_conv')
    weights = net.warehouse_manager.weights
    assert net.warehouse_manager.warehouse_names == ['stage1_layer_conv', 'stage2_layer_conv']
    # stage1: cells of gcd(32, 64) = 32 out x gcd(16, 32) = 16 in; mixtures 9 * 1 * 1 + 1 * 2 * 2 = 13
    assert weights[0].shape == (13, 32, 16, 1, 1)
    assert weights[1].shape == (9, 32, 32, 1, 1)
    assert [layer.warehouse_id for layer in net.kw_layers] == [0, 1, 0]
    assert [(layer.start_cell_idx, layer.end_cell_idx) for layer in net.kw_layers] == [(0, 9), (0, 9), (9, 13)]


def test_disabled_layer_is_plain():
    manager = WarehouseManager()
    assert type(manager.reserve(4, 8, 3, enabled=False)) is nn.Conv2d
    assert type(manager.reserve(4, 8, enabled=False, layer_type='linear')) is nn.Linear
    assert type(manager.reserve(4, 8, 3, layer_type='conv3d')) is KWConv3d
    assert type(manager.reserve(4, 8, 3)) is KWConv2d
    assert manager.warehouse_names == ['default']


@pytest.mark.parametrize('setting', ['reduction', 'cell_num_ratio', 'cell_inplane_ratio', 'cell_outplane_ratio',
                                     'nonlocal_basis_ratio'])
@pytest.mark.parametrize('value', [0, -1, [1, 0]])
def test_ratios_must_be_positive(setting, value):
    with pytest.raises(ValueError, match=setting):
        WarehouseManager(**{setting: value})


def test_per_warehouse_tuple_length():
    specs = [_spec(8, 8, 3, name='a'), _spec(8, 8, 3, name='b'), _spec(8, 8, 3, name='c')]
    KWNet(specs, cell_num_ratio=[2])  # length 1 broadcasts
    KWNet(specs, cell_num_ratio=(1, 2, 4))  # one per warehouse
    with pytest.raises(ValueError, match=r'cell_num_ratio has 2 values but the model has 3 warehouses'):
        KWNet(specs, cell_num_ratio=(1, 2))


def test_spatial_partition_off_needs_equal_kernels():
    specs = [_spec(8, 8, 3, name='stage0_layer0_conv0'), _spec(8, 8, 1, name='stage0_layer1_conv0')]
    with pytest.raises(ValueError, match=r"warehouse 'stage0_layer_conv0' holds kernels \(3, 3\) and \(1, 1\)"):
        KWNet(specs, sharing_range='layer', spatial_partition=False)
    KWNet(specs, sharing_range='layer', spatial_partition=[True])


def test_cells_must_tile_layers():
    with pytest.raises(ValueError, match='do not tile'):
        KWNet([_spec(8, 12, 1)], cell_outplane_ratio=0.75)  # 9 out channels per cell


def test_cell_count_mismatch_names_warehouse():
    with pytest.raises(ValueError, match=r"warehouse 'stage0_layer0_conv0' has 13 cells but its layers claim 9"):
        KWNet([_spec(8, 8, 3)], cell_num_ratio=1.5)


def test_reserve_after_store_is_refused():
    net = KWNet([_spec(8, 8, 3)])
    with pytest.raises(RuntimeError, match='after store'):
        net.warehouse_manager.reserve(8, 8, 3)


def test_unknown_layer_type():
    with pytest.raises(ValueError, match='layer_type'):
        WarehouseManager().reserve(8, 8, 3, layer_type='conv4d')


def test_cell_overflow_names_warehouse_and_layer():
    # two 1x1 layers of one mixture each: 1/2x gives one cell, and the second layer's prior needs another
    with pytest.raises(ValueError, match=r"warehouse 'a_layer' has 1 cells but its layers claim more "
                                         r"\(layer 'kw_layers.1' overflows it\) with cell_num_ratio 0.5"):
        KWNet([_spec(8, 8, 1, name='a_layer0'), _spec(8, 8, 1, name='a_layer1')], sharing_range='layer',
              cell_num_ratio=0.5)
