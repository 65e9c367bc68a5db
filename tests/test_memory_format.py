"""``model.to(memory_format=torch.channels_last)`` on KW models: the plain layers go channels-last, the
warehouses keep their shapes and stay contiguous (``WarehouseManager._apply``), and the model computes
and trains as before under every implementation, in float64 so that the tolerances are tight and
machine-independent."""
import copy
from functools import lru_cache

import pytest
import timm
import torch
from torch import nn

import models  # noqa: F401  (registers the models with timm)
from modules.kernel_warehouse import functional as kwf
from modules.kernel_warehouse.functional import use_implementation

MODELS = ['kw_resnet18', 'kw_mobilenetv2_050', 'kw1d2x_mobilenetv2_050', 'kw_convnext_tiny']
IMPLEMENTATIONS = ('reference', *kwf.FAST_PATHS)
FLOAT64_TOLERANCE = dict(rtol=1e-10, atol=1e-12)
WAREHOUSE_PREFIX = 'warehouse_manager.weights.'


@lru_cache(maxsize=None)
def _built(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5).double().train()


@pytest.fixture(scope='module', autouse=True)
def _one_thread_and_free_models():
    """One thread: these thousands of small operations (the reference path's grouped convolutions run
    one per group) took over 10 minutes with two threads on two cores busy with other work, 50 s with
    one. The built models are freed afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    _built.cache_clear()


def _build(name: str) -> nn.Module:
    """A fresh copy of the model built with seed 0 (each built once for the file: KW ConvNeXt-T takes
    seconds)."""
    return copy.deepcopy(_built(name))


def _input() -> torch.Tensor:
    """Two 32 px images, stored channels-last as a channels-last model reads them."""
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return x.contiguous(memory_format=torch.channels_last)


def _channels_last(model: nn.Module) -> nn.Module:
    assert model.to(memory_format=torch.channels_last) is model
    return model


def _plain_layers_channels_last(model: nn.Module) -> nn.Module:
    """What ``.to(memory_format=torch.channels_last)`` does to the model's plain layers, by hand: their
    4-D tensors stored channels-last, the warehouses as built."""
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.dim() == 4 and not name.startswith(WAREHOUSE_PREFIX):
                t.data = t.data.to(memory_format=torch.channels_last)  # as nn.Module.to does
    return model


def _forward_backward(model: nn.Module, x: torch.Tensor, implementation: str):
    """Output, and the gradients of the input and of every parameter (by name), in train mode."""
    x = x.clone().requires_grad_()
    torch.manual_seed(2)  # the same dropout / drop-path masks for both models
    with use_implementation(implementation):
        out = model(x)
    out.backward(torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3)))
    return out.detach(), x.grad, {name: p.grad for name, p in model.named_parameters()}


def _assert_close(result, expected, name: str) -> None:
    assert result.shape == expected.shape and result.dtype == expected.dtype, name
    if not torch.equal(result, expected):  # equal in practice; assert_close takes seconds on ConvNeXt-T
        torch.testing.assert_close(result, expected, **FLOAT64_TOLERANCE, msg=lambda m: f'{name}: {m}')


@pytest.mark.parametrize('name', MODELS)
def test_channels_last_converts_plain_layers_and_keeps_the_state_dict(name):
    model = _build(name)
    expected = {key: value.clone() for key, value in model.state_dict().items()}
    expected_layout = _plain_layers_channels_last(_build(name)).state_dict()
    parameters = dict(model.named_parameters())
    # 5-D for 2-D layers (torch refuses them channels-last), 4-D for a KW classifier (KW1d2x's)
    assert any(value.dim() == 5 for key, value in expected.items() if key.startswith(WAREHOUSE_PREFIX))

    _channels_last(model)

    state = model.state_dict()
    assert list(state) == list(expected)
    for key, value in state.items():
        assert value.shape == expected[key].shape and value.dtype == expected[key].dtype, key
        assert torch.equal(value, expected[key]), key
        assert value.stride() == expected_layout[key].stride(), key
        if key.startswith(WAREHOUSE_PREFIX):
            assert value.is_contiguous(), key
        elif value.dim() == 4:
            assert value.is_contiguous(memory_format=torch.channels_last), key
            if value.shape[1] > 1 and value.shape[2] * value.shape[3] > 1:  # where the two layouts differ
                assert not value.is_contiguous(), key
    # converted in place: an optimizer made before the conversion still holds the model's parameters
    assert all(p is parameters[key] for key, p in model.named_parameters())


@pytest.mark.parametrize('implementation', IMPLEMENTATIONS)
@pytest.mark.parametrize('name', MODELS)
def test_channels_last_model_computes_and_trains_alike(name, implementation):
    """Outputs and gradients in train mode, and the weights and buffers after an SGD step, equal those
    of the same model with its plain layers alone made channels-last (by hand), on the same input.

    Why not the unconverted model itself: there, the plain layers' layout changes the activations'
    layouts (behind KW1d2x's plain 1x1 convolutions), so torch sums in other orders, and these freshly
    initialised models amplify such rounding enormously in train mode (batch norm over two samples,
    largest gradients from 1e5 for ResNet18 to 1e11 for KW1d2x): KW1d2x then differed by 1e-6 to 1e-2
    (relative) at every batch (2 to 32) and input size (32 to 128 px) tried. Where the layouts match (the
    other three models, on this channels-last input), the unconverted model gives the same numbers."""
    x = _input()
    results = []
    for model in [_plain_layers_channels_last(_build(name)), _channels_last(_build(name))]:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        out, grad_x, grads = _forward_backward(model, x, implementation)
        optimizer.step()
        results.append((out, grad_x, grads, model.state_dict()))
    (expected_out, expected_grad_x, expected_grads, expected_state), (out, grad_x, grads, state) = results
    _assert_close(out, expected_out, 'output')
    _assert_close(grad_x, expected_grad_x, 'input gradient')
    assert grads.keys() == expected_grads.keys()
    for key, grad in grads.items():
        assert (grad is None) == (expected_grads[key] is None), key
        if grad is not None:
            _assert_close(grad, expected_grads[key], key)
    assert state.keys() == expected_state.keys()
    for key, value in state.items():
        _assert_close(value, expected_state[key], key)


def _eval_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), use_implementation('gemm'):
        return model.eval()(x)


def test_channels_last_model_copies_saves_loads_and_converts_dtypes(tmp_path):
    model, x = _build('kw_resnet18'), _input()
    _forward_backward(model, x, 'gemm')
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # weights of its own; the gradients stay
    warehouses = list(model.warehouse_manager.weights)
    _channels_last(model)
    assert all(w.grad is not None and w.grad.shape == w.shape and w.grad.is_contiguous() for w in warehouses)
    expected = _eval_output(model, x)
    assert expected.std(0).min() > 0  # the output depends on the input

    assert torch.equal(_eval_output(copy.deepcopy(model), x), expected)
    torch.save(model, tmp_path / 'model.pth')
    assert torch.equal(_eval_output(torch.load(tmp_path / 'model.pth', weights_only=False), x), expected)
    torch.save(model.state_dict(), tmp_path / 'state.pth')
    default_layout = _build('kw_resnet18')
    default_layout.load_state_dict(torch.load(tmp_path / 'state.pth'), strict=True)
    _assert_close(_eval_output(default_layout, x), expected, 'output after loading into the default layout')
    model.load_state_dict(_build('kw_resnet18').state_dict(), strict=True)  # back to the built weights
    assert all(w.is_contiguous() for w in warehouses)
    _assert_close(_eval_output(model, x), _eval_output(_build('kw_resnet18'), x), 'output after loading')

    for convert, dtype in [(lambda m: m.half(), torch.float16), (lambda m: m.to(torch.float32), torch.float32),
                           (lambda m: m.double(), torch.float64), (lambda m: m.float(), torch.float32)]:
        before = [w.detach().clone() for w in warehouses]
        assert convert(model) is model
        assert list(model.warehouse_manager.weights) == warehouses  # the same Parameter objects
        for w, old in zip(warehouses, before):
            assert w.dtype == dtype and w.shape == old.shape and w.is_contiguous() and w.requires_grad
            assert torch.equal(w, old.to(dtype))
            assert w.grad.dtype == dtype and w.grad.is_contiguous()
    stem = model.conv1.weight
    assert stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()

    model.share_memory()  # in place, on the views of the warehouses that the manager hands on
    assert all(w.is_shared() for w in warehouses)


def test_channels_last_with_parameters_swapped_on_conversion():
    """``torch.__future__.set_swap_module_params_on_conversion(True)``: ``_apply`` swaps the parameters'
    contents instead of setting ``.data``, which fails while other references to them are held."""
    model, unswapped, x = _build('kw_resnet18'), _build('kw_resnet18'), _input()
    _eval_output(model, x)  # the GEMM path keeps views of the warehouses until the next pass
    warehouses = list(model.warehouse_manager.weights)
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        _channels_last(model).float()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert list(model.warehouse_manager.weights) == warehouses
    assert all(w.is_contiguous() and w.dtype == torch.float32 for w in warehouses)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(_eval_output(model, x.float()), _eval_output(_channels_last(unswapped).float(), x.float()))
