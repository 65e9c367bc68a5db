"""How a KW convolution is computed: the reference algorithm, a GEMM fast path, and the switch.

Both algorithms compute KW-SPEC section 4 from the mixture weights ``a`` (``[B * m, n]``) and the
warehouse cells ``E`` (``[n, cell_out, cell_in, *cell_kernel]``):

* ``reference``: the original release's algorithm. Every sample's kernel is assembled
  (``a @ E``, then reordered), the batch is folded into the channels and one grouped convolution
  with ``B * groups`` groups applies each sample's kernel. Autograd keeps the kernels for backward.
* ``gemm``: the input is unfolded (im2col; a view for 1x1 convolutions) and multiplied with each
  sample's kernel by batched matrix products, inside an autograd function that keeps only the
  input, ``a`` and ``E`` (or the copy of ``E`` that the layers of a forward pass share, see
  :func:`gemm_conv`). Kernels are assembled in chunks of samples, assembled again in
  backward, and the gradients of ``a`` and ``E`` come from the kernel gradient chunk by chunk, so
  no tensor of all per-sample kernels (``[B, C_out, C_in / g, *k]``) is kept or, for large ones,
  ever exists. It needs every cell inside one convolution group (:func:`supports_gemm`).
* ``input_mix``: the mixture moves to the input side. A cell ``E_n`` is shared by all the cell
  slots of a kernel, so output block ``o`` is ``sum_n E_n @ z[o, n]`` with
  ``z[o, n] = sum_(s, i) a[s, o, i, n] * cols[s, i]``: no kernel is assembled at all. It costs
  ``B * blocks_out * n * cell_in * positions * (slots per block + cell_out)`` multiply-accumulates
  against the kernel assembly's ``B * slots * n * cell size``, so it wins where a layer's output
  is small next to its cells (late stages at low resolution, e.g. ResNet18's last stage at 32 px:
  1 output position, 9 taps per cell). Plain autograd; same cell condition as ``gemm``.

Both fast paths return their output in the input's layout, channels-first or channels-last.

``auto`` (the default) picks one of them per layer and input shape (:func:`choose_implementation`);
the environment variable ``KW_IMPL`` (``auto``, ``reference``, ``gemm`` or ``input_mix``) sets the choice for the
process, and :func:`set_implementation` / :func:`use_implementation` change it from Python.
The ``gemm`` path supports first-order gradients only (``torch.autograd.grad(...,
create_graph=True)`` through it raises); use ``reference`` for higher-order gradients.
"""
import itertools
import math
import os
from contextlib import contextmanager
from typing import Any, Callable, Dict, Hashable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

IMPLEMENTATIONS = ('auto', 'reference', 'gemm', 'input_mix')
FAST_PATHS = ('gemm', 'input_mix')
ENV_VAR = 'KW_IMPL'


class Tuning(NamedTuple):
    """When the ``auto`` choice takes the GEMM path on a device type, and how it chunks.

    Batches below ``min_batch`` samples keep the reference algorithm (its grouped convolution is
    then (nearly) a plain one, and launch overheads dominate). Otherwise a k x k layer takes the
    GEMM path when a sample's kernel has at least ``min_kernel_to_input_ratio`` times as many
    elements as one group of its unfolded input, i.e. ``C_out / groups >= ratio * output
    positions`` (``min_kernel_to_input_ratio_16bit`` when the convolution computes in float16 or
    bfloat16): there the grouped convolution spends its time on the per-sample kernels while the
    unfolded input stays small. 1x1 layers always take it (their unfolded input is the input itself).
    """
    min_kernel_to_input_ratio: float
    min_kernel_to_input_ratio_16bit: float
    min_batch: int
    # largest block of assembled kernels materialised at once. On the CPU, glibc maps buffers above
    # 32 MiB afresh on every call: assembling KW ResNet18's layer4 kernels at batch 16 (151 MB) took
    # 94 ms into a new buffer against 37 ms into a reused one
    kernel_chunk_elements: int
    # ``input_mix`` is taken where its multiply-accumulates are below this share of the kernel
    # assembly's plus the convolution's (its many small products run slower per MAC)
    input_mix_max_cost_ratio: float = 0.5


# Keyed by device type; others use 'default'. Measured with benchmarks/layers.py and
# benchmarks/benchmark.py (docs/performance.md). On CUDA in 16 bits every layer of KW ResNet50 at
# batch 128 ran faster on the GEMM path; in float32 the reference's convolutions use TF32 (cuDNN's
# default) while the GEMM path's products are exact float32, so only kernel-dominated layers gain.
TUNING: Dict[str, Tuning] = {
    # input_mix: measured on KW ResNet18 (benchmarks/layers.py), it won the layers below a ratio of about 2
    # at 224 px (batch 16) and below 1.5 at 32 px (batch 32), where one layer at 1.58 lost
    'cpu': Tuning(min_kernel_to_input_ratio=3.0, min_kernel_to_input_ratio_16bit=3.0, min_batch=4,
                  kernel_chunk_elements=1 << 23, input_mix_max_cost_ratio=2.0),
    'default': Tuning(min_kernel_to_input_ratio=1.0, min_kernel_to_input_ratio_16bit=0.0, min_batch=32,
                      kernel_chunk_elements=1 << 27),
}


def tuning(device_type: str) -> Tuning:
    return TUNING.get(device_type, TUNING['default'])


def _implementation_from_env() -> str:
    value = os.environ.get(ENV_VAR, '').strip().lower() or 'auto'
    if value not in IMPLEMENTATIONS:
        raise ValueError(f'{ENV_VAR}={value!r} is not a KW implementation: set it to one of '
                         f'{", ".join(IMPLEMENTATIONS)} (or unset it for auto).')
    return value


_implementation = _implementation_from_env()


def set_implementation(name: str) -> None:
    """Make every KW convolution of the process use ``name`` (one of :data:`IMPLEMENTATIONS`)."""
    global _implementation
    if name not in IMPLEMENTATIONS:
        raise ValueError(f'unknown KW implementation {name!r}: use one of {", ".join(IMPLEMENTATIONS)}.')
    _implementation = name


def get_implementation() -> str:
    return _implementation


@contextmanager
def use_implementation(name: str) -> Iterator[None]:
    """Context manager: :func:`set_implementation` inside, the previous choice restored after."""
    previous = _implementation
    set_implementation(name)
    try:
        yield
    finally:
        set_implementation(previous)


class KWConvGeometry(NamedTuple):
    """Everything about a KW convolution that does not change from call to call."""
    in_planes: int
    out_planes: int
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]
    groups: int
    cell_shape: Tuple[int, ...]  # [n, cell_out, cell_in, *cell_kernel]
    groups_out: int
    groups_in: int
    groups_spatial: int

    @property
    def num_mixtures(self) -> int:
        return self.groups_out * self.groups_in * self.groups_spatial

    def output_size(self, input_size: Sequence[int]) -> Tuple[int, ...]:
        return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in zip(
            input_size, self.kernel_size, self.stride, self.padding, self.dilation))


def forward_macs(g: KWConvGeometry, batch: int, positions: int) -> Dict[str, int]:
    """Multiply-accumulates of one forward call: kernel assembly plus convolution (``reference``
    and ``gemm``), and ``input_mix``."""
    n, cell_out = g.cell_shape[0], g.cell_shape[1]
    cell_size = math.prod(g.cell_shape[1:])
    assembly = batch * g.num_mixtures * n * cell_size
    conv = batch * g.out_planes * g.in_planes // g.groups * math.prod(g.kernel_size) * positions
    slots_per_block = g.groups_spatial * g.groups_in
    input_mix = batch * g.groups_out * n * (cell_size // cell_out) * positions * (slots_per_block + cell_out)
    return {'kernels': assembly + conv, 'input_mix': input_mix}


def choose_implementation(geometry: KWConvGeometry, x: torch.Tensor) -> str:
    """The algorithm a KW convolution uses for input ``x``.

    A forced ``gemm`` or ``input_mix`` applies to the layers it supports (:func:`supports_gemm`);
    the others, and every layer under ``reference``, use the reference algorithm. ``auto``
    decides per layer: the reference below ``Tuning.min_batch`` samples, else ``input_mix`` where
    its multiply-accumulates are few enough, else ``gemm`` or ``reference`` by the shape rule of
    :class:`Tuning`.
    """
    implementation, shape = _implementation, x.shape
    if implementation == 'reference' or not supports_gemm(geometry):
        return 'reference'
    if implementation in FAST_PATHS:
        return implementation
    settings = tuning(x.device.type)
    if shape[0] < settings.min_batch:
        return 'reference'
    positions = math.prod(geometry.output_size(shape[2:]))
    macs = forward_macs(geometry, shape[0], positions)
    if macs['input_mix'] < settings.input_mix_max_cost_ratio * macs['kernels']:
        return 'input_mix'
    if math.prod(geometry.kernel_size) == 1:
        return 'gemm'
    ratio = geometry.out_planes // geometry.groups / max(positions, 1)
    is_16bit = compute_dtype(x) in (torch.float16, torch.bfloat16)
    min_ratio = settings.min_kernel_to_input_ratio_16bit if is_16bit else settings.min_kernel_to_input_ratio
    return 'gemm' if ratio >= min_ratio else 'reference'


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a convolution of ``x`` in (``x.dtype`` outside autocast)."""
    device_type = x.device.type
    # Dynamo (torch 2.11) cannot trace the availability check; compiled code runs on devices that have it.
    available = torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type)
    if x.dtype != torch.float64 and x.is_floating_point() and available and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


# ``share(key, build)``: ``build()``, or what it returned for the same key earlier in the forward pass
Share = Callable[[Hashable, Callable[[], Any]], Any]


def gemm_conv(x: torch.Tensor, mixture_weights: torch.Tensor, cells: torch.Tensor,
              geometry: KWConvGeometry, share: Optional[Share] = None) -> torch.Tensor:
    """KW convolution without bias by the GEMM path; same result as the reference algorithm.

    The products read the cells reordered (:func:`cell_layout`) and cast to the compute dtype, one
    copy. With ``share`` (``WarehouseManager.per_pass``, from the layer) the layers of a forward
    pass that draw on the same warehouse in the same layout share that copy, which is then kept for
    backward, and their cells' gradients meet in the reordered layout, so that one copy per
    warehouse turns them back. Without it (or under ``torch.compile``) each layer makes its own copy,
    in forward and again in backward, and keeps none.
    """
    dtype, sample_major = compute_dtype(x), _is_sample_major(geometry)
    # a channels-last input reads the cells' taps first; 1x1 cells are the same either way
    taps_first = uses_channels_last(x, geometry) and math.prod(geometry.cell_shape[3:]) > 1

    def shared_copy():
        layout = cell_layout(cells, sample_major, taps_first)
        return layout, _contiguous(layout.detach(), dtype)

    if share is None or _traced():
        layout, copy = cell_layout(cells, sample_major, taps_first), None
    else:
        layout, copy = share(('gemm', dtype, sample_major, taps_first, torch.is_grad_enabled()), shared_copy)
    return _GemmConv.apply(x.to(dtype), mixture_weights.to(dtype), layout, copy, geometry)


def input_mix_conv(x: torch.Tensor, mixture_weights: torch.Tensor, cells: torch.Tensor,
                   g: KWConvGeometry) -> torch.Tensor:
    """KW convolution without bias by mixing the input (see the module docstring); same result as
    the reference algorithm."""
    dtype = compute_dtype(x)
    x, a, cells = x.to(dtype), mixture_weights.to(dtype), cells.to(dtype)
    batch, output_size = x.shape[0], g.output_size(x.shape[2:])
    n, cell_out = cells.shape[0], cells.shape[1]
    cols = unfold(x, g, output_size).view(batch, g.groups, g.groups_spatial, g.groups_in, -1, math.prod(output_size))
    if g.groups_out != g.groups:  # the input group each output block reads
        cols = cols.repeat_interleave(g.groups_out // g.groups, dim=1)
    a = a.reshape(batch, g.groups_spatial, g.groups_out, g.groups_in, n)
    mixed = torch.einsum('bsoin,bosirl->bonrl', a, cols)  # [B, blocks_out, n, cell_in * ck, L]
    out = torch.einsum('ncr,bonrl->bocl', cells.reshape(n, cell_out, -1), mixed)
    # The product comes out stored (c, b, o, l), a layout neither channels-first nor channels-last
    # (whose batch norm torch.compile traced with other strides than it ran): copied to the input's.
    out = out.reshape(batch, g.out_planes, *output_size)
    if stored_channels_last(x):
        return out.movedim(1, -1).contiguous().movedim(-1, 1)
    return out.contiguous()


def supports_gemm(g: KWConvGeometry) -> bool:
    """The GEMM path needs every cell inside one convolution group (false e.g. for depthwise layers,
    whose cells span several single-channel groups)."""
    return (g.out_planes // g.groups) % g.cell_shape[1] == 0


def _taps(g: KWConvGeometry) -> List[Tuple[int, ...]]:
    return list(itertools.product(*(range(k) for k in g.kernel_size)))


def _tap_dim(g: KWConvGeometry) -> int:
    """Where the kernel taps go in ``[B, groups, C_in / groups, *S]``: before the channels when
    every tap is a cell of its own (1x1 cells), after them when the taps are inside the cells."""
    return 2 if g.groups_spatial > 1 else 3


def _window(tap: Sequence[int], g: KWConvGeometry, output_size: Sequence[int]) -> Tuple[slice, ...]:
    """Slices of the padded input that kernel tap ``tap`` reads for every output position."""
    return tuple(slice(t * d, t * d + s * (out - 1) + 1, s)
                 for t, d, s, out in zip(tap, g.dilation, g.stride, output_size))


def _is_plain_view(g: KWConvGeometry) -> bool:
    """1x1 kernel, no padding, stride 1: the unfolded input is the input itself."""
    return math.prod(g.kernel_size) == 1 and not any(g.padding) and all(s == 1 for s in g.stride)


def unfold(x: torch.Tensor, g: KWConvGeometry, output_size: Sequence[int], tap_dim: int = 0) -> torch.Tensor:
    """im2col: ``[B, C_in, *S]`` -> ``[B, groups, K, prod(output_size)]``, ``K = C_in / groups * prod(k)``.

    By default rows are ordered (spatial block, input channel, cell tap) like the kernel blocks of
    :class:`_GemmConv`: tap-major for 1x1 cells, channel-major for whole-kernel cells;
    ``tap_dim=3`` makes them channel-major always, like the columns of a ``[C_out, C_in / groups, *k]``
    kernel. Its operations leave the batch size free (for export with a dynamic batch).
    """
    if any(g.padding):
        x = F.pad(x, [p for pad in reversed(g.padding) for p in (pad, pad)])
    x = x.unflatten(1, (g.groups, -1))
    patches = [x[(Ellipsis,) + _window(tap, g, output_size)] for tap in _taps(g)]
    tap_dim = tap_dim or _tap_dim(g)
    cols = patches[0].unsqueeze(tap_dim) if len(patches) == 1 else torch.stack(patches, dim=tap_dim)
    return cols.flatten(2, 3).flatten(3)


def uses_channels_last(x: torch.Tensor, g: KWConvGeometry) -> bool:
    """Whether the GEMM path keeps ``x``'s channels-last layout: ``x`` is stored channels-last (e.g.
    ``torch.channels_last``, or a KW linear layer's tokens) and every cell covers one kernel tap or
    the whole kernel (true for all released models)."""
    return stored_channels_last(x) and (g.groups_spatial == 1 or math.prod(g.cell_shape[3:]) == 1)


def stored_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` ``[B, C, *S]`` is stored with its channels last, in any number of dimensions."""
    return x.dim() > 2 and x.movedim(1, -1).is_contiguous()


def unfold_channels_last(x: torch.Tensor, g: KWConvGeometry, output_size: Sequence[int]) -> torch.Tensor:
    """im2col of a channels-last ``x``: ``[B, C_in, *S]`` -> ``[B, prod(output_size), groups, K]``.

    Rows run over (spatial block, input block, cell tap, cell_in), the kernel rows of :class:`_GemmConv`
    with channels last: one contiguous run of channels per tap (for :func:`uses_channels_last`
    geometries, where either the spatial blocks or the cell taps are single). The windows are strided
    views (``Tensor.unfold``), so the one copy is the final reshape.
    """
    d, batch = len(g.kernel_size), x.shape[0]
    x = x.movedim(1, -1)  # [B, *S, C_in], contiguous
    if any(g.padding):
        x = F.pad(x, [0, 0] + [p for pad in reversed(g.padding) for p in (pad, pad)])
    if math.prod(g.kernel_size) == 1:  # a (strided) view of the input, rows (i, cell_in) already
        x = x[(slice(None),) + tuple(slice(None, None, s) for s in g.stride)]
        return x.reshape(batch, math.prod(output_size), g.groups, -1)
    for dim, (k, s, dilation) in enumerate(zip(g.kernel_size, g.stride, g.dilation), start=1):
        x = x.unfold(dim, dilation * (k - 1) + 1, s)  # [B, *O, C_in, *window]
    if any(dilation > 1 for dilation in g.dilation):
        x = x[(Ellipsis,) + tuple(slice(None, None, dilation) for dilation in g.dilation)]
    x = x.unflatten(1 + d, (g.groups, g.groups_in, g.cell_shape[2]))  # [B, *O, groups, i, cell_in, *k]
    group, block, channel, taps = 1 + d, 2 + d, 3 + d, tuple(range(4 + d, 4 + 2 * d))
    rows = (group,) + taps + (block, channel) if g.groups_spatial > 1 else (group, block) + taps + (channel,)
    return x.permute(tuple(range(1 + d)) + rows).reshape(batch, math.prod(output_size), g.groups, -1)


def _tap_slices(tap: Sequence[int], g: KWConvGeometry, input_size: Sequence[int],
                output_size: Sequence[int]):
    """For kernel tap ``tap``: slices of the output positions whose input position lies inside the
    unpadded input, and slices of those input positions (``None`` if the tap only reads padding)."""
    outputs, inputs = [], []
    for t, d, s, p, size, out in zip(tap, g.dilation, g.stride, g.padding, input_size, output_size):
        offset = t * d - p  # output position j reads input position j * s + offset
        first, last = max(0, -(offset // s)), min(out - 1, (size - 1 - offset) // s)
        if last < first:
            return None
        outputs.append(slice(first, last + 1))
        inputs.append(slice(first * s + offset, last * s + offset + 1, s))
    return tuple(outputs), tuple(inputs)


def _fold(grad_cols: torch.Tensor, g: KWConvGeometry, input_size: Sequence[int], output_size: Sequence[int],
          channels_last: bool) -> torch.Tensor:
    """The adjoint of the GEMM path's unfolding: sums every tap's gradient back onto the input.

    ``grad_cols`` is ``[B, groups, spatial blocks, input blocks, cell_in, cell taps, *output_size]``
    (:func:`unfold`), or with ``channels_last`` ``[B, *output_size, groups, spatial blocks, input
    blocks, cell taps, cell_in]`` (:func:`unfold_channels_last`), with any strides. Returns the input's
    gradient ``[B, C_in, *input_size]``, channels-last strided in the second case.
    """
    batch = grad_cols.shape[0]
    if _is_plain_view(g):
        if channels_last:
            return grad_cols.reshape(batch, *input_size, g.in_planes).movedim(-1, 1)
        return grad_cols.reshape(batch, g.in_planes, *input_size)
    # One strided addition per tap, clipped to the unpadded input: F.fold (col2im, one kernel) needs a
    # second, channel-major copy of the unfolded gradient, which took more memory and time on an H200
    # (docs/performance.md).
    if channels_last:
        grad_x = grad_cols.new_zeros(batch, *input_size, g.groups, g.groups_in, g.cell_shape[2])
    else:
        grad_x = grad_cols.new_zeros(batch, g.groups, g.groups_in, g.cell_shape[2], *input_size)
    for index, tap in enumerate(_taps(g)):
        slices = _tap_slices(tap, g, input_size, output_size)
        if slices is None:
            continue
        if channels_last:  # the tap is the spatial block (1x1 cells) or the cell tap (whole-kernel cells)
            tap_grad = grad_cols[..., index, :, 0, :] if g.groups_spatial > 1 else grad_cols[..., 0, :, index, :]
            grad_x[(slice(None),) + slices[1]].add_(tap_grad[(slice(None),) + slices[0]])
        else:
            tap_grad = grad_cols[:, :, index, :, :, 0] if g.groups_spatial > 1 else grad_cols[:, :, 0, :, :, index]
            grad_x[(Ellipsis,) + slices[1]].add_(tap_grad[(Ellipsis,) + slices[0]])
    if channels_last:
        return grad_x.view(batch, *input_size, g.in_planes).movedim(-1, 1)
    return grad_x.view(batch, g.in_planes, *input_size)


def _samples_per_chunk(g: KWConvGeometry, batch: int, device_type: str) -> int:
    """How many samples' kernels are assembled at once: as few equal chunks as keep each one's
    kernels within ``Tuning.kernel_chunk_elements`` elements (one sample at least)."""
    per_sample = g.out_planes * g.in_planes // g.groups * math.prod(g.kernel_size)
    chunks = math.ceil(batch / max(1, tuning(device_type).kernel_chunk_elements // per_sample))
    return math.ceil(batch / chunks)


def _is_sample_major(g: KWConvGeometry) -> bool:
    """Whether the kernels are assembled in the reference's own layout: one cell slot per output
    block (no spatial or input blocks), so that mixture rows (b, o) and cells ``[n, cell_out, K]``
    give ``[B, C_out, K]`` directly, and all of a group's output blocks are one product."""
    return g.groups_spatial == 1 and g.groups_in == 1


def _rows_by_block(a: torch.Tensor, g: KWConvGeometry, batch: int) -> torch.Tensor:
    """Mixture weights ``[B * m, n]`` with rows (b, s, o, i) reordered to (o, b, s, i)."""
    a = a.reshape(batch, g.groups_spatial, g.groups_out, g.groups_in, -1)
    return a.permute(2, 0, 1, 3, 4).reshape(-1, a.shape[-1])


def _rows_by_sample(rows: torch.Tensor, g: KWConvGeometry, batch: int) -> torch.Tensor:
    """The inverse of :func:`_rows_by_block`."""
    rows = rows.reshape(g.groups_out, batch, g.groups_spatial, g.groups_in, -1)
    return rows.permute(1, 2, 0, 3, 4).reshape(-1, rows.shape[-1])


def cell_layout(cells: torch.Tensor, sample_major: bool, taps_first: bool) -> torch.Tensor:
    """A view of the cells ``[n, cell_out, cell_in, *ck]`` whose contiguous copy, ``[n, -1]``, is the
    right factor of the kernel assembly: ``[n, cell_out, K]`` (sample-major) or ``[n, K, cell_out]``
    (block-major), the cell's rows ``K`` ordered (cell_in, cell tap), or (cell tap, cell_in) with
    ``taps_first``."""
    n, cell_out, cell_in = cells.shape[:3]
    cells = cells.reshape(n, cell_out, cell_in, -1)
    if taps_first:
        cells = cells.transpose(2, 3)
    return cells if sample_major else cells.permute(0, 2, 3, 1)


def _contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a contiguous ``[t.shape[0], -1]`` matrix of ``dtype``: a view if ``t`` is one, else
    one copy (cast and layout together)."""
    if t.dtype != dtype or not t.is_contiguous():
        t = t.to(dtype, memory_format=torch.contiguous_format, copy=True)
    return t.view(t.shape[0], -1)


def _bmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = False) -> None:
    """``out[:] = a @ b`` (or ``+=`` with ``accumulate``), batched, written in place: the BLAS call
    takes ``out``'s strides as they are. A column-major ``out`` gets the transposed product in its
    transposed view: writing columns, the CPU's bfloat16 products had slowed KW ResNet50's training
    to 0.1 img/s (4.6 writing rows). Eager code only (see :class:`_GemmConv`)."""
    if out.stride(-1) != 1:
        out, a, b = out.mT, b.mT, a.mT
    if accumulate:
        out.baddbmm_(a, b)
    else:
        torch.bmm(a, b, out=out)


class _GemmConv(torch.autograd.Function):
    """KW convolution by im2col and batched matrix products; keeps only ``x``, ``a`` and the cells (or
    the copy of them that the layers of a forward pass share).

    One matrix product of mixture rows and cells (:func:`cell_layout`) assembles the kernels of a
    chunk of samples (:func:`_samples_per_chunk`), laid out so that each output block's kernels are a
    ``[B, cell_out, K]`` stack of matrices whose ``K`` columns run like the rows of the unfolded input
    (:func:`unfold`: spatial block, input block, cell rows). Nothing is reordered: an output block is
    one batched product over all its taps and input blocks, and ``a`` and the cells get their
    gradients from the kernel gradient by one matrix product each. Two layouts:

    * sample-major (:func:`_is_sample_major`, e.g. 1x1 layers with whole input channels per cell):
      rows (b, o), kernels ``[B, C_out, K]`` as in the reference; a group's blocks are one product.
    * block-major (cells covering kernel taps or input blocks): rows reordered to (o, b, s, i) and
      cells transposed, so that every block's kernels come out as one contiguous ``[B, K, cell_out]``
      stack; one product per output block.

    The kernels are assembled again in backward instead of being kept. The cells come as a view in
    that layout and in their own dtype (the warehouse's), their gradient goes back the same way, and
    the products read them copied contiguous in the input's dtype: a copy made here, in forward and
    again in backward (none is kept), unless a shared one is given (see :func:`gemm_conv`), which is
    kept for backward.

    A channels-last input (:func:`uses_channels_last`) stays channels-last: it is unfolded to
    ``[B, L, groups, K]`` (:func:`unfold_channels_last`, cell rows (ck, cell_in)), the output and the
    input's gradient are channels-last, and every product reads and writes rows of contiguous
    channels. The products are written the same way for both layouts, on ``[B, K, L]`` and
    ``[B, C_out, L]`` views; the BLAS call takes the transposed views as they are.

    Under ``torch.compile`` the products are grouped instead (see ``_grouped_forward``): one per
    chunk and convolution group, on kernels copied to ``[B, groups, C_out / groups, K]``, and nothing
    is written into views.
    """

    @staticmethod
    def _setup(x: torch.Tensor, g: KWConvGeometry, channels_last: bool):
        output_size = g.output_size(x.shape[2:])
        if channels_last:
            cols = unfold_channels_last(x, g, output_size).permute(0, 2, 3, 1)  # [B, groups, K, L] view
        else:
            cols = unfold(x, g, output_size)  # [B, groups, K, L]
        return output_size, cols, _is_sample_major(g)

    @staticmethod
    def _chunks(a: torch.Tensor, g: KWConvGeometry, batch: int, device_type: str, sample_major: bool):
        """``(samples, mixture rows)`` per chunk: a slice of the batch and its rows of ``a`` in
        the layout's order."""
        size, m = _samples_per_chunk(g, batch, device_type), g.num_mixtures
        for start in range(0, batch, size):
            samples = slice(start, min(start + size, batch))
            rows = a[samples.start * m:samples.stop * m]
            yield samples, rows if sample_major else _rows_by_block(rows, g, samples.stop - start)

    @staticmethod
    def _kernels(matrix: torch.Tensor, g: KWConvGeometry, sample_major: bool) -> torch.Tensor:
        """Assembled kernels (or their gradient) ``[rows, cell size]`` viewed as ``[B, go, cell_out, K]``."""
        cell_out = g.cell_shape[1]
        if sample_major:
            return matrix.view(-1, g.groups_out, cell_out, matrix.shape[1] // cell_out)
        block_rows = matrix.shape[1] // cell_out * g.groups_spatial * g.groups_in  # K
        return matrix.view(g.groups_out, -1, block_rows, cell_out).permute(1, 0, 3, 2)

    @staticmethod
    def _spans(g: KWConvGeometry, sample_major: bool) -> List[Tuple[int, int, int]]:
        """``(first, end, group)``: output blocks multiplied at once, inside one convolution group."""
        per_group = g.groups_out // g.groups
        step = per_group if sample_major else 1
        return [(o, o + step, o // per_group) for o in range(0, g.groups_out, step)]

    @staticmethod
    def _grouped(matrix: torch.Tensor, g: KWConvGeometry, sample_major: bool) -> torch.Tensor:
        """Assembled kernels ``[rows, cell size]`` as ``[B, groups, C_out / groups, K]``: a copy where a group
        holds several output blocks of a block-major layer, else a view."""
        kernels = _GemmConv._kernels(matrix, g, sample_major)
        return kernels.reshape(kernels.shape[0], g.groups, -1, kernels.shape[-1])

    # Two ways to run the products of a chunk of samples. Eager code writes each span of output blocks in
    # place, into strided views of one buffer, by one batched product (no kernel is reordered). Under
    # torch.compile the output and each gradient are one product over all groups, and nothing is written
    # into views: inductor lowers a chain of in-place writes into views of one buffer in time exponential
    # in its length (compiling KW ResNet50, whose 1x1 layers have up to 8 output blocks, took twice as long).

    @staticmethod
    def _blockwise_forward(kernel_matrix, cols, out, g, sample_major) -> None:
        kernels, cell_out = _GemmConv._kernels(kernel_matrix, g, sample_major), g.cell_shape[1]
        for first, end, group in _GemmConv._spans(g, sample_major):
            _bmm_into(out[:, first * cell_out:end * cell_out], kernels[:, first:end].flatten(1, 2), cols[:, group])

    @staticmethod
    def _grouped_forward(kernel_matrix, cols, g, sample_major, channels_last) -> torch.Tensor:
        """The chunk's output in its storage order: ``[b, L, C_out]`` if ``channels_last``, else ``[b, C_out, L]``."""
        kernels = _GemmConv._grouped(kernel_matrix, g, sample_major)  # [b, groups, C_out / groups, K]
        if channels_last:
            return torch.matmul(cols.mT, kernels.mT).transpose(1, 2).flatten(2)
        return torch.matmul(kernels, cols).flatten(1, 2)

    @staticmethod
    def _blockwise_backward(rows, grad_out, cols, grad_cols, cell_matrix, g, sample_major, need_kernels):
        """Writes the chunk's ``grad_cols`` (unless ``None``) and returns its kernel gradient."""
        kernels = _GemmConv._kernels(torch.mm(rows, cell_matrix), g, sample_major) if grad_cols is not None else None
        grad_kernels = rows.new_empty(rows.shape[0], cell_matrix.shape[1]) if need_kernels else None
        grad_kernel_view = _GemmConv._kernels(grad_kernels, g, sample_major) if need_kernels else None
        cell_out, per_group = g.cell_shape[1], g.groups_out // g.groups
        for first, end, group in _GemmConv._spans(g, sample_major):
            grad_block = grad_out[:, first * cell_out:end * cell_out]
            if grad_cols is not None:
                _bmm_into(grad_cols[:, group], kernels[:, first:end].flatten(1, 2).mT, grad_block,
                          accumulate=first != group * per_group)  # after the group's first contribution
            if need_kernels:
                _bmm_into(grad_kernel_view[:, first:end].flatten(1, 2), grad_block, cols[:, group].mT)
        return grad_kernels

    @staticmethod
    def _grouped_backward(rows, grad_out, cols, cell_matrix, g, sample_major, channels_last, need_x, need_kernels):
        """The chunk's ``grad_cols`` and kernel gradient (``None`` where not needed), each product written
        in the layout its consumer reads, as in eager code."""
        grad_out = grad_out.unflatten(1, (g.groups, -1))  # [b, groups, C_out / groups, L]
        grad_cols = grad_kernels = None
        if need_x:
            kernels = _GemmConv._grouped(torch.mm(rows, cell_matrix), g, sample_major)
            if channels_last:  # stored [b, groups, L, K], as the unfolded input
                grad_cols = torch.matmul(grad_out.mT, kernels).mT
            else:
                grad_cols = torch.matmul(kernels.mT, grad_out)
        if need_kernels:
            if sample_major:  # [b, groups, C_out / groups, K]: rows (b, o)
                grad_kernels = torch.matmul(grad_out, cols.mT)
            else:  # [b, groups, K, C_out / groups] to rows (o, b, s, i) of [K, cell_out] blocks
                grad_kernels = torch.matmul(cols, grad_out.mT).unflatten(-1, (-1, g.cell_shape[1]))
                grad_kernels = grad_kernels.permute(1, 3, 0, 2, 4)
            grad_kernels = grad_kernels.reshape(-1, cell_matrix.shape[1])
        return grad_cols, grad_kernels

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, layout: torch.Tensor, copy: Optional[torch.Tensor],
                g: KWConvGeometry) -> torch.Tensor:
        channels_last = uses_channels_last(x, g)
        output_size, cols, sample_major = _GemmConv._setup(x, g, channels_last)
        cell_matrix = _contiguous(layout, x.dtype) if copy is None else copy
        batch, positions = x.shape[0], cols.shape[-1]
        chunks = _GemmConv._chunks(a, g, batch, x.device.type, sample_major)
        if _traced():
            out = _concatenated([_GemmConv._grouped_forward(torch.mm(rows, cell_matrix), cols[samples], g,
                                                            sample_major, channels_last) for samples, rows in chunks])
            out = out.mT if channels_last else out  # [B, C_out, L]
        else:
            if channels_last:  # [B, C_out, L] views
                out = x.new_empty(batch, positions, g.out_planes).transpose(1, 2)
            else:
                out = x.new_empty(batch, g.out_planes, positions)
            for samples, rows in chunks:
                _GemmConv._blockwise_forward(torch.mm(rows, cell_matrix), cols[samples], out[samples], g, sample_major)
        ctx.save_for_backward(x, a, layout if copy is None else copy)
        ctx.geometry, ctx.channels_last, ctx.layout = g, channels_last, (layout.shape, layout.dtype, copy is None)
        return out.view(batch, g.out_planes, *output_size)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, a, saved_cells = ctx.saved_tensors  # the layout (a view of the cells) or the shared copy
        g, channels_last, (layout_shape, layout_dtype, copied_here) = ctx.geometry, ctx.channels_last, ctx.layout
        need_x, need_a, need_cells = ctx.needs_input_grad[:3]
        output_size, cols, sample_major = _GemmConv._setup(x, g, channels_last)
        cell_matrix = _contiguous(saved_cells, x.dtype) if copied_here else saved_cells
        batch, positions, compiling = x.shape[0], cols.shape[-1], _traced()
        if channels_last:  # [B, C_out, L] views
            grad_out = grad_out.movedim(1, -1).reshape(batch, positions, g.out_planes).transpose(1, 2)
        else:
            grad_out = grad_out.reshape(batch, g.out_planes, positions)
        grad_cols = None  # [B, groups, K, L]
        if need_x and not compiling:
            if channels_last:
                grad_cols = cols.new_empty(batch, positions, g.groups, cols.shape[2]).permute(0, 2, 3, 1)
            else:
                grad_cols = torch.empty_like(cols, memory_format=torch.contiguous_format)
        grad_col_chunks, grad_row_chunks, grad_cell_matrix = [], [], None
        for samples, rows in _GemmConv._chunks(a, g, batch, x.device.type, sample_major):
            if compiling:
                grad_col_chunk, grad_kernels = _GemmConv._grouped_backward(
                    rows, grad_out[samples], cols[samples], cell_matrix, g, sample_major, channels_last, need_x,
                    need_a or need_cells)
                grad_col_chunks.append(grad_col_chunk)
            else:
                grad_kernels = _GemmConv._blockwise_backward(
                    rows, grad_out[samples], cols[samples], None if grad_cols is None else grad_cols[samples],
                    cell_matrix, g, sample_major, need_a or need_cells)
            if need_a:
                grad_rows = torch.mm(grad_kernels, cell_matrix.t())
                grad_row_chunks.append(grad_rows if sample_major else
                                       _rows_by_sample(grad_rows, g, samples.stop - samples.start))
            if need_cells:
                grad_cell_matrix = (torch.mm(rows.t(), grad_kernels) if grad_cell_matrix is None
                                    else grad_cell_matrix.addmm_(rows.t(), grad_kernels))
        grad_x = None
        if need_x:
            grad_cols = _concatenated(grad_col_chunks) if compiling else grad_cols
            if channels_last:  # [B, *O, groups, s, i, ck, cell_in]
                grad_cols = grad_cols.permute(0, 3, 1, 2).reshape(
                    batch, *output_size, g.groups, g.groups_spatial, g.groups_in, -1, g.cell_shape[2])
            else:  # [B, groups, s, i, cell_in, ck, *O]
                grad_cols = grad_cols.view(batch, g.groups, g.groups_spatial, g.groups_in, g.cell_shape[2], -1,
                                           *output_size)
            grad_x = _fold(grad_cols, g, x.shape[2:], output_size, channels_last)
        grad_a = _concatenated(grad_row_chunks) if need_a else None
        grad_layout = grad_cell_matrix.to(layout_dtype).view(layout_shape) if need_cells else None
        return grad_x, grad_a, grad_layout, None, None


def _traced() -> bool:
    """Whether torch.compile is tracing the call, so that :class:`_GemmConv` runs its grouped products (a
    function of its own, for the tests to run those eagerly)."""
    return torch.compiler.is_compiling()


def _concatenated(chunks: List[torch.Tensor]) -> torch.Tensor:
    """The chunks concatenated along dimension 0 (the one itself, uncopied)."""
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
