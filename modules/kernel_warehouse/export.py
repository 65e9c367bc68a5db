"""A batch-independent KW convolution, for exporting models with a dynamic batch dimension.

The original algorithm folds the batch into the channels of one grouped convolution with
``groups * batch`` groups: an exported graph (ONNX, ``torch.export``) freezes that group count, and
so the batch size, to the example's. Inside :func:`batch_independent` the KW layers of a model
compute the same convolution from operations whose shapes leave the batch free: the per-sample
kernels are assembled as usual, the input is unfolded (zero padding, then one strided slice per
kernel tap) and every sample is multiplied with its own kernel in one batched matrix product.

The unfolded input is ``prod(kernel_size)`` times the input, so this path is for export and
checking only; training and evaluation use the layers' own forward.
"""
import types
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from . import functional
from .conv import KWConvNd


def batch_independent_forward(layer: KWConvNd, x: torch.Tensor) -> torch.Tensor:
    """What ``layer(x)`` computes, with no shape or attribute that depends on the batch size."""
    mixture_weights = layer.attention(x).to(x.dtype)
    kernels = layer.assemble_kernels(mixture_weights, x.shape[0])  # [B * C_out, C_in / groups, *k]
    output_size = layer.geometry.output_size(x.shape[2:])
    cols = functional.unfold(x, layer.geometry, output_size, tap_dim=3)  # channel-major, like the kernels
    kernels = kernels.reshape(-1, layer.groups, layer.out_planes // layer.groups, cols.shape[2])
    out = torch.matmul(kernels, cols).reshape(-1, layer.out_planes, *output_size)
    if layer.bias is not None:
        out = out + layer.bias.to(out.dtype).reshape(1, -1, *([1] * layer.dimension))
    return out


@contextmanager
def batch_independent(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every KW layer of ``model`` runs :func:`batch_independent_forward`
    (e.g. for ``torch.onnx.export`` with a dynamic batch); their own forward is restored after."""
    layers = [m for m in model.modules() if isinstance(m, KWConvNd)]
    for layer in layers:
        layer.forward = types.MethodType(batch_independent_forward, layer)  # this instance only
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward
