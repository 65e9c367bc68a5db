"""The contrasting-driven attention of a KW layer (KW-SPEC sections 2 and 3)."""
from typing import Tuple, Type

import torch
from torch import nn

# Added to the L1 norm of each attention row so that an all-zero row stays finite.
L1_EPS = 1e-3


class CellOverflowError(ValueError):
    """A layer's prior claims cells beyond the end of its warehouse."""


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

    ``temperature`` is a float; setting it also writes the tensor ``temperature_value`` (a
    non-persistent buffer) that the blend reads, so that a CUDA graph captured once follows later
    temperatures. With ``blend_always`` (set by ``engine.capture_training_graph``) the blend runs
    even at temperature 0, so that the captured graph contains it.
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
        hidden_planes = self.hidden_planes(in_planes, reduction)
        self.planes_per_mixture = num_cells + 1  # the last plane is the zero cell
        self.num_mixtures = num_mixtures
        self.kw_planes = self.planes_per_mixture * num_mixtures
        self.start_cell_idx = start_cell_idx
        self.blend_always = False

        self.fc1 = nn.Linear(in_planes, hidden_planes, bias=norm_layer is not nn.BatchNorm1d)
        self.norm1 = norm_layer(hidden_planes)
        self.act1 = nn.ReLU(inplace=True)
        self.num_basis = None
        if nonlocal_basis_ratio >= 1.0:
            self.fc2 = nn.Linear(hidden_planes, self.kw_planes, bias=True)
        else:
            # Low-rank mapping: the layer's own cells get direct weights, the cells of the other
            # layers sharing the warehouse are reached through a small shared basis.
            self.num_local_cells, self.num_basis = self.basis_size(num_cells, num_mixtures, cell_num_ratio,
                                                                   nonlocal_basis_ratio)
            self.num_nonlocal_cells = num_cells - self.num_local_cells
            self.fc2 = nn.Linear(
                hidden_planes, (self.num_local_cells + self.num_basis + 1) * num_mixtures, bias=False)
            self.fc3 = nn.Linear(self.num_basis, self.num_nonlocal_cells, bias=False)
            self.basis_bias = nn.Parameter(torch.zeros(self.kw_planes))
        # Not saved in checkpoints; rebuilt by ``init_temperature`` at allocation.
        self.register_buffer('temperature_prior', torch.zeros(self.kw_planes), persistent=False)
        self.register_buffer('temperature_value', torch.zeros(()), persistent=False)
        self.temperature = 0.0
        self._init_weights()

    @staticmethod
    def hidden_planes(in_planes: int, reduction: float) -> int:
        """Width of the attention's hidden layer."""
        return max(int(in_planes * reduction), 16)

    @staticmethod
    def basis_size(num_cells: int, num_mixtures: int, cell_num_ratio: float,
                   nonlocal_basis_ratio: float) -> Tuple[int, int]:
        """``(own cells, basis size)`` of the low-rank mapping (``nonlocal_basis_ratio < 1``)."""
        num_local_cells = int(cell_num_ratio * num_mixtures)
        return num_local_cells, max(int((num_cells - num_local_cells) * nonlocal_basis_ratio), 16)

    @classmethod
    def output_weights(cls, in_planes: int, reduction: float, num_cells: int, num_mixtures: int,
                       cell_num_ratio: float = 1.0, nonlocal_basis_ratio: float = 1.0) -> int:
        """Number of weights in ``fc2`` (and ``fc3``), the part of the attention that grows with the
        warehouse: ``hidden x m x (n + 1)`` without the low-rank mapping."""
        hidden = cls.hidden_planes(in_planes, reduction)
        if nonlocal_basis_ratio >= 1.0:
            return hidden * num_mixtures * (num_cells + 1)
        local, basis = cls.basis_size(num_cells, num_mixtures, cell_num_ratio, nonlocal_basis_ratio)
        return hidden * (local + basis + 1) * num_mixtures + basis * (num_cells - local)

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = float(value)
        self.temperature_value.fill_(self._temperature)

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
        num_cells = planes - 1

        def claim(j: int, cell: int) -> None:
            if cell >= num_cells:
                raise CellOverflowError(f'the prior needs cell {cell} of a warehouse of {num_cells} cells')
            self.temperature_prior[j * planes + cell] = 1

        if cell_num_ratio >= 1.0:
            step = int(cell_num_ratio)
            for j in range(self.num_mixtures):
                claim(j, start_cell_idx)
                start_cell_idx += step
        else:
            mixtures_per_cell = int(1.0 / cell_num_ratio)
            for j in range(self.num_mixtures):
                if j % mixtures_per_cell == (j // mixtures_per_cell) % mixtures_per_cell:
                    claim(j, start_cell_idx)
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
        if self._temperature != 0 or self.blend_always:  # (1 - t) * x + t * prior
            x = torch.lerp(x.reshape(-1, self.kw_planes), self.temperature_prior.to(x.dtype),
                           self.temperature_value.to(x.dtype))
            x = x.reshape(-1, self.planes_per_mixture)
        return x[:, :-1]
