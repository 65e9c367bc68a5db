"""The warehouse manager: reserve, store, allocate (KW-SPEC section 1)."""
import math
from functools import partial
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Set, Tuple, Type, Union

import torch
from torch import nn

from .attention import CellOverflowError
from .conv import IntOrTuple, KWConv1d, KWConv2d, KWConv3d, KWConvNd, KWLinear, _ntuple

PerWarehouse = Union[float, Sequence[float]]


def _per_warehouse(value, num_warehouses: int, setting: str, names: Sequence[str]) -> list:
    """Broadcast a scalar or a length-1 sequence to one value per warehouse."""
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return list(value) * num_warehouses
        if len(value) == num_warehouses:
            return list(value)
        raise ValueError(
            f'{setting} has {len(value)} values but the model has {num_warehouses} warehouses '
            f'({", ".join(names)}); give one value, or one value per warehouse.')
    return [value] * num_warehouses


def _named(layer_name: Optional[str]) -> str:
    """`` ('path')`` naming a layer in an error message, or nothing when the caller gave no name."""
    return f' ({layer_name!r})' if layer_name else ''


def _check_positive(value, setting: str) -> None:
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f'{setting} must be a number > 0 (or a list of them), got {value!r}.')


def parse_sharing_range(sharing_range) -> Tuple[str, ...]:
    """``"layer_conv"`` or ``["layer", "conv"]`` -> ``("layer", "conv")``; ``None`` -> ``()``.

    The released configs write the sharing range as one ``_``-joined string.
    """
    if sharing_range is None:
        return ()
    if isinstance(sharing_range, str):
        return tuple(part for part in sharing_range.split('_') if part)
    parts = tuple(sharing_range)
    if not all(isinstance(p, str) and p for p in parts):
        raise ValueError(f'sharing_range must be a string or a list of non-empty strings, got {sharing_range!r}.')
    return parts


_KW_LAYERS = {'conv1d': KWConv1d, 'conv2d': KWConv2d, 'conv3d': KWConv3d}
_STATIC_LAYERS = {'conv1d': nn.Conv1d, 'conv2d': nn.Conv2d, 'conv3d': nn.Conv3d}
_LAYER_DIMENSIONS = {'conv1d': 1, 'conv2d': 2, 'conv3d': 3, 'linear': 1}


def static_layer(in_planes: int, out_planes: int, kernel_size: IntOrTuple = 1, stride: IntOrTuple = 1,
                 padding: IntOrTuple = 0, dilation: IntOrTuple = 1, groups: int = 1, bias: bool = True,
                 layer_type: str = 'conv2d', **_unused) -> nn.Module:
    """The plain ``nn.Conv{1,2,3}d`` / ``nn.Linear`` matching a :meth:`WarehouseManager.reserve` call.

    Takes (and ignores) the KW-only arguments of ``reserve`` so that a model can use either to
    build its layers.
    """
    if layer_type == 'linear':
        return nn.Linear(in_planes, out_planes, bias=bias)
    if layer_type not in _STATIC_LAYERS:
        raise ValueError(f'layer_type must be one of {sorted(_LAYER_DIMENSIONS)}, got {layer_type!r}.')
    return _STATIC_LAYERS[layer_type](in_planes, out_planes, kernel_size, stride=stride, padding=padding,
                                      dilation=dilation, groups=groups, bias=bias)


def cell_shape(layers: Sequence[Sequence[int]], cell_inplane_ratio: float = 1, cell_outplane_ratio: float = 1,
               spatial_partition: bool = True) -> List[int]:
    """The cell ``[cell_out, cell_in, *cell_kernel]`` of a warehouse holding kernels of the shapes
    ``layers`` (``[out, in / groups, *k]`` each; KW-SPEC section 1). Without spatial partition the
    cell kernel is the first layer's kernel (the manager checks that they agree)."""
    cell_out = max(int(math.gcd(*(layer[0] for layer in layers)) * cell_outplane_ratio), 1)
    cell_in = max(int(math.gcd(*(layer[1] for layer in layers)) * cell_inplane_ratio), 1)
    kernel = layers[0][2:]
    return [cell_out, cell_in, *([1] * len(kernel) if spatial_partition else kernel)]


def tiles(layer: Sequence[int], cell: Sequence[int]) -> bool:
    """Whether cells of shape ``cell`` tile a kernel of shape ``layer``."""
    return all(size % cell_size == 0 for size, cell_size in zip(layer, cell))


def num_mixtures(layer: Sequence[int], cell: Sequence[int]) -> int:
    """The mixtures (cells) a kernel of shape ``layer`` is assembled from."""
    return math.prod(size // cell_size for size, cell_size in zip(layer, cell))


def num_cells(layers: Sequence[Sequence[int]], cell: Sequence[int], cell_num_ratio: float = 1) -> int:
    """The cell count of a warehouse: its layers' mixtures times ``cell_num_ratio``."""
    total = 0
    for out_planes, in_planes, *kernel in layers:
        # Evaluated left to right as in the released code (it fixes the warehouse size).
        groups_channel = int(out_planes // cell[0] * in_planes // cell[1])
        total += groups_channel * math.prod(k // ck for k, ck in zip(kernel, cell[2:]))
    return max(int(total * cell_num_ratio), 1)


class _PassMemo:
    """What :meth:`WarehouseManager.per_pass` keeps of the current forward pass: values by key, and the
    layers (by id) that asked. Never copied (``copy.deepcopy`` of a model, e.g. for EMA, or pickling):
    a copy starts empty, as the values may be tensors inside an autograd graph."""

    def __init__(self):
        self.values: Dict[Hashable, Any] = {}
        self.layers: Set[int] = set()

    def clear(self) -> None:
        self.values.clear()
        self.layers.clear()

    def __reduce__(self):  # copies and pickles start empty
        return _PassMemo, ()


class WarehouseManager(nn.Module):
    """Owns the warehouses of a KW model: ``reserve`` layers, ``store`` cells, ``allocate`` them.

    Args:
        reduction: attention hidden width as a fraction of a layer's input channels (min 16).
        cell_num_ratio: cells per warehouse relative to the mixtures its layers need (1/4x ... 4x).
        cell_inplane_ratio: cell input channels relative to the gcd of the layers' inputs.
        cell_outplane_ratio: cell output channels relative to the gcd of the layers' outputs.
        sharing_range: name-part prefixes whose index is dropped when fusing warehouse names,
            e.g. ``("layer", "conv")`` or ``"layer_conv"``: ``stage2_layer3_conv1`` -> ``stage2_layer_conv``.
        nonlocal_basis_ratio: < 1 maps the attention to other layers' cells through a low-rank basis.
        norm_layer: normalisation inside the attention (``nn.BatchNorm1d`` or ``nn.LayerNorm``).
        spatial_partition: split kernels into 1x1 cells (True) or keep whole kernels as cells.

    ``reduction``, the three ratios and ``spatial_partition`` may each be a scalar or a sequence of
    length 1 or of the number of warehouses (in order of first reservation).
    """

    def __init__(
            self,
            reduction: PerWarehouse = 0.0625,
            cell_num_ratio: PerWarehouse = 1,
            cell_inplane_ratio: PerWarehouse = 1,
            cell_outplane_ratio: PerWarehouse = 1,
            sharing_range: Union[str, Sequence[str], None] = (),
            nonlocal_basis_ratio: float = 1,
            norm_layer: Type[nn.Module] = nn.BatchNorm1d,
            spatial_partition: Union[bool, Sequence[bool]] = True,
    ):
        super().__init__()
        for setting, value in [('reduction', reduction), ('cell_num_ratio', cell_num_ratio),
                               ('cell_inplane_ratio', cell_inplane_ratio),
                               ('cell_outplane_ratio', cell_outplane_ratio),
                               ('nonlocal_basis_ratio', nonlocal_basis_ratio)]:
            _check_positive(value, setting)
        self.sharing_range = parse_sharing_range(sharing_range)
        self.settings = dict(reduction=reduction, cell_num_ratio=cell_num_ratio,
                             cell_inplane_ratio=cell_inplane_ratio, cell_outplane_ratio=cell_outplane_ratio,
                             spatial_partition=spatial_partition)
        self.nonlocal_basis_ratio = nonlocal_basis_ratio
        self.norm_layer = norm_layer
        # fused warehouse name -> weight shapes [out, in / groups, *k] of its layers, in reserve order
        self.warehouse_list: Dict[str, List[List[int]]] = {}
        # fused warehouse name -> the optional names of its layers (for error messages only)
        self.layer_names: Dict[str, List[Optional[str]]] = {}
        self.weights = nn.ParameterList()
        self._pass_memo = _PassMemo()  # see per_pass

    @property
    def warehouse_names(self) -> List[str]:
        return list(self.warehouse_list)

    def fuse_warehouse_name(self, warehouse_name: str) -> str:
        """Replace every ``_``-separated part that starts with a sharing prefix by that prefix."""
        fused = []
        for part in warehouse_name.split('_'):
            for prefix in self.sharing_range:
                if part.startswith(prefix):
                    part = prefix
            fused.append(part)
        return '_'.join(fused)

    def reserve(
            self,
            in_planes: int,
            out_planes: int,
            kernel_size: IntOrTuple = 1,
            stride: IntOrTuple = 1,
            padding: IntOrTuple = 0,
            dilation: IntOrTuple = 1,
            groups: int = 1,
            bias: bool = True,
            warehouse_name: str = 'default',
            enabled: bool = True,
            layer_type: str = 'conv2d',
            layer_name: Optional[str] = None,
    ) -> nn.Module:
        """Return a KW layer drawing on warehouse ``warehouse_name`` (or a plain layer if not enabled).

        ``layer_name`` (e.g. the layer's module path) only serves to name the layer in errors.
        """
        if layer_type not in _LAYER_DIMENSIONS:
            raise ValueError(f'layer_type must be one of {sorted(_LAYER_DIMENSIONS)}, got {layer_type!r}.')
        if not enabled:
            return static_layer(in_planes, out_planes, kernel_size, stride, padding, dilation, groups, bias,
                                layer_type=layer_type)
        if len(self.weights):
            raise RuntimeError('reserve() called after store(): reserve every KW layer before storing.')
        if layer_type == 'linear':
            kernel_size, groups = 1, 1
        if in_planes % groups or out_planes % groups:
            raise ValueError(f'in_planes ({in_planes}) and out_planes ({out_planes}) must be divisible by '
                             f'groups ({groups}).')
        name = self.fuse_warehouse_name(warehouse_name)
        shape = [out_planes, in_planes // groups, *_ntuple(kernel_size, _LAYER_DIMENSIONS[layer_type])]
        self.warehouse_list.setdefault(name, []).append(shape)
        self.layer_names.setdefault(name, []).append(layer_name)
        warehouse_id = self.warehouse_names.index(name)
        if layer_type == 'linear':
            return KWLinear(in_planes, out_planes, bias=bias, warehouse_id=warehouse_id, warehouse_manager=self)
        return _KW_LAYERS[layer_type](in_planes, out_planes, kernel_size, stride=stride, padding=padding,
                                      dilation=dilation, groups=groups, bias=bias, warehouse_id=warehouse_id,
                                      warehouse_manager=self)

    def _broadcast_settings(self) -> None:
        names, n = self.warehouse_names, len(self.warehouse_list)
        for setting, value in self.settings.items():
            setattr(self, setting, _per_warehouse(value, n, setting, names))

    def _cell_shape(self, idx: int, name: str, layers: List[List[int]]) -> List[int]:
        kernel, layer_names = layers[0][2:], self.layer_names[name]
        if not self.spatial_partition[idx]:
            for layer, layer_name in zip(layers, layer_names):
                if layer[2:] != kernel:
                    raise ValueError(
                        f'warehouse {name!r} holds kernels {tuple(kernel)}{_named(layer_names[0])} and '
                        f'{tuple(layer[2:])}{_named(layer_name)} but spatial '
                        f'partition is off for it: turn spatial_partition on, or choose a sharing range that '
                        f'keeps layers with different kernels in different warehouses.')
        cell = cell_shape(layers, self.cell_inplane_ratio[idx], self.cell_outplane_ratio[idx],
                          self.spatial_partition[idx])
        for layer, layer_name in zip(layers, layer_names):
            if not tiles(layer, cell):
                raise ValueError(
                    f'warehouse {name!r}: cells of {cell[0]} out x {cell[1]} in channels do not tile a '
                    f'layer{_named(layer_name)} with {layer[0]} out x {layer[1]} in channels; choose '
                    f'cell_outplane_ratio ({self.cell_outplane_ratio[idx]}) and cell_inplane_ratio '
                    f'({self.cell_inplane_ratio[idx]}) so that the cells divide every layer.')
        return cell

    def store(self) -> None:
        """Create one parameter ``[n, cell_out, cell_in, *cell_kernel]`` per warehouse."""
        if len(self.weights):
            raise RuntimeError('store() was already called.')
        self._broadcast_settings()
        for idx, (name, layers) in enumerate(self.warehouse_list.items()):
            self.weights.append(self._new_cells(idx, name, layers))

    def _new_cells(self, idx: int, name: str, layers: List[List[int]]) -> nn.Parameter:
        """Warehouse ``idx``'s parameter, sized for its ``layers`` (uninitialised values)."""
        cell = self._cell_shape(idx, name, layers)
        return nn.Parameter(torch.randn(num_cells(layers, cell, self.cell_num_ratio[idx]), *cell))

    def allocate(self, network: nn.Module,
                 init_weights: Callable = partial(nn.init.kaiming_normal_, mode='fan_out', nonlinearity='relu')):
        """Give every KW layer of ``network`` (in ``modules()`` order) its attention and cells."""
        if not len(self.weights) and self.warehouse_list:
            raise RuntimeError('allocate() called before store().')
        end_idxs = [0] * len(self.weights)
        for path, layer in network.named_modules():
            if not isinstance(layer, KWConvNd) or layer.warehouse_manager is not self:
                continue
            end_idxs[layer.warehouse_id] = self._allocate_layer(layer, end_idxs[layer.warehouse_id], path, init_weights)
        for idx, end in enumerate(end_idxs):
            if end != self.weights[idx].shape[0]:
                raise ValueError(self._cell_count_message(idx, str(end)))

    def _allocate_layer(self, layer: KWConvNd, start: int, path: str, init_weights: Callable) -> int:
        """Give ``layer`` its attention over its warehouse from cell ``start`` on, initialise the cells it
        claims, and return its end cell index."""
        idx = layer.warehouse_id
        cells = self.weights[idx]
        try:
            end = layer.init_attention(cells, start, self.reduction[idx], self.cell_num_ratio[idx],
                                       self.norm_layer, self.nonlocal_basis_ratio)
        except CellOverflowError:
            raise ValueError(self._cell_count_message(idx, 'more', f' (layer {path!r} overflows it)')) from None
        if start < end:
            with torch.no_grad():
                init_weights(cells[start:end].view(-1, *cells.shape[2:]))
        return end

    def replace_layer(self, layer: Union[KWConvNd, KWLinear], out_planes: int,
                      init_weights: Callable = partial(nn.init.kaiming_normal_, mode='fan_out',
                                                       nonlinearity='relu')) -> nn.Module:
        """A layer like ``layer`` with ``out_planes`` outputs, to put in its place (e.g. a KW classifier
        for another number of classes, timm's ``reset_classifier``).

        ``layer`` must be alone in its warehouse, which is rebuilt for the new layer: new cells and a
        new attention, initialised as at allocation, on ``layer``'s device and dtype. With
        ``out_planes`` 0 the warehouse goes and ``nn.Identity`` is returned; only the last warehouse
        can go, as the other warehouses' indices are their state-dict keys.
        """
        conv = layer.conv if isinstance(layer, KWLinear) else layer
        idx, name = conv.warehouse_id, self.warehouse_names[conv.warehouse_id]
        if len(self.warehouse_list[name]) != 1:
            raise ValueError(f'warehouse {name!r} serves {len(self.warehouse_list[name])} layers: only a layer '
                             f'alone in its warehouse can be replaced.')
        old_cells = self.weights[idx]
        if out_planes == 0:
            if idx != len(self.weights) - 1:
                raise ValueError(f'warehouse {name!r} is not the last one: it cannot be removed without renumbering '
                                 f'the others.')
            del self.warehouse_list[name], self.layer_names[name]
            self.weights = nn.ParameterList(list(self.weights)[:-1])
            for setting in self.settings:
                getattr(self, setting).pop()
            return nn.Identity()
        shape = [out_planes, conv.in_planes // conv.groups, *conv.kernel_size]
        self.warehouse_list[name] = [shape]
        bias = conv.bias is not None
        if isinstance(layer, KWLinear):
            new = KWLinear(conv.in_planes, out_planes, bias=bias, warehouse_id=idx, warehouse_manager=self)
            new_conv = new.conv
        else:
            new = new_conv = type(conv)(conv.in_planes, out_planes, conv.kernel_size, conv.stride, conv.padding,
                                        conv.dilation, conv.groups, bias, warehouse_id=idx, warehouse_manager=self)
        self.weights[idx] = nn.Parameter(self._new_cells(idx, name, [shape]).detach().to(old_cells))
        end = self._allocate_layer(new_conv, 0, name, init_weights)
        if end != self.weights[idx].shape[0]:
            raise ValueError(self._cell_count_message(idx, str(end)))
        return new.to(old_cells)

    def per_pass(self, layer: KWConvNd, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()`` for ``layer``'s warehouse, made once per forward pass and ``key``: the layers of
        a pass that ask with the same key get the same value (e.g. the cells cast and reordered for the
        GEMM path, see ``functional.gemm_conv``).

        A layer that asks a second time starts the next pass, which builds anew. The values also
        depend on the warehouse's version counter and storage, so that cells changed in place (an
        optimizer step, ``load_state_dict``) are never read stale, even by a layer that skipped
        the previous pass. The last pass's values are kept until the next pass begins.
        """
        memo, cells = self._pass_memo, self.weights[layer.warehouse_id]
        if id(layer) in memo.layers:
            memo.clear()
        memo.layers.add(id(layer))
        key = (layer.warehouse_id, key, cells._version, cells.data_ptr())
        if key not in memo.values:
            memo.values[key] = build()
        return memo.values[key]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> 'WarehouseManager':
        """``nn.Module._apply`` that hands ``fn`` every warehouse (and its gradient) as its 2-D view
        ``[n, cell size]`` and views the result back: the warehouses keep their shapes and stay
        contiguous under any memory format.

        ``model.to(memory_format=torch.channels_last)`` asks every 4-D and 5-D tensor for that format:
        torch refuses it for the 5-D warehouses of 2-D layers (the whole ``.to()`` failed), and would
        store a 1-D layer's 4-D warehouse with ``cell_out`` innermost. Warehouses are no convolution
        weights: each path assembles its kernels from them, and the reference and input-mixing paths
        read them without a copy only when they are contiguous. Device, dtype and in-place
        conversions (``.half()``, ``.cuda()``, ``share_memory()``, ...) apply as usual.

        The values that :meth:`per_pass` kept of the last pass are dropped first: they belong to the
        old warehouses, whose memory they would hold, and their views of the warehouses keep
        ``torch.__future__.set_swap_module_params_on_conversion(True)`` from swapping them.
        """
        self._pass_memo.clear()

        def as_matrix(t: torch.Tensor) -> torch.Tensor:
            if t.dim() < 2:
                return fn(t)
            matrix = t.flatten(1)  # a view of a contiguous t: no memory format applies to 2-D tensors
            applied = fn(matrix)
            if applied is matrix and t.is_contiguous():  # nothing converted: keep t itself, as torch does
                return t
            return applied.reshape(t.shape)

        return super()._apply(as_matrix, recurse)

    def _cell_count_message(self, idx: int, claimed: str, where: str = '') -> str:
        return (f'warehouse {self.warehouse_names[idx]!r} has {self.weights[idx].shape[0]} cells but its layers '
                f'claim {claimed}{where} with cell_num_ratio {self.cell_num_ratio[idx]}: use a whole number >= 1 '
                f'or 1/k (0.5, 0.25, ...) that suits the layers (the released 1/2x and 1/4x configs also halve '
                f'cell_inplane_ratio and cell_outplane_ratio), and make sure every reserved KW layer is part of '
                f'the network.')

    def take_cell(self, warehouse_idx: int) -> torch.Tensor:
        return self.weights[warehouse_idx]


# The released code's name, kept for users' scripts.
Warehouse_Manager = WarehouseManager
