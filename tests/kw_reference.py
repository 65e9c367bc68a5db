"""A deliberately naive KernelWarehouse written from KW-SPEC sections 2 and 4, for the tests.

It recomputes a KW layer's output from the layer's parameters with explicit loops: the attention
step by step, then, sample by sample, the kernel assembled cell by cell and a plain convolution.
Nothing here is shared with ``modules.kernel_warehouse`` beyond reading parameters.
"""
import itertools

import torch
import torch.nn.functional as F
from torch import nn

CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def naive_attention(attention, x: torch.Tensor, start_cell_idx: int) -> torch.Tensor:
    """KW-SPEC section 2 steps 1-5 -> ``[B, m, n]``."""
    batch = x.shape[0]
    pooled = x.reshape(batch, x.shape[1], -1).mean(dim=2)
    hidden = F.relu(attention.norm1(attention.fc1(pooled)))
    logits = attention.fc2(hidden)
    m, planes = attention.num_mixtures, attention.planes_per_mixture
    if hasattr(attention, 'fc3'):
        local, basis = attention.num_local_cells, attention.num_basis
        rows = logits.reshape(batch, m, local + basis + 1)
        mapped = attention.fc3(rows[..., local:local + basis])
        rows = torch.cat([mapped[..., :start_cell_idx], rows[..., :local], mapped[..., start_cell_idx:],
                          rows[..., -1:]], dim=-1)
        logits = rows.reshape(batch, m * planes) + attention.basis_bias
    rows = logits.reshape(batch, m, planes)
    rows = rows / (rows.abs().sum(dim=-1, keepdim=True) + 1e-3)
    t = attention.temperature
    prior = attention.temperature_prior.reshape(m, planes).to(rows.dtype)
    rows = (1 - t) * rows + t * prior
    return rows[..., :-1]


def naive_kernel(layer, weights: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """One sample's kernel ``[C_out, C_in / g, *k]`` from its ``[m, n]`` mixture weights."""
    n, cell_out, cell_in, *cell_kernel = cells.shape
    kernel_size = tuple(layer.kernel_size)
    kernel = cells.new_zeros(layer.out_planes, layer.in_planes // layer.groups, *kernel_size)
    groups_out = layer.out_planes // cell_out
    groups_in = layer.in_planes // layer.groups // cell_in
    spatial_blocks = [range(0, k, ck) for k, ck in zip(kernel_size, cell_kernel)]
    mixed_cells = torch.einsum('jc,c...->j...', weights, cells)  # cell j: weighted sum of the n cells
    for j, cell in enumerate(mixed_cells):
        s, rem = divmod(j, groups_out * groups_in)
        o, i = divmod(rem, groups_in)
        position = list(itertools.product(*spatial_blocks))[s]
        index = (slice(o * cell_out, (o + 1) * cell_out), slice(i * cell_in, (i + 1) * cell_in)) + tuple(
            slice(p, p + ck) for p, ck in zip(position, cell_kernel))
        kernel[index] = cell
    return kernel


def naive_kw_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """A KW conv's output, sample by sample (KW-SPEC section 4)."""
    weights = naive_attention(layer.attention, x, layer.start_cell_idx)
    cells = layer.warehouse_manager.weights[layer.warehouse_id]
    conv = CONV_FNS[len(layer.kernel_size)]
    outputs = []
    for b in range(x.shape[0]):
        kernel = naive_kernel(layer, weights[b], cells)
        outputs.append(conv(x[b:b + 1], kernel, layer.bias, layer.stride, layer.padding, layer.dilation,
                            layer.groups))
    return torch.cat(outputs)


class NaiveForward:
    """Context manager: every KW conv of the process computes with :func:`naive_kw_forward`."""

    def __enter__(self):
        from modules.kernel_warehouse import KWConvNd
        self._cls, self._forward = KWConvNd, KWConvNd.forward
        KWConvNd.forward = naive_kw_forward
        return self

    def __exit__(self, *exc):
        self._cls.forward = self._forward


class KWNet(nn.Module):
    """A few KW layers on one manager, applied to the same input (for layer-level tests)."""

    def __init__(self, layer_specs, **manager_kwargs):
        super().__init__()
        from modules.kernel_warehouse import WarehouseManager
        self.warehouse_manager = WarehouseManager(**manager_kwargs)
        self.kw_layers = nn.ModuleList(self.warehouse_manager.reserve(**spec) for spec in layer_specs)
        self.warehouse_manager.store()
        self.warehouse_manager.allocate(self)

    def forward(self, x):
        return [layer(x) for layer in self.kw_layers]
