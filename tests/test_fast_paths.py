"""The GEMM path of the KW convolution against the reference algorithm, the implementation switch,
and the benchmark scripts (see ``modules/kernel_warehouse/functional.py``)."""
import copy
import os
import pickle
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from functorch.compile import make_boxed_func
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch.utils._python_dispatch import TorchDispatchMode

import models  # noqa: F401  (registers the models with timm)
from modules.kernel_warehouse import set_temperature
from modules.kernel_warehouse import functional as kwf
from modules.kernel_warehouse.functional import (KWConvGeometry, choose_implementation, supports_gemm,
                                                 use_implementation)
from tests.kw_reference import KWNet

ROOT = Path(__file__).parent.parent


def _spec(in_planes, out_planes, kernel_size, layer_type='conv2d', name='s_layer0_conv0', **kwargs):
    return dict(in_planes=in_planes, out_planes=out_planes, kernel_size=kernel_size, layer_type=layer_type,
                warehouse_name=name, **kwargs)


# Each case: KW layers sharing a warehouse (start cells > 0), input shape, manager settings.
CASES = {
    'conv2d_3x3_and_1x1': ([_spec(8, 8, 3, padding=1), _spec(8, 16, 1, bias=True, name='s_layer1_conv0')],
                           (3, 8, 6, 6), dict(sharing_range='layer')),
    'conv2d_stride_dilation': ([_spec(6, 4, 3, stride=2, padding=2, dilation=2, bias=True),
                                _spec(6, 4, 5, stride=(2, 1), padding=(1, 2), name='s_layer1_conv0')],
                               (5, 6, 9, 7), dict(sharing_range='layer')),
    'conv2d_1x1_strided_padded': ([_spec(6, 12, 1, stride=2, padding=1, bias=True)], (3, 6, 7, 7), {}),
    'conv2d_groups': ([_spec(8, 8, 3, padding=1, groups=2),
                       _spec(8, 16, 1, groups=4, bias=True, name='s_layer1_conv0')],
                      (3, 8, 5, 5), dict(sharing_range='layer', cell_outplane_ratio=0.5, cell_inplane_ratio=0.5)),
    'conv2d_groups_whole_input': ([_spec(8, 16, 1, groups=2, bias=True)], (3, 8, 5, 5), dict(cell_outplane_ratio=0.25)),
    'conv2d_depthwise': ([_spec(8, 8, 3, padding=1, groups=8)], (3, 8, 5, 5), {}),
    'conv2d_output_and_input_blocks': ([_spec(8, 8, 3, padding=1), _spec(8, 16, 3, stride=2, name='s_layer1_conv0')],
                                       (3, 8, 6, 6), dict(sharing_range='layer', cell_outplane_ratio=0.5,
                                                          cell_inplane_ratio=0.25)),
    'conv2d_whole_kernel_cells': ([_spec(4, 8, 3, padding=1), _spec(4, 4, 3, name='s_layer1_conv0')],
                                  (3, 4, 5, 5), dict(sharing_range='layer', spatial_partition=False,
                                                     cell_num_ratio=2, cell_inplane_ratio=0.5)),
    'conv2d_whole_kernel_cells_whole_input': ([_spec(4, 8, 3, padding=1, bias=True)], (3, 4, 5, 5),
                                              dict(spatial_partition=False, cell_outplane_ratio=0.5)),
    'conv2d_nonlocal_basis_half_cells': ([_spec(4, 4, 3, padding=1), _spec(4, 8, 1, name='s_layer1_conv0')],
                                         (3, 4, 5, 5), dict(sharing_range='layer', nonlocal_basis_ratio=0.5,
                                                            cell_num_ratio=0.5, cell_inplane_ratio=0.5)),
    'conv2d_quarter_cells': ([_spec(8, 8, 1, bias=True)], (2, 8, 4, 4),
                             dict(cell_num_ratio=0.25, cell_inplane_ratio=0.5, cell_outplane_ratio=0.25)),
    'conv1d': ([_spec(4, 6, 3, 'conv1d', padding=1, bias=True), _spec(4, 6, 5, 'conv1d', stride=2,
                                                                      name='s_layer1_conv0')],
               (3, 4, 9), dict(sharing_range='layer', cell_num_ratio=4)),
    'conv3d': ([_spec(4, 4, 3, 'conv3d', padding=1, groups=2, bias=True),
                _spec(4, 8, 1, 'conv3d', stride=2, name='s_layer1_conv0')],
               (3, 4, 4, 3, 5), dict(sharing_range='layer', cell_num_ratio=0.5, cell_outplane_ratio=0.5)),
    'batch_of_one': ([_spec(4, 8, 3, padding=1, bias=True)], (1, 4, 5, 5), dict(norm_layer=nn.LayerNorm)),
}
FLOAT64_TOLERANCE = dict(rtol=1e-10, atol=1e-12)
EPS32 = torch.finfo(torch.float32).eps


# The equivalence tests also run on a GPU when there is one (CI has none; docs/development.md says how to run them)
DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def _build(case, dtype=torch.float64, seed=0, device='cpu'):
    specs, shape, settings = CASES[case]
    torch.manual_seed(seed)
    net = KWNet(specs, **settings).to(dtype)
    for p in net.parameters():  # non-trivial values for the zero-initialised biases too
        nn.init.normal_(p, std=0.5)
    set_temperature(net, 0.5)
    return net.to(device), torch.randn(shape, dtype=dtype).to(device)


def _outputs_and_grads(net, x, implementation):
    """Outputs and gradients w.r.t. the input and every parameter, under ``implementation``."""
    x = x.clone().requires_grad_()
    with use_implementation(implementation):
        outputs = net(x)
    upstream = [torch.randn(o.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i)).to(o)
                for i, o in enumerate(outputs)]
    grads = torch.autograd.grad(outputs, [x] + list(net.parameters()), upstream, allow_unused=True)
    return outputs, grads


def _assert_matches_reference(net, x, implementation):
    """Outputs and gradients under ``implementation`` equal the reference's. In float64 to 1e-10. In
    float32 the fast path must be as exact as the reference: both are compared with the reference
    computed in float64 on the same values, and the fast path's error may be at most four times the
    reference's plus 16 float32 epsilons of the tensor's magnitude. Two algorithms that sum in other
    orders have errors of the same size on any CPU, while a wrong result is off by far more."""
    result, expected = (_outputs_and_grads(net, x, impl) for impl in (implementation, 'reference'))
    if x.dtype == torch.float64:
        _assert_same(result, expected, **FLOAT64_TOLERANCE)
        return
    exact = _outputs_and_grads(copy.deepcopy(net).double(), x.double(), 'reference')
    _assert_same(result, expected, rtol=0.0, atol=float('inf'))  # dtypes, shapes and missing gradients
    for ours, reference, truth in zip([*result[0], *result[1]], [*expected[0], *expected[1]],
                                      [*exact[0], *exact[1]]):
        if truth is not None and ours is not None:
            allowed = 4 * (reference.double() - truth).abs().max() + 16 * EPS32 * truth.abs().max()
            assert (ours.double() - truth).abs().max() <= allowed


def _assert_same(result, expected, **tolerance):
    (outputs, grads), (expected_outputs, expected_grads) = result, expected
    for out, ref in zip(outputs, expected_outputs):
        assert out.dtype == ref.dtype and out.shape == ref.shape
        torch.testing.assert_close(out, ref, **tolerance)
    for grad, ref in zip(grads, expected_grads):
        if ref is None:
            assert grad is None or not grad.any()
        else:
            torch.testing.assert_close(grad, ref, **tolerance)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize('case', sorted(CASES))
@pytest.mark.parametrize('implementation', kwf.FAST_PATHS)
def test_fast_path_matches_reference(implementation, case, dtype, device, monkeypatch):
    # cuDNN's default TF32 convolutions would make the reference the less exact of the two
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    net, x = _build(case, dtype, device=device)
    with use_implementation(implementation):
        chosen = [choose_implementation(layer.geometry, x) for layer in net.kw_layers]
    # a fast path runs wherever it applies; depthwise cells span groups, so those stay on the reference
    assert chosen == [implementation if supports_gemm(layer.geometry) else 'reference' for layer in net.kw_layers]
    assert (implementation in chosen) == (case != 'conv2d_depthwise')
    _assert_matches_reference(net, x, implementation)


def _channels_last(x):
    """``x`` stored with its channels last, for any number of spatial dimensions."""
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


@pytest.mark.parametrize('channels_last', [False, True], ids=['channels_first', 'channels_last'])
@pytest.mark.parametrize('case', ['conv2d_3x3_and_1x1', 'conv2d_output_and_input_blocks', 'conv3d'])
def test_gemm_in_chunks_matches_reference(case, channels_last, monkeypatch):
    """One sample per chunk: every chunked code path runs."""
    monkeypatch.setitem(kwf.TUNING, 'cpu', kwf.TUNING['cpu']._replace(kernel_chunk_elements=1))
    net, x = _build(case)
    x = _channels_last(x) if channels_last else x
    assert x.shape[0] > 1 and all(kwf._samples_per_chunk(layer.geometry, x.shape[0], "cpu") == 1
               for layer in net.kw_layers)
    _assert_same(_outputs_and_grads(net, x, 'gemm'), _outputs_and_grads(net, x, 'reference'),
                 **FLOAT64_TOLERANCE)


@pytest.mark.parametrize('chunked', [False, True], ids=['whole_batch', 'one_sample_per_chunk'])
@pytest.mark.parametrize('channels_last', [False, True], ids=['channels_first', 'channels_last'])
@pytest.mark.parametrize('case', sorted(CASES))
def test_gemm_grouped_products_match_reference(case, channels_last, chunked, monkeypatch):
    """The GEMM path's products for torch.compile (one per convolution group, nothing written into
    views), run eagerly: the reference's outputs and gradients, and the input's layout, in every case."""
    monkeypatch.setattr(kwf, '_traced', lambda: True)
    if chunked:
        monkeypatch.setitem(kwf.TUNING, 'cpu', kwf.TUNING['cpu']._replace(kernel_chunk_elements=1))
    net, x = _build(case)
    x = _channels_last(x) if channels_last else x
    result = _outputs_and_grads(net, x, 'gemm')
    _assert_same(result, _outputs_and_grads(net, x, 'reference'), **FLOAT64_TOLERANCE)
    for layer, out in zip(net.kw_layers, result[0]):
        if supports_gemm(layer.geometry):
            assert kwf.stored_channels_last(out) == channels_last


def test_gemm_with_input_that_needs_no_grad():
    net, x = _build('conv2d_3x3_and_1x1')
    params = list(net.parameters())
    grads = {}
    for implementation in ['gemm', 'reference']:
        with use_implementation(implementation):
            outputs = net(x)  # x does not require grad: its gradient is skipped
        grads[implementation] = torch.autograd.grad(sum(o.square().sum() for o in outputs), params)
    for ours, ref in zip(grads['gemm'], grads['reference']):
        torch.testing.assert_close(ours, ref, **FLOAT64_TOLERANCE)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize('case', sorted(set(CASES) - {'conv2d_depthwise'}))
def test_gemm_keeps_channels_last_and_matches_reference(case, dtype, device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    net, x = _build(case, dtype, device=device)
    x = _channels_last(x)
    assert all(kwf.uses_channels_last(x, layer.geometry) for layer in net.kw_layers)
    outputs, grads = _outputs_and_grads(net, x, 'gemm')
    for out in outputs:  # the output is channels-last too, and so is the input's gradient
        assert out.movedim(1, -1).is_contiguous()
    assert grads[0].movedim(1, -1).is_contiguous()
    _assert_matches_reference(net, x, 'gemm')


@pytest.mark.parametrize('channels_last', [False, True], ids=['channels_first', 'channels_last'])
@pytest.mark.parametrize('case', ['conv2d_3x3_and_1x1', 'conv2d_groups', 'conv1d', 'conv3d'])
@pytest.mark.parametrize('implementation', kwf.FAST_PATHS)
def test_fast_path_output_has_the_input_layout(implementation, case, channels_last):
    """Contiguous for a channels-first input, channels-last for a channels-last one: never a third
    layout (``input_mix`` had stored its output channel-major, then batch, then position)."""
    net, x = _build(case)
    x = _channels_last(x) if channels_last else x.contiguous()
    with use_implementation(implementation):
        outputs = net(x)
    for out in outputs:
        assert (out.movedim(1, -1) if channels_last else out).is_contiguous()


def test_gemm_kw_linear_matches_reference():
    torch.manual_seed(0)
    net = KWNet([_spec(6, 5, 1, 'linear', bias=True)], cell_inplane_ratio=0.5).double()
    tokens = torch.randn(3, 4, 2, 6, dtype=torch.float64)  # [B, ..., in]
    _assert_same(_outputs_and_grads(net, tokens, 'gemm'), _outputs_and_grads(net, tokens, 'reference'),
                 **FLOAT64_TOLERANCE)


@pytest.mark.parametrize('case', ['conv2d_3x3_and_1x1', 'conv2d_stride_dilation', 'conv1d'])
def test_autocast_bfloat16_stays_close(case):
    """Under CPU autocast both paths compute in bfloat16: the GEMM path stays as close to float32
    as the reference (whose attention, shared by both, dominates the gradient error)."""
    net, x = _build(case, torch.float32)
    full = _outputs_and_grads(net, x, 'reference')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ours, reference = (_outputs_and_grads(net, x, impl) for impl in ['gemm', 'reference'])
    for out, ref, exact in zip(ours[0], reference[0], full[0]):
        assert out.dtype == ref.dtype == torch.bfloat16
        assert (out.float() - exact).norm() <= 0.02 * exact.norm()
    for grad, ref, exact in zip(ours[1], reference[1], full[1]):
        if exact is not None and exact.any():
            assert grad.dtype == exact.dtype and torch.isfinite(grad).all()
            assert (grad - exact).norm() <= 0.1 * exact.norm()
            assert (grad - ref).norm() <= 0.02 * exact.norm()


def _saved_numels(net, x, implementation):
    numels = []
    with use_implementation(implementation), torch.autograd.graph.saved_tensors_hooks(
            lambda t: numels.append(t.numel()) or t, lambda t: t):
        net(x.requires_grad_())
    return numels


def test_gemm_keeps_no_per_sample_kernels():
    torch.manual_seed(0)
    net = KWNet([_spec(16, 32, 3, padding=1)]).double()
    x = torch.randn(8, 16, 4, 4, dtype=torch.float64)
    kernels = 8 * 32 * 16 * 9  # [B, C_out, C_in, 3, 3]
    assert max(_saved_numels(net, x, 'reference')) >= kernels  # the reference keeps them ...
    assert max(_saved_numels(net, x, 'gemm')) < kernels  # ... the GEMM path reassembles them


def _without_sharing(monkeypatch):
    """Make the layers call the GEMM path without ``share``: each makes its own copy of the cells."""
    gemm_conv = kwf.gemm_conv
    monkeypatch.setattr(kwf, 'gemm_conv', lambda *args, share=None: gemm_conv(*args))


class _CountCopies(TorchDispatchMode):
    """Counts the operators that write a new tensor of ``numel`` elements (copies and casts)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.copies = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.clone, torch.ops.aten.copy_) \
                and out.numel() == self.numel:
            self.copies += 1
        return out


@pytest.mark.parametrize('shared', [True, False], ids=['shared', 'unshared'])
@pytest.mark.parametrize('layouts', ['channels_first', 'channels_last', 'mixed'])
def test_gemm_layers_of_a_pass_share_one_copy_of_their_warehouse(shared, layouts, monkeypatch):
    """Three layers on one warehouse, under bfloat16 autocast: in a forward pass they share one cast and
    reordered copy of it, kept for backward, whatever their inputs' layouts (1x1 cells read the same
    either way). Without sharing each layer makes its own and keeps none (only the float32 warehouse),
    as under torch.compile."""
    if not shared:
        _without_sharing(monkeypatch)
    torch.manual_seed(0)
    net = KWNet([_spec(8, 8, 3, padding=1, name=f's_layer{i}_conv0') for i in range(3)], sharing_range='layer')
    warehouse = net.warehouse_manager.weights[0]
    x = torch.randn(4, 8, 5, 5).requires_grad_()
    inputs = {'channels_first': [x] * 3, 'channels_last': [_channels_last(x)] * 3,
              'mixed': [_channels_last(x), x, _channels_last(x)]}[layouts]
    saved, counter = [], _CountCopies(warehouse.numel())
    with use_implementation('gemm'), torch.autocast('cpu', dtype=torch.bfloat16), counter, \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outputs = [layer(layer_input) for layer, layer_input in zip(net.kw_layers, inputs)]
    copies = {t.data_ptr() for t in saved if t.numel() == warehouse.numel() and t.dtype == torch.bfloat16}
    assert len(copies) == (1 if shared else 0)
    assert counter.copies == (1 if shared else 3)
    if not shared:
        assert sum(t.data_ptr() == warehouse.data_ptr() and t.dtype == torch.float32 for t in saved) == 3
    # the cells' gradient: the same either way (it meets in the copy's layout when shared)
    grad = torch.autograd.grad(sum(o.float().square().sum() for o in outputs), warehouse)[0]
    with use_implementation('reference'), torch.autocast('cpu', dtype=torch.bfloat16):
        expected = torch.autograd.grad(sum(o.float().square().sum() for o in net(x.detach())), warehouse)[0]
    torch.testing.assert_close(grad, expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


@pytest.mark.parametrize('channels_last', [False, True], ids=['channels_first', 'channels_last'])
@pytest.mark.parametrize('case', sorted(CASES))
def test_gemm_without_sharing_matches_reference(case, channels_last, monkeypatch):
    """Each layer copying the cells itself, in forward and again in backward (as under torch.compile, or
    ``functional.gemm_conv`` called on its own)."""
    _without_sharing(monkeypatch)
    net, x = _build(case)
    x = _channels_last(x) if channels_last else x
    _assert_same(_outputs_and_grads(net, x, 'gemm'), _outputs_and_grads(net, x, 'reference'),
                 **FLOAT64_TOLERANCE)


@pytest.mark.parametrize('change', ['in_place', 'through_data'])
def test_gemm_reads_cells_changed_between_passes(change):
    """A pass after the cells changed in place (an optimizer step; or through ``.data``, which the
    version counter does not see) builds its copy anew."""
    net, x = _build('conv2d_3x3_and_1x1')
    with use_implementation('gemm'):
        net(x)
        for cells in net.warehouse_manager.weights:
            if change == 'in_place':
                with torch.no_grad():
                    cells.mul_(1.5)
            else:
                cells.data.mul_(1.5)
        outputs = net(x)
    with use_implementation('reference'):
        expected = net(x)
    for out, ref in zip(outputs, expected):
        torch.testing.assert_close(out, ref, **FLOAT64_TOLERANCE)


def test_sharing_registers_no_module_hooks():
    """The layers share without hooks on the model: ``torch.cuda.make_graphed_callables`` (``main.py
    --cuda_graph true``) refuses modules with hooks."""
    model = models.create_model('kw_resnet18', num_classes=10)
    with use_implementation('gemm'):
        model(torch.randn(2, 3, 32, 32))
    assert model.warehouse_manager._pass_memo.values  # it did share
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                   for m in model.modules())


@pytest.mark.parametrize('how', ['deepcopy', 'pickle'])
def test_model_with_shared_copies_copies(how):
    """A model copied after a forward pass (e.g. for EMA, or pickled whole): the copy gets none of the
    pass's values (tensors inside an autograd graph cannot be deep-copied) and computes the same."""
    net, x = _build('conv2d_3x3_and_1x1')
    with use_implementation('gemm'):
        outputs = net(x.requires_grad_())
        copied = copy.deepcopy(net) if how == 'deepcopy' else pickle.loads(pickle.dumps(net))
        assert not copied.warehouse_manager._pass_memo.values and net.warehouse_manager._pass_memo.values
        for out, ref in zip(copied(x), outputs):
            torch.testing.assert_close(out, ref, rtol=0, atol=0)


class _CountProducts(TorchDispatchMode):
    """Counts the matrix products dispatched inside the block, and the batched ones that write into a
    column-major output."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()
        self.column_major_outputs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__.rstrip('_')  # baddbmm_ (in place) counts as baddbmm
        if name in ('mm', 'bmm', 'baddbmm'):
            self.counts[name] += 1
            written = kwargs.get('out', args[0] if func.overloadpacket.__name__.endswith('_') else None)
            self.column_major_outputs += written is not None and written.stride(-1) != 1
        return func(*args, **kwargs)


@pytest.mark.parametrize('channels_last', [False, True], ids=['channels_first', 'channels_last'])
@pytest.mark.parametrize('case, layer_index, one_product_per', [
    ('conv2d_3x3_and_1x1', 0, 'block'),  # 1x1 cells per kernel tap: block-major, one output block
    ('conv2d_3x3_and_1x1', 1, 'group'),  # sample-major: both output blocks in one product
    ('conv2d_whole_kernel_cells_whole_input', 0, 'group'),  # sample-major, whole-kernel cells
    ('conv2d_groups', 1, 'block'),  # block-major, 4 convolution groups of one output block each
    ('conv2d_groups_whole_input', 0, 'group'),  # sample-major, 2 convolution groups of 2 output blocks
    ('conv2d_output_and_input_blocks', 1, 'block'),  # block-major, several output blocks
])
def test_gemm_products_per_layer(case, layer_index, one_product_per, channels_last):
    """Each chunk's kernels come from one assembly product and feed one batched product per output block
    (block-major) or per convolution group (sample-major); backward assembles them again and derives the
    gradients of mixture weights and cells by one product each."""
    net, x = _build(case)
    layer = net.kw_layers[layer_index]
    g = layer.geometry
    assert kwf._is_sample_major(g) == (one_product_per == 'group')
    bmm_per_pass = g.groups if one_product_per == 'group' else g.groups_out
    x = torch.randn(3, layer.in_planes, 5, 5, dtype=torch.float64)
    x = (_channels_last(x) if channels_last else x).requires_grad_()
    # the attention: fc1 is an mm (no bias before BatchNorm), fc2 an addmm; backward, both give 2 mm
    attention_forward, attention_backward = 1, 4
    with use_implementation('gemm'):
        with _CountProducts() as forward:
            out = layer(x)
        with _CountProducts() as backward:
            out.sum().backward()
    assert forward.counts == Counter(mm=attention_forward + 1, bmm=bmm_per_pass)
    # backward: per product, the kernels' gradient; per group, the input's gradient from its first
    # output block, to which the group's other blocks add theirs
    assert backward.counts == Counter(mm=attention_backward + 1 + 2, bmm=bmm_per_pass + g.groups,
                                      baddbmm=bmm_per_pass - g.groups)
    # every product writes rows (writing columns, KW ResNet50 trained at 0.1 img/s on the CPU in bfloat16)
    assert forward.column_major_outputs == backward.column_major_outputs == 0


def test_gemm_supports_first_order_gradients_only():
    net, x = _build('conv2d_3x3_and_1x1')
    with use_implementation('gemm'):
        out = net(x.requires_grad_())[0]
    grad, = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match='once_differentiable'):
        grad.sum().backward()


@pytest.fixture
def fresh_compiler():
    """Every compile test starts with dynamo's caches empty: they compile the same forward code in
    many configurations, and torch 2.11 counts them against one recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _NormalisedKWNet(nn.Module):
    """Every KW layer of a :class:`KWNet` followed by batch norm and ReLU, as in a ConvNet."""

    def __init__(self, net: KWNet):
        super().__init__()
        self.net = net
        self.norms = nn.ModuleList(nn.BatchNorm2d(layer.out_planes).double() for layer in net.kw_layers)

    def forward(self, x):
        return [torch.relu(norm(out)) for norm, out in zip(self.norms, self.net(x))]


@pytest.mark.usefixtures('fresh_compiler')
@pytest.mark.parametrize('channels_last', [False, True], ids=['channels_first', 'channels_last'])
@pytest.mark.parametrize('case', ['conv2d_3x3_and_1x1', 'conv2d_output_and_input_blocks'])
@pytest.mark.parametrize('implementation', kwf.FAST_PATHS)
def test_compiles_without_graph_breaks(implementation, case, channels_last):
    """Compiled training (batch norm after the KW layers: traced and run strides must agree) gives
    the eager outputs and gradients."""
    net, x = _build(case)
    net = _NormalisedKWNet(net).train()
    x = _channels_last(x) if channels_last else x
    compiled = torch.compile(net, backend='aot_eager', fullgraph=True)
    with use_implementation(implementation):
        _assert_same(_outputs_and_grads(compiled, x, implementation), _outputs_and_grads(net, x, implementation),
                     **FLOAT64_TOLERANCE)


@pytest.mark.usefixtures('fresh_compiler')
@pytest.mark.parametrize('implementation', kwf.FAST_PATHS)
def test_compiles_under_autocast(implementation):
    """Under bfloat16 autocast the fast paths ask for the autocast dtype while being compiled
    (``compute_dtype``): the compiled net computes in bfloat16 like the eager one."""
    net, x = _build('conv2d_3x3_and_1x1', torch.float32)
    net = _NormalisedKWNet(net).float().train()
    compiled = torch.compile(net, backend='aot_eager', fullgraph=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        eager = _outputs_and_grads(net, x, implementation)
        result = _outputs_and_grads(compiled, x, implementation)
    assert all(out.dtype == torch.bfloat16 for out in result[0])
    _assert_same(result, eager, rtol=2e-2, atol=2e-2)


@pytest.mark.usefixtures('fresh_compiler')
@pytest.mark.parametrize('channels_last', [False, True], ids=['channels_first', 'channels_last'])
def test_compiled_gemm_writes_into_no_views(channels_last):
    """Traced, the GEMM path writes nothing into views of a buffer: inductor lowers a chain of such
    writes in time exponential in its length (docs/performance.md). A 1x1 layer of 8 output and 4 input
    blocks: no scatter in the graphs, and the eager results."""
    n, channels = 4, 16
    g = KWConvGeometry(channels, channels, (1, 1), (1, 1), (0, 0), (1, 1), 1, (n, 2, 4, 1, 1), 8, 4, 1)
    x = torch.randn(2, channels, 3, 3)
    x = (_channels_last(x) if channels_last else x).requires_grad_()
    a = torch.randn(2 * g.num_mixtures, n, requires_grad=True)
    cells = torch.randn(n, 2, 4, 1, 1, requires_grad=True)
    operators = Counter()

    def record(graph_module, example_inputs):
        operators.update(str(node.target) for node in graph_module.graph.nodes if node.op == 'call_function')
        return make_boxed_func(graph_module.forward)

    backend = aot_autograd(fw_compiler=record, bw_compiler=record)
    compiled = torch.compile(lambda *args: kwf.gemm_conv(*args, g), backend=backend, fullgraph=True)
    result = compiled(x, a, cells)
    gradients = torch.autograd.grad(result.square().sum(), (x, a, cells))
    assert operators['aten.bmm.default'] + operators['aten.mm.default'] > 0
    assert not [name for name in operators if 'scatter' in name]
    eager = kwf.gemm_conv(x, a, cells, g)
    _assert_same(([result], gradients), ([eager], torch.autograd.grad(eager.square().sum(), (x, a, cells))),
                 rtol=1e-4, atol=1e-4)


# 36 cells: a warehouse of realistic size (those of KW ResNet18 hold 27 to 56)
def _geometry(in_planes, out_planes, kernel_size, groups=1, cell_out=None, cell_in=None, stride=1, num_cells=36):
    cell_out, cell_in = cell_out or out_planes, cell_in or in_planes // groups
    gs = kernel_size ** 2
    return KWConvGeometry(in_planes, out_planes, (kernel_size,) * 2, (stride,) * 2, (kernel_size // 2,) * 2, (1, 1),
                          groups, (num_cells, cell_out, cell_in, 1, 1), out_planes // cell_out,
                          in_planes // groups // cell_in, gs)


def _input(batch, channels, size, device='cpu', dtype=torch.float32):
    """A tensor of that shape without the memory; device 'meta' stands for a non-CPU device."""
    return torch.zeros((), device=device, dtype=dtype).expand(batch, channels, size, size)


@pytest.mark.parametrize('geometry, x, expected', [
    (_geometry(512, 512, 3), _input(8, 512, 7), 'gemm'),          # kernel-dominated: late ResNet stage
    (_geometry(64, 64, 3), _input(8, 64, 56), 'reference'),       # activation-dominated: early stage
    (_geometry(512, 512, 3), _input(1, 512, 7), 'reference'),     # one sample
    (_geometry(64, 256, 1), _input(8, 64, 56), 'gemm'),           # 1x1 layers always
    (_geometry(64, 64, 3, groups=64, cell_out=64), _input(8, 64, 7), 'reference'),  # cells span groups
    (_geometry(512, 512, 3), _input(8, 512, 1), 'input_mix'),     # one output position: mix the input
    (_geometry(512, 512, 3), _input(8, 512, 2), 'input_mix'),
    (_geometry(128, 128, 3), _input(8, 128, 7), 'reference'),     # the CPU's rule on other devices too ...
    (_geometry(128, 128, 3), _input(32, 128, 28, 'meta'), 'reference'),
    (_geometry(128, 128, 3), _input(32, 128, 7, 'meta'), 'gemm'),   # ... with a lower ratio
    (_geometry(64, 64, 3), _input(32, 64, 56, 'meta', torch.bfloat16), 'gemm'),  # 16 bits off the CPU: always
    (_geometry(64, 256, 1), _input(8, 64, 56, 'meta', torch.bfloat16), 'reference'),  # but not below 32 samples
])
def test_auto_choice(geometry, x, expected):
    with use_implementation('auto'):
        assert choose_implementation(geometry, x) == expected
    with use_implementation('reference'):
        assert choose_implementation(geometry, x) == 'reference'


def test_use_implementation_restores_previous_choice():
    before = kwf.get_implementation()
    with pytest.raises(KeyError):
        with use_implementation('reference'):
            assert kwf.get_implementation() == 'reference'
            raise KeyError
    assert kwf.get_implementation() == before
    with pytest.raises(ValueError, match="unknown KW implementation 'fast'"):
        kwf.set_implementation('fast')


def _python(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})


def test_environment_variable_selects_implementation():
    code = 'from modules.kernel_warehouse import functional; print(functional.get_implementation())'
    result = _python('-c', code, env={'KW_IMPL': 'reference'})
    assert result.returncode == 0 and result.stdout.strip() == 'reference', result.stderr
    result = _python('-c', code, env={'KW_IMPL': 'fastest'})
    assert result.returncode != 0
    assert "KW_IMPL='fastest' is not a KW implementation: set it to one of auto, reference, gemm, input_mix" in result.stderr


def test_benchmark_prints_table():
    result = _python('benchmarks/benchmark.py', '--device', 'cpu', '--models', 'resnet18,kw_resnet18',
                     '--batch-sizes', '2', '--img-size', '32', '--num-classes', '4', '--warmup', '0', '--iters', '1',
                     '--repeats', '1', '--threads', '1')
    assert result.returncode == 0, result.stderr
    rows = [line.split('|')[1:-1] for line in result.stdout.splitlines() if line.startswith('| ')][1:]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [('resnet18', '-'), ('kw_resnet18', 'reference'),
                                                            ('kw_resnet18', 'auto')]
    for row in rows:
        assert float(row[4]) > 0 and float(row[7]) > 0  # train and infer img/s
    assert rows[1][5].strip() == rows[1][8].strip() == '1.00x'


def test_benchmark_compiles_the_models():
    result = _python('benchmarks/benchmark.py', '--device', 'cpu', '--models', 'kw_resnet18', '--batch-sizes', '2',
                     '--img-size', '32', '--num-classes', '4', '--modes', 'infer', '--warmup', '1', '--iters', '1',
                     '--repeats', '1', '--threads', '1', '--no-memory', '--compile', '--compile-backend', 'aot_eager')
    assert result.returncode == 0, result.stderr
    assert 'torch.compile (aot_eager, mode default)' in result.stdout
    rows = [line.split('|')[1:-1] for line in result.stdout.splitlines() if line.startswith('| ')][1:]
    assert [r[1].strip() for r in rows] == ['reference', 'reference compiled', 'auto', 'auto compiled']
    assert all(float(r[4]) > 0 for r in rows)
    assert rows[0][5].strip() == '1.00x' and rows[1][5].strip().endswith('x')  # compiled vs the eager reference


def test_benchmarks_refuse_to_run_without_keeping_freed_memory_when_asked():
    code = ("import sys, utils; utils.keep_freed_memory = lambda: False; sys.argv[1:] = ['--device', 'cpu', "
            "'--keep-freed-memory']; sys.path.insert(0, 'benchmarks'); import benchmark; benchmark.main()")
    result = _python('-c', code)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --keep-freed-memory needs Linux with glibc's malloc; run without it.")


def test_benchmark_rejects_unknown_model():
    result = _python('benchmarks/benchmark.py', '--models', 'kw_resnet19')
    assert result.returncode != 0
    assert 'unknown model kw_resnet19' in result.stderr and 'kw_resnet18' in result.stderr


def test_step_profile_prints_table():
    result = _python('benchmarks/step_profile.py', '--device', 'cpu', '--models', 'resnet18,kw_resnet18',
                     '--batch-size', '2', '--img-size', '32', '--warmup', '0', '--iters', '1', '--repeats', '1',
                     '--threads', '1')
    assert result.returncode == 0, result.stderr
    rows = [line.split('|')[1:-1] for line in result.stdout.splitlines() if line.startswith('| ')][1:]
    assert [r[0].strip() for r in rows] == ['resnet18', 'kw_resnet18']
    for row in rows:
        step, queued, kernels, images, graphed_model, graph = (cell.strip() for cell in row[1:])
        assert float(queued) <= float(step) and float(images) > 0
        assert kernels == graphed_model == graph == 'n/a'  # GPU-only measurements


def test_layer_benchmark_lists_kw_layers():
    result = _python('benchmarks/layers.py', '--device', 'cpu', '--model', 'kw_resnet18', '--batch-size', '4',
                     '--img-size', '32', '--repeats', '1', '--iters', '1', '--threads', '1', '--keep-freed-memory')
    assert result.returncode == 0, result.stderr
    assert '1 torch threads, freed memory kept;' in result.stdout.splitlines()[0]
    rows = [line for line in result.stdout.splitlines() if re.match(r'\| layer\d', line)]
    assert len(rows) == 19  # every KW conv of the ResNet-18
    assert all(row.split('|')[-2].strip() in ('reference', 'gemm', 'input_mix') for row in rows)
    assert any(row.split('|')[-2].strip() == 'input_mix' for row in rows)  # the last stage at 32 px


def test_operator_count_table():
    result = _python('benchmarks/count_ops.py', '--models', 'resnet18,kw_resnet18', '--batch-size', '2',
                     '--img-size', '32', '--dtype', 'fp32', '--top', '40')
    assert result.returncode == 0, result.stderr
    rows = [[cell.strip() for cell in line.split('|')[1:-1]] for line in result.stdout.splitlines()
            if line.startswith('| ')][1:]
    (plain, plain_ops, plain_computing, plain_kw, plain_per), (kw, ops, computing, kw_layers, per) = rows
    assert (plain, plain_kw, plain_per, kw, kw_layers) == ('resnet18', '0', '-', 'kw_resnet18', '19')
    assert int(plain_computing) < int(plain_ops) and int(computing) < int(ops)
    assert int(computing) > int(plain_computing) and float(per) == pytest.approx(int(computing) / 19, abs=0.05)
    frequent = result.stdout.split('kw_resnet18: ')[1]
    assert 'view (view)' in frequent and 'bmm ' in frequent and 'bmm (view)' not in frequent
