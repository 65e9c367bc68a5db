"""KW convolutions and the KW linear layer (KW-SPEC section 4)."""
import math
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterable, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import functional
from .attention import Attention

if TYPE_CHECKING:
    from .manager import WarehouseManager

IntOrTuple = Union[int, Sequence[int]]


def _ntuple(value: IntOrTuple, n: int) -> Tuple[int, ...]:
    if isinstance(value, Iterable):
        value = tuple(value)
        if len(value) != n:
            raise ValueError(f'expected {n} values, got {value}')
        return value
    return (value,) * n


class KWConvNd(nn.Module):
    """A convolution whose kernel is assembled per sample from warehouse cells.

    It holds no kernel of its own: only an optional bias and, after allocation, its attention.
    The manager is referenced, not registered, so that the shared warehouse parameters appear
    once in the model's state dict (as ``warehouse_manager.weights.N``). The convolution runs the
    original release's algorithm or the GEMM path, whichever :mod:`.functional` chooses.
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
        self.geometry = functional.KWConvGeometry(
            self.in_planes, self.out_planes, self.kernel_size, self.stride, self.padding, self.dilation,
            self.groups, self.cell_shape, self.groups_out_channel, self.groups_in_channel, self.groups_spatial)
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

    def reference_conv(self, x: torch.Tensor, mixture_weights: torch.Tensor) -> torch.Tensor:
        """The original release's algorithm (no bias): per-sample kernels, one grouped convolution."""
        batch_size = x.shape[0]
        kernels = self.assemble_kernels(mixture_weights, batch_size)
        # Batch folded into channels: one grouped convolution applies each sample's own kernel.
        out = type(self).conv_fn(
            x.reshape(1, -1, *x.shape[2:]), kernels, None, self.stride, self.padding, self.dilation,
            self.groups * batch_size)
        return out.reshape(batch_size, self.out_planes, *out.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixture_weights = self.attention(x)  # the fast paths cast it to their compute dtype
        implementation = functional.choose_implementation(self.geometry, x)
        if implementation == 'reference':
            out = self.reference_conv(x, mixture_weights.to(x.dtype))
        elif implementation == 'gemm':
            manager = self.warehouse_manager
            out = functional.gemm_conv(x, mixture_weights, manager.take_cell(self.warehouse_id), self.geometry,
                                       share=partial(manager.per_pass, self))
        else:
            cells = self.warehouse_manager.take_cell(self.warehouse_id)
            out = functional.input_mix_conv(x, mixture_weights, cells, self.geometry)
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
