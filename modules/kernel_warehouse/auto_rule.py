"""The automatic naming rule of :func:`~.converter.convert`: warehouses from a model's stages.

The released KW models share one warehouse per stage among layers of one kind (a stage's dense
convs, its depthwise convs), and hand the layers that read the previous stage's output over to
that stage's warehouse (KW-SPEC section 5). :class:`StageRule` does the same for any model that
reports its stages in timm's ``feature_info``, from one traced forward pass, and splits a
warehouse where sharing would make its attentions outgrow its cells.
"""
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .attention import Attention
from .manager import WarehouseManager, cell_shape, num_cells, num_mixtures

Layers = Sequence[Tuple[str, nn.Module]]
# A layer's kernel as the manager records it: [out, in / groups, *kernel]
Shape = List[int]

_DIMENSIONS = {nn.Conv1d: 'conv1d', nn.Conv2d: 'conv', nn.Conv3d: 'conv3d'}
DEFAULT_INPUT_SIZE = 224


def _kernel_shape(layer: nn.Module) -> Shape:
    if isinstance(layer, nn.Linear):
        return [layer.out_features, layer.in_features, 1]
    return [layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size]


def _kind(layer: nn.Module, spatial_partition: bool) -> str:
    """``conv``, ``dwconv`` (depthwise), ``gconv`` (grouped), ``conv1d``..., ``linear``; with spatial
    partition off, the kernel too (``conv3x3``), as only equal kernels can share cells then."""
    if isinstance(layer, nn.Linear):
        return 'linear'
    kind = next(name for base, name in _DIMENSIONS.items() if isinstance(layer, base))
    if layer.groups > 1:
        kind = ('dw' if layer.groups == layer.in_channels else 'g') + kind
    return kind if spatial_partition else kind + 'x'.join(map(str, layer.kernel_size))


def _channels_and_extent(shape: Sequence[int], channels_last: bool) -> Tuple[int, ...]:
    """``(channels, *spatial extent)`` of a tensor shape (batch dimension first)."""
    return (shape[-1], *shape[1:-1]) if channels_last else tuple(shape[1:])


def feature_modules(model: nn.Module) -> List[str]:
    """The module paths of the stages that ``model.feature_info`` reports, in order."""
    info = getattr(model, 'feature_info', None)
    if info is not None and hasattr(info, 'get_dicts'):  # timm's FeatureInfo of features_only models
        info = info.get_dicts()
    if not info or not all(isinstance(entry, Mapping) and 'module' in entry for entry in info):
        raise ValueError(f'convert() without a rule reads the stages of the model from timm\'s feature_info, which '
                         f'{type(model).__name__} does not have; give a naming rule (see RegexRule and Stages).')
    names = [entry['module'] for entry in info]
    known = dict(model.named_modules())
    missing = [name for name in names if name not in known]
    if missing:
        raise ValueError(f'feature_info names the module(s) {missing}, which {type(model).__name__} does not have; '
                         f'give a naming rule (see RegexRule and Stages).')
    return names


def _shape(output: Any) -> Optional[Tuple[int, ...]]:
    return tuple(output.shape) if isinstance(output, torch.Tensor) else None


class _Trace:
    """What one forward pass shows: when (a running count of hook calls) and with what input shape
    each layer runs first, and when each stage produces its output, with what shape."""

    def __init__(self, model: nn.Module, layers: Layers, stages: Sequence[str], input_size: Sequence[int]):
        self.inputs: Dict[str, Tuple[int, Tuple[int, ...]]] = {}
        self.outputs: Dict[int, Tuple[int, Optional[Tuple[int, ...]]]] = {}
        self._calls = 0
        hooks = []
        try:
            for index, name in enumerate(stages):
                hooks.append(model.get_submodule(name).register_forward_hook(self._output_hook(index)))
            for path, layer in layers:
                hooks.append(layer.register_forward_pre_hook(self._input_hook(path)))
            self._run(model, input_size)
        finally:
            for hook in hooks:
                hook.remove()

    def _output_hook(self, index: int) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:  # returns None: the output stays as it is
            self._calls += 1
            self.outputs.setdefault(index, (self._calls, _shape(output)))
        return hook

    def _input_hook(self, path: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            self._calls += 1
            self.inputs.setdefault(path, (self._calls, tuple(args[0].shape)))
        return hook

    def stage(self, path: str) -> int:
        """The stage a layer runs in: the number of stage outputs made before it (the last stage
        for layers after it)."""
        start = self.inputs[path][0]
        return min(sum(call < start for call, _ in self.outputs.values()), max(len(self.outputs) - 1, 0))

    @staticmethod
    def _run(model: nn.Module, input_size: Sequence[int]) -> None:
        """One forward pass of a zero image in eval mode (no statistics updated, no gradients);
        every module's own mode is restored afterwards."""
        parameter = next(model.parameters())
        modes = {module: module.training for module in model.modules()}
        model.eval()
        try:
            with torch.no_grad():
                model(torch.zeros(1, *input_size, device=parameter.device, dtype=parameter.dtype))
        finally:
            for module, training in modes.items():
                module.training = training


class StageRule:
    """Names warehouses from the stages of a model, for :func:`~.converter.convert` without a rule.

    One traced forward pass of a zero image (eval mode, no gradients, the model left as it was)
    decides, layer by layer, in module order:

    - **stage**: the stages are the modules of ``model.feature_info`` (timm's stage outputs); a
      layer belongs to the stage during which it runs (after the previous stage's output, up to
      its own), layers that run after the last stage (a final 1x1 conv) to the last stage.
    - **hand-over**: a layer whose input has the previous stage's output shape (channels and
      resolution) draws on the previous stage's warehouse, as the first conv and the shortcut
      conv of a KW ResNet stage do.
    - **kind**: dense, depthwise and grouped convs (and linear layers) of a stage have their own
      warehouses, as in the released KW MobileNetV2 and ConvNeXt: cells are the channel gcd of
      a warehouse's layers, which a depthwise conv would bring down to 1.
    - **kept plain**: layers that see a globally pooled input (squeeze-and-excitation gates,
      pooled heads) and layers the forward pass does not run.
    - **split**: a layer starts a new warehouse of its stage and kind when sharing the current
      one would add more weights to the attentions' output layers (``hidden x mixtures x
      (cells + 1)`` per layer) than ``attention_budget`` times the warehouse's cells, compared
      with each layer alone in a warehouse of its own. This happens where a stage mixes widths
      with a small common divisor (EfficientNet's 40/80/112 channels with 6x expansion): such a
      warehouse would need tiny cells, many mixtures per layer and attentions far larger than
      the model itself. It is decided at 1x (whole-gcd cells, one cell per mixture), so that
      other cell settings resize the same warehouses.

    Warehouses are named ``stage{i}_{kind}`` (``stage2_conv``, ``stage2_dwconv``), and
    ``stage{i}_{kind}_part{j}`` when split; ``sharing_range='part'`` joins the parts again.

    Args:
        attention_budget: see *split* above (default 1; ``float('inf')`` never splits).
        input_size: ``(channels, height, width)`` of the traced input (default: the model's
            ``pretrained_cfg['input_size']`` with the stem's input channels, else 224x224).
    """

    def __init__(self, attention_budget: float = 1.0, input_size: Optional[Sequence[int]] = None):
        if not attention_budget > 0:
            raise ValueError(f'attention_budget must be > 0, got {attention_budget!r}.')
        self.attention_budget = attention_budget
        self.input_size = tuple(input_size) if input_size is not None else None

    def __repr__(self) -> str:
        return f'StageRule(attention_budget={self.attention_budget}, input_size={self.input_size})'

    def _input_size(self, model: nn.Module) -> Tuple[int, ...]:
        if self.input_size is not None:
            return self.input_size
        size = tuple((getattr(model, 'pretrained_cfg', None) or {}).get('input_size') or ())[1:]
        stem = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
        if stem is None:
            raise ValueError(f'{type(model).__name__} has no convolution to tell the size of its input: give '
                             f'StageRule(input_size=(channels, height, width)).')
        return (stem.in_channels, *(size or (DEFAULT_INPUT_SIZE,) * (stem.weight.dim() - 2)))

    def name_layers(self, model: nn.Module, layers: Layers,
                    settings: Mapping[str, Any]) -> Tuple[Dict[str, str], Dict[str, str]]:
        """Warehouse names of the candidate ``layers`` (in module order) and, for those kept plain,
        why. ``settings`` are the manager's arguments, which size the warehouses."""
        settings = _scalar_settings(settings)
        stages = feature_modules(model)
        trace = _Trace(model, layers, stages, self._input_size(model))
        groups: Dict[Tuple[int, str], List[List[Tuple[str, Shape, int]]]] = {}
        plain = {}
        for path, layer in layers:
            if path not in trace.inputs:
                plain[path] = 'not run by the forward pass'
                continue
            linear = isinstance(layer, nn.Linear)
            channels, *extent = _channels_and_extent(trace.inputs[path][1], channels_last=linear)
            if math.prod(extent) <= 1:
                plain[path] = 'sees a pooled 1x1 input'
                continue
            stage = trace.stage(path)
            previous = trace.outputs.get(stage - 1, (0, None))[1]
            if stage > 0 and previous is not None and (channels, *extent) == tuple(previous[1:]):
                stage -= 1
            parts = groups.setdefault((stage, _kind(layer, settings['spatial_partition'])), [[]])
            member = (path, _kernel_shape(layer), channels)
            if parts[-1] and not self._fits([*parts[-1], member], settings['reduction']):
                parts.append([])
            parts[-1].append(member)
        names = {}
        for (stage, kind), parts in groups.items():
            for index, part in enumerate(parts):
                for path, _, _ in part:
                    names[path] = f'stage{stage}_{kind}' + (f'_part{index}' if len(parts) > 1 else '')
        return {path: names[path] for path, _ in layers if path in names}, plain

    def _fits(self, members: Sequence[Tuple[str, Shape, int]], reduction: float) -> bool:
        """Whether layers ``members`` can share a warehouse within the attention budget."""
        cell, cells, attention = _attention_weights([(shape, in_planes) for _, shape, in_planes in members], reduction)
        alone = sum(_attention_weights([(shape, in_planes)], reduction)[2] for _, shape, in_planes in members)
        return attention - alone <= self.attention_budget * cells * math.prod(cell)


def _attention_weights(layers: Sequence[Tuple[Shape, int]], reduction: float) -> Tuple[Shape, int, int]:
    """Cell shape, cell count and attention output weights (see :meth:`Attention.output_weights`)
    of a warehouse of ``layers`` (kernel shape, input channels) at 1x: whole-gcd cells, as many
    cells as mixtures."""
    shapes = [shape for shape, _ in layers]
    cell = cell_shape(shapes)
    cells = num_cells(shapes, cell)
    return cell, cells, sum(Attention.output_weights(in_planes, reduction, cells, num_mixtures(shape, cell))
                            for shape, in_planes in layers)


def _scalar_settings(settings: Mapping[str, Any]) -> Dict[str, Any]:
    """The manager's per-warehouse settings (its defaults filled in) as one value each: the automatic
    rule decides the warehouses, so there is no list of per-warehouse values to follow."""
    scalars = {}
    for name, value in WarehouseManager(**settings).settings.items():
        if isinstance(value, (list, tuple)):
            if len(value) != 1:
                raise ValueError(f'{name} has {len(value)} values, one per warehouse, but convert() without a rule '
                                 f'chooses the warehouses itself: give one value, or give a naming rule.')
            value = value[0]
        scalars[name] = value
    return scalars
