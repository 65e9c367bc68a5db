"""KernelWarehouse: dynamic convolution with kernel cells shared through per-stage warehouses.

A KW layer splits its kernel into ``m`` same-shaped cells and builds every cell, per sample, as a
linear mixture of the ``n`` cells of a warehouse that neighbouring layers share. The mixture
weights come from a small attention branch (:class:`Attention`).

The life cycle of a KW model follows the warehouse manager's three phases:

1. :meth:`WarehouseManager.reserve` while the model is built: records the kernel shape of each
   dynamic layer under a (fused) warehouse name and returns a weightless KW layer;
2. :meth:`WarehouseManager.store` once the model is built: creates one parameter per warehouse;
3. :meth:`WarehouseManager.allocate`: gives each KW layer its attention and its contiguous range of
   cells, and initialises those cells.

Paper: "KernelWarehouse: Rethinking the Design of Dynamic Convolution", Li and Yao, ICML 2024.
The behaviour reproduced here is specified in ``KW-SPEC.md`` (sections 1-4).
"""
import math
from functools import partial
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    'WarehouseManager', 'Warehouse_Manager', 'Attention', 'KWConvNd', 'KWConv1d', 'KWConv2d',
    'KWConv3d', 'KWLinear', 'set_temperature', 'parse_sharing_range',
]

PerWarehouse = Union[float, Sequence[float]]
IntOrTuple = Union[int, Sequence[int]]

# Added to the L1 norm of each attention row so that an all-zero row stays finite.
L1_EPS = 1e-3


def _ntuple(value: IntOrTuple, n: int) -> Tuple[int, ...]:
    if isinstance(value, Iterable):
        value = tuple(value)
        if len(value) != n:
            raise ValueError(f'expected {n} values, got {value}')
        return value
    return (value,) * n


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


def set_temperature(module: nn.Module, temperature: float) -> None:
    """Set the temperature of every KW attention inside ``module`` (see KW-SPEC section 3)."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.temperature = float(temperature)


class Attention(nn.Module):
    """Contrasting-driven attention: per-sample mixture weights of one KW layer.

    Output has shape ``[B * num_mixtures, num_cells]``: row ``b * m + j`` mixes the warehouse's
    cells into cell ``j`` of sample ``b``'s kernel. Each row is L1-normalised together with an
    extra "zero cell" column (dropped from the output), then blended with a one-hot prior
    ``temperature_prior`` by ``temperature``.
    """

    def __init__(
            self,
            in_planes: int,
            reduction: float,
            num_cells: int,
            num_mixtures: int,
            norm_layer: Type[nn.Module] = nn.BatchNorm1d,
            cell_num_ratio: float = 1.0,
            nonlocal_basis_ratio: float = 1.0,
            start_cell_idx: int = 0,
    ):
        super().__init__()
        hidden_planes = max(int(in_planes * reduction), 16)
        self.planes_per_mixture = num_cells + 1  # the last plane is the zero cell
        self.num_mixtures = num_mixtures
        self.kw_planes = self.planes_per_mixture * num_mixtures
        self.start_cell_idx = start_cell_idx
        self.temperature = 0.0

        self.fc1 = nn.Linear(in_planes, hidden_planes, bias=norm_layer is not nn.BatchNorm1d)
        self.norm1 = norm_layer(hidden_planes)
        self.act1 = nn.ReLU(inplace=True)
        self.num_basis = None
        if nonlocal_basis_ratio >= 1.0:
            self.fc2 = nn.Linear(hidden_planes, self.kw_planes, bias=True)
        else:
            # Low-rank mapping: the layer's own cells get direct weights, the cells of the other
            # layers sharing the warehouse are reached through a small shared basis.
            self.num_local_cells = int(cell_num_ratio * num_mixtures)
            self.num_nonlocal_cells = num_cells - self.num_local_cells
            self.num_basis = max(int(self.num_nonlocal_cells * nonlocal_basis_ratio), 16)
            self.fc2 = nn.Linear(
                hidden_planes, (self.num_local_cells + self.num_basis + 1) * num_mixtures, bias=False)
            self.fc3 = nn.Linear(self.num_basis, self.num_nonlocal_cells, bias=False)
            self.basis_bias = nn.Parameter(torch.zeros(self.kw_planes))
        # Not saved in checkpoints; rebuilt by ``init_temperature`` at allocation.
        self.register_buffer('temperature_prior', torch.zeros(self.kw_planes), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.no_grad()
    def init_temperature(self, start_cell_idx: int, cell_num_ratio: float) -> int:
        """Build the one-hot prior of this layer's mixtures; returns the layer's end cell index."""
        self.temperature_prior.zero_()
        planes = self.planes_per_mixture
        if cell_num_ratio >= 1.0:
            step = int(cell_num_ratio)
            for j in range(self.num_mixtures):
                self.temperature_prior[j * planes + start_cell_idx] = 1
                start_cell_idx += step
        else:
            mixtures_per_cell = int(1.0 / cell_num_ratio)
            for j in range(self.num_mixtures):
                if j % mixtures_per_cell == (j // mixtures_per_cell) % mixtures_per_cell:
                    self.temperature_prior[j * planes + start_cell_idx] = 1
                    start_cell_idx += 1
                else:
                    self.temperature_prior[j * planes + planes - 1] = 1  # the zero cell
        return start_cell_idx

    def _map_to_cells(self, x: torch.Tensor) -> torch.Tensor:
        """Expand ``[local | basis | zero]`` rows to ``[other cells, own cells, zero]`` order."""
        x = x.reshape(-1, self.num_local_cells + self.num_basis + 1)
        local = x[:, :self.num_local_cells]
        nonlocal_cells = self.fc3(x[:, self.num_local_cells:-1])
        start = self.start_cell_idx
        x = torch.cat([nonlocal_cells[:, :start], local, nonlocal_cells[:, start:], x[:, -1:]], dim=1)
        return x.reshape(-1, self.kw_planes) + self.basis_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).mean(dim=-1)
        x = self.act1(self.norm1(self.fc1(x)))
        x = self.fc2(x)
        if self.num_basis is not None:
            x = self._map_to_cells(x)
        x = x.reshape(-1, self.planes_per_mixture)
        x = x / (x.abs().sum(dim=1, keepdim=True) + L1_EPS)
        if self.temperature != 0:
            t = self.temperature
            x = (1.0 - t) * x.reshape(-1, self.kw_planes) + t * self.temperature_prior.to(x.dtype)
            x = x.reshape(-1, self.planes_per_mixture)
        return x[:, :-1]


class KWConvNd(nn.Module):
    """A convolution whose kernel is assembled per sample from warehouse cells.

    It holds no kernel of its own: only an optional bias and, after allocation, its attention.
    The manager is referenced, not registered, so that the shared warehouse parameters appear
    once in the model's state dict (as ``warehouse_manager.weights.N``).
    """
    dimension: int = 0
    conv_fn: Callable = None

    def __init__(
            self,
            in_planes: int,
            out_planes: int,
            kernel_size: IntOrTuple,
            stride: IntOrTuple = 1,
            padding: IntOrTuple = 0,
            dilation: IntOrTuple = 1,
            groups: int = 1,
            bias: bool = False,
            warehouse_id: int = 0,
            warehouse_manager: 'WarehouseManager' = None,
    ):
        super().__init__()
        d = self.dimension
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.kernel_size = _ntuple(kernel_size, d)
        self.stride = _ntuple(stride, d)
        self.padding = _ntuple(padding, d)
        self.dilation = _ntuple(dilation, d)
        self.groups = groups
        self.bias = nn.Parameter(torch.zeros(out_planes)) if bias else None
        self.warehouse_id = warehouse_id
        # Bypass nn.Module.__setattr__ so the manager is not registered as a child module.
        self.__dict__['warehouse_manager'] = warehouse_manager
        # [B, gs, go, gi, co, ci, *ck] -> [B, go, co, gi, ci, gs, *ck] (KW-SPEC section 4)
        self.kernel_permutation = (0, 2, 4, 3, 5, 1) + tuple(range(6, 6 + d))

    def init_attention(
            self,
            cells: torch.Tensor,
            start_cell_idx: int,
            reduction: float,
            cell_num_ratio: float,
            norm_layer: Type[nn.Module],
            nonlocal_basis_ratio: float = 1.0,
    ) -> int:
        """Create the attention for a warehouse ``cells`` of shape ``[n, co, ci, *ck]``.

        Returns the layer's end cell index.
        """
        self.cell_shape = tuple(cells.shape)
        self.groups_out_channel = self.out_planes // self.cell_shape[1]
        self.groups_in_channel = self.in_planes // self.groups // self.cell_shape[2]
        self.groups_spatial = math.prod(k // ck for k, ck in zip(self.kernel_size, self.cell_shape[3:]))
        self.num_mixtures = self.groups_out_channel * self.groups_in_channel * self.groups_spatial
        self.attention = Attention(
            self.in_planes, reduction, self.cell_shape[0], self.num_mixtures, norm_layer=norm_layer,
            cell_num_ratio=cell_num_ratio, nonlocal_basis_ratio=nonlocal_basis_ratio,
            start_cell_idx=start_cell_idx)
        self.start_cell_idx = start_cell_idx
        self.end_cell_idx = self.attention.init_temperature(start_cell_idx, cell_num_ratio)
        return self.end_cell_idx

    def assemble_kernels(self, mixture_weights: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Per-sample kernels ``[B * C_out, C_in / groups, *k]`` from ``[B * m, n]`` mixture weights."""
        cells = self.warehouse_manager.take_cell(self.warehouse_id)
        cells = cells.reshape(self.cell_shape[0], -1).to(mixture_weights.dtype)
        kernels = torch.mm(mixture_weights, cells).reshape(
            batch_size, self.groups_spatial, self.groups_out_channel, self.groups_in_channel,
            *self.cell_shape[1:])
        kernels = kernels.permute(*self.kernel_permutation)
        return kernels.reshape(-1, self.in_planes // self.groups, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size = x.shape[0]
        mixture_weights = self.attention(x).to(x.dtype)
        kernels = self.assemble_kernels(mixture_weights, batch_size)
        # Batch folded into channels: one grouped convolution applies each sample's own kernel.
        out = type(self).conv_fn(
            x.reshape(1, -1, *x.shape[2:]), kernels, None, self.stride, self.padding, self.dilation,
            self.groups * batch_size)
        out = out.reshape(batch_size, self.out_planes, *out.shape[2:])
        if self.bias is not None:
            out = out + self.bias.to(out.dtype).reshape(1, -1, *([1] * self.dimension))
        return out

    def extra_repr(self) -> str:
        return (f'{self.in_planes}, {self.out_planes}, kernel_size={self.kernel_size}, '
                f'stride={self.stride}, padding={self.padding}, dilation={self.dilation}, '
                f'groups={self.groups}, bias={self.bias is not None}, warehouse_id={self.warehouse_id}')


class KWConv1d(KWConvNd):
    dimension = 1
    conv_fn = F.conv1d


class KWConv2d(KWConvNd):
    dimension = 2
    conv_fn = F.conv2d


class KWConv3d(KWConvNd):
    dimension = 3
    conv_fn = F.conv3d


class KWLinear(nn.Module):
    """A KW linear layer: a KW 1-D convolution with kernel 1 over the tokens of each sample.

    Input ``[B, ..., in]`` is treated as ``B`` sequences of tokens; the attention pools over the
    tokens of each sample.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, warehouse_id: int = 0,
                 warehouse_manager: 'WarehouseManager' = None):
        super().__init__()
        self.conv = KWConv1d(in_features, out_features, 1, bias=bias, warehouse_id=warehouse_id,
                             warehouse_manager=warehouse_manager)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = self.conv(x.reshape(shape[0], -1, shape[-1]).transpose(1, 2))
        return x.transpose(1, 2).reshape(*shape[:-1], -1)


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
        self.weights = nn.ParameterList()

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
    ) -> nn.Module:
        """Return a KW layer drawing on warehouse ``warehouse_name`` (or a plain layer if not enabled)."""
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
        kernel = layers[0][2:]
        if not self.spatial_partition[idx]:
            for layer in layers:
                if layer[2:] != kernel:
                    raise ValueError(
                        f'warehouse {name!r} holds kernels {tuple(kernel)} and {tuple(layer[2:])} but spatial '
                        f'partition is off for it: turn spatial_partition on, or choose a sharing range that '
                        f'keeps layers with different kernels in different warehouses.')
        cell_out = max(int(math.gcd(*(layer[0] for layer in layers)) * self.cell_outplane_ratio[idx]), 1)
        cell_in = max(int(math.gcd(*(layer[1] for layer in layers)) * self.cell_inplane_ratio[idx]), 1)
        for layer in layers:
            if layer[0] % cell_out or layer[1] % cell_in:
                raise ValueError(
                    f'warehouse {name!r}: cells of {cell_out} out x {cell_in} in channels do not tile a '
                    f'layer with {layer[0]} out x {layer[1]} in channels; choose cell_outplane_ratio '
                    f'({self.cell_outplane_ratio[idx]}) and cell_inplane_ratio ({self.cell_inplane_ratio[idx]}) '
                    f'so that the cells divide every layer.')
        cell_kernel = [1] * len(kernel) if self.spatial_partition[idx] else list(kernel)
        return [cell_out, cell_in, *cell_kernel]

    def store(self) -> None:
        """Create one parameter ``[n, cell_out, cell_in, *cell_kernel]`` per warehouse."""
        if len(self.weights):
            raise RuntimeError('store() was already called.')
        self._broadcast_settings()
        for idx, (name, layers) in enumerate(self.warehouse_list.items()):
            cell_out, cell_in, *cell_kernel = self._cell_shape(idx, name, layers)
            num_mixtures = 0
            for out_planes, in_planes, *kernel in layers:
                # Evaluated left to right as in the released code (it fixes the warehouse size).
                groups_channel = int(out_planes // cell_out * in_planes // cell_in)
                groups_spatial = math.prod(k // ck for k, ck in zip(kernel, cell_kernel))
                num_mixtures += groups_channel * groups_spatial
            num_cells = max(int(num_mixtures * self.cell_num_ratio[idx]), 1)
            self.weights.append(nn.Parameter(torch.randn(num_cells, cell_out, cell_in, *cell_kernel)))

    def allocate(self, network: nn.Module,
                 init_weights: Callable = partial(nn.init.kaiming_normal_, mode='fan_out', nonlinearity='relu')):
        """Give every KW layer of ``network`` (in ``modules()`` order) its attention and cells."""
        if not len(self.weights) and self.warehouse_list:
            raise RuntimeError('allocate() called before store().')
        end_idxs = [0] * len(self.weights)
        for layer in network.modules():
            if not isinstance(layer, KWConvNd) or layer.warehouse_manager is not self:
                continue
            idx = layer.warehouse_id
            cells = self.weights[idx]
            start = end_idxs[idx]
            end = layer.init_attention(cells, start, self.reduction[idx], self.cell_num_ratio[idx],
                                       self.norm_layer, self.nonlocal_basis_ratio)
            if start < end <= cells.shape[0]:  # an overflow is reported below
                with torch.no_grad():
                    init_weights(cells[start:end].view(-1, *cells.shape[2:]))
            end_idxs[idx] = end
        for idx, (name, end) in enumerate(zip(self.warehouse_names, end_idxs)):
            if end != self.weights[idx].shape[0]:
                raise ValueError(
                    f'warehouse {name!r} has {self.weights[idx].shape[0]} cells but its layers claim {end} '
                    f'with cell_num_ratio {self.cell_num_ratio[idx]}: use a whole number >= 1 or 1/k '
                    f'(0.5, 0.25, ...), and make sure every reserved KW layer is part of the network.')

    def take_cell(self, warehouse_idx: int) -> torch.Tensor:
        return self.weights[warehouse_idx]


# The released code's name, kept for users' scripts.
Warehouse_Manager = WarehouseManager
