r"""Turn the convolutions and linear layers of an existing model into KW layers, in place.

::

    model = timm.create_model('efficientnet_b0')
    print(plan(model))       # the warehouses, their cells and the parameter count it would make
    convert(model)           # one warehouse per stage and kind of layer (StageRule)

    # or name the warehouses yourself, e.g. as the KW ResNets do:
    block = r'layer(?P<stage>\d)\.(?P<block>\d+)\.'
    rule = RegexRule([
        (block + 'conv1', 'stage{handover_stage}_layer{handover_layer}_conv0'),
        (block + 'conv2', 'stage{stage}_layer{layer}_conv1'),
        (block + r'downsample\.0', 'stage{handover_stage}_layer{handover_layer}_conv2'),
    ], fields=Stages((3, 4, 6, 3), first_stage=1))
    convert(timm.create_model('resnet34'), rule, sharing_range=('layer', 'conv'), cell_num_ratio=1)

:func:`plan` selects layers and names their warehouses; :func:`convert` then runs the warehouse
manager's three phases on them exactly as the built-in KW models do (same fusing of names through
the sharing range, same per-warehouse settings, same cell allocation in ``modules()`` order).
"""
import functools
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Type, Union

import torch
from torch import nn

from .attention import set_temperature
from .auto_rule import StageRule
from .conv import KWLinear
from .manager import WarehouseManager

# ``rule(path, layer)`` -> warehouse name of the layer, or None to keep it plain.
NamingRule = Callable[[str, nn.Module], Optional[str]]
RulePairs = Sequence[Tuple[str, Optional[str]]]
TemplateFields = Callable[['re.Match[str]'], Mapping[str, Any]]

CONVERTIBLE_TYPES: Tuple[Type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_LAYER_TYPES = {nn.Conv1d: 'conv1d', nn.Conv2d: 'conv2d', nn.Conv3d: 'conv3d', nn.Linear: 'linear'}
MANAGER_ATTRIBUTE = 'warehouse_manager'  # fixes the state-dict keys warehouse_manager.weights.N
# convert() warns when the attentions add more than this fraction of the model's parameters (the
# released 1x models: 0.02 for ResNet-18 to 0.48 for MobileNetV2), and at least a million: in a toy
# model the attentions' minimum width (16) outweighs small kernels, which is no cause for alarm.
ATTENTION_WARNING_RATIO = 0.5
ATTENTION_WARNING_MINIMUM = 1_000_000


class Stages:
    """Groups consecutive blocks into stages: the template fields of a :class:`RegexRule`.

    Called with the match of a layer path, it reads the block index from the group named
    ``block`` (else the first group) and returns:

    - ``stage``, ``layer``: the block's stage (from 0) and its index within that stage;
    - ``handover_stage``, ``handover_layer``: the same, except that the first block of every stage
      but the first counts as the next layer of the previous stage. This is the hand-over of the
      KW ResNets and MobileNetV2s, where the layer that enters a new stage (changing width or
      resolution) draws on the previous stage's warehouse; a rule applies it to the layers it
      chooses by using these fields in their templates.

    Args:
        depths: blocks per stage. Flat layouts (``blocks.7``) number blocks across stages.
        first_stage: for nested layouts (``layer2.1``, with a group named ``stage`` as well), the
            number of the model's first stage (1 for torchvision's ``layer1``).
    """

    def __init__(self, depths: Sequence[int], first_stage: int = 0):
        if not depths or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in depths):
            raise ValueError(f'stage depths must be a non-empty list of positive integers, got {depths!r}.')
        self.depths = tuple(depths)
        self.first_stage = first_stage

    @classmethod
    def even(cls, num_blocks: int, num_stages: int) -> 'Stages':
        """``num_stages`` stages of equal depth, e.g. ``Stages.even(12, 4)`` -> depths (3, 3, 3, 3)."""
        if num_stages <= 0 or num_blocks % num_stages:
            raise ValueError(f'{num_blocks} blocks do not split into {num_stages} equal stages; give the '
                             f'depths explicitly, e.g. Stages((2, 3, 3)).')
        return cls([num_blocks // num_stages] * num_stages)

    def locate(self, block: int, stage: Optional[int] = None) -> Tuple[int, int]:
        """``(stage, layer)`` of a block given by its global index, or by stage number and index."""
        if stage is None:
            if not 0 <= block < sum(self.depths):
                raise ValueError(f'block {block} is outside the {sum(self.depths)} blocks of stage depths '
                                 f'{self.depths}; give depths that cover every block.')
            for stage, depth in enumerate(self.depths):
                if block < depth:
                    return stage, block
                block -= depth
        stage -= self.first_stage
        if not (0 <= stage < len(self.depths) and 0 <= block < self.depths[stage]):
            raise ValueError(f'block {block} of stage {stage + self.first_stage} does not exist with stage depths '
                             f'{self.depths} (first stage numbered {self.first_stage}).')
        return stage, block

    def __call__(self, match: 're.Match[str]') -> Dict[str, int]:
        """The fields for a match; none when it captures no block number (a template using them
        then reports the missing field)."""
        names = match.re.groupindex
        if 'block' in names:
            block = match.group('block')
        else:
            block = match.group(1) if match.re.groups else None
            if not (block or '').isdigit():
                return {}
        stage_number = match.group('stage') if 'stage' in names else None
        for what, number in (('block', block), ('stage', stage_number)):
            if number is not None and not number.isdigit():
                raise ValueError(f'pattern {match.re.pattern!r} captures {number!r} as the {what} number of '
                                 f'{match.string!r}; the "{what}" group must capture digits.')
        stage, layer = self.locate(int(block), None if stage_number is None else int(stage_number))
        handover = (stage - 1, self.depths[stage - 1]) if layer == 0 and stage > 0 else (stage, layer)
        return dict(stage=stage, layer=layer, handover_stage=handover[0], handover_layer=handover[1])


def _compile(patterns: Optional[Iterable[str]], what: str) -> List['re.Pattern[str]']:
    compiled = []
    for pattern in patterns or ():
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(f'{what} pattern {pattern!r} is not a valid regular expression ({error}).') from None
    return compiled


class RegexRule:
    r"""A naming rule from ``(pattern, template)`` pairs; the first pattern matching the whole
    module path names the layer, a ``None`` template keeps it plain, no match keeps it plain.

    Templates are ``str.format`` strings: ``{0}``, ``{1}``... are the pattern's groups, named
    groups are available by name, and so are the fields that ``fields(match)`` returns (such as
    :class:`Stages`' ``stage`` and ``layer``), e.g.
    ``(r'blocks\.(\d+)\.mlp\.fc1', 'stage{stage}_layer{0}_fc')``.
    """

    def __init__(self, pairs: RulePairs, fields: Optional[TemplateFields] = None):
        if isinstance(pairs, (str, bytes)) or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
            raise ValueError('a naming rule is a callable or a list of (pattern, template) pairs, got '
                             f'{pairs!r}.')
        self.pairs = list(zip(_compile([p for p, _ in pairs], 'naming rule'), [t for _, t in pairs]))
        self.fields = fields

    def __call__(self, path: str, layer: Optional[nn.Module] = None) -> Optional[str]:
        for pattern, template in self.pairs:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if template is None:
                return None
            named = {**match.groupdict(), **(self.fields(match) if self.fields else {})}
            try:
                return template.format(*match.groups(), **named)
            except (KeyError, IndexError) as error:
                raise ValueError(
                    f'naming template {template!r} (pattern {pattern.pattern!r}) for layer {path!r} uses the '
                    f'field {error}, which the match does not provide; available: {match.re.groups} positional '
                    f'group(s) and {sorted(named)}.') from None
        return None


def _is_depthwise(layer: nn.Module) -> bool:
    return not isinstance(layer, nn.Linear) and 1 < layer.groups == layer.in_channels


def _base_type(layer: nn.Module) -> Type[nn.Module]:
    return next(t for t in CONVERTIBLE_TYPES if isinstance(layer, t))


def _classifier_paths(model: nn.Module, layers: List[Tuple[str, nn.Module]]) -> Set[str]:
    """The layers of ``model.get_classifier()`` when the model has it, else the last layer."""
    get_classifier = getattr(model, 'get_classifier', None)
    if not callable(get_classifier):
        return {layers[-1][0]}
    head = get_classifier()
    inside = {id(m) for m in head.modules()} if isinstance(head, nn.Module) else set()
    return {path for path, layer in layers if id(layer) in inside}


def _static_padding(path: str, layer: nn.Module) -> Tuple[int, ...]:
    """A conv's padding as numbers (``'same'``/``'valid'`` resolved) or an error naming the layer."""
    if layer.padding_mode != 'zeros':
        raise ValueError(f'layer {path!r} pads with {layer.padding_mode!r}; a KW convolution zero-pads: exclude '
                         f'the layer from the conversion.')
    if layer.padding == 'valid':
        return (0,) * len(layer.kernel_size)
    if layer.padding == 'same':
        total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError(f"layer {path!r} uses padding='same' with an even kernel extent, which pads one side "
                             f"more than the other; a KW convolution pads symmetrically: exclude the layer.")
        return tuple(t // 2 for t in total)
    return tuple(layer.padding)


def _check_convertible(path: str, layer: nn.Module, types: Tuple[type, ...], paths: List[str]) -> None:
    """Refuse layers that a KW layer would not reproduce, naming the layer."""
    base = _base_type(layer)
    if type(layer).forward is not base.forward and type(layer) not in types:
        raise ValueError(
            f'layer {path!r} is a {type(layer).__module__}.{type(layer).__qualname__}, which overrides '
            f'{base.__name__}.forward, so a KW layer may not compute the same: exclude the layer, or, if it '
            f'computes exactly what {base.__name__} does, add its class to types, e.g. '
            f'types=(*CONVERTIBLE_TYPES, {type(layer).__qualname__}).')
    if isinstance(layer, nn.modules.lazy.LazyModuleMixin) and layer.has_uninitialized_params():
        raise ValueError(f'layer {path!r} is a lazy module without shapes yet: run one forward pass before '
                         f'converting.')
    if not isinstance(layer, nn.Linear):
        _static_padding(path, layer)
    if len(paths) > 1:
        raise ValueError(f'layer {path!r} is also registered as {paths[1:]}; a shared layer cannot be replaced '
                         f'at one path only: exclude it or give each path its own layer.')


@dataclass
class WarehousePlan:
    """One warehouse of a :class:`ConversionPlan`."""
    name: str
    layers: List[str]
    cell_shape: Tuple[int, ...]
    num_cells: int
    attention_params: int  # the attentions of its layers

    @property
    def cell_params(self) -> int:
        return self.num_cells * math.prod(self.cell_shape)


def _short_count(count: int) -> str:
    return f'{count / 1e6:.2f}M' if count >= 1e5 else f'{count / 1e3:.1f}K'


class ConversionPlan(Dict[str, str]):
    """What :func:`convert` would do: ``{module path: warehouse name}`` of the layers it replaces,
    in module order, and

    - ``warehouses``: a :class:`WarehousePlan` each (fused name, layers, cell shape, cells and the
      parameters of its layers' attentions), in the order of their state-dict index;
    - ``kept_plain``: ``{module path: why}`` for every other conv/linear layer;
    - ``params_before``, ``params_after``: the model's parameter count now and once converted.

    ``print(plan)`` shows all of it as a table.
    """

    def __init__(self, names: Mapping[str, str], warehouses: List[WarehousePlan], kept_plain: Dict[str, str],
                 params_before: int, params_after: int, model_name: str):
        super().__init__(names)
        self.warehouses = warehouses
        self.kept_plain = kept_plain
        self.params_before = params_before
        self.params_after = params_after
        self.model_name = model_name

    @property
    def attention_params(self) -> int:
        return sum(w.attention_params for w in self.warehouses)

    def __str__(self) -> str:
        before, after = self.params_before, self.params_after
        cells = sum(w.cell_params for w in self.warehouses)
        lines = [f'KW conversion of {self.model_name}: {len(self)} of {len(self) + len(self.kept_plain)} conv/linear '
                 f'layers into {len(self.warehouses)} warehouses',
                 f'parameters: {_short_count(before)} -> {_short_count(after)} (x{after / max(before, 1):.2f}; cells '
                 f'{_short_count(cells)}, attentions {_short_count(self.attention_params)})']
        if self.warehouses:
            width = max(len('warehouse'), *(len(w.name) for w in self.warehouses))
            lines.append(f'{"warehouse":<{width}}  layers  {"cell":<14} {"cells":>6}  {"cell params":>11}  attentions')
            for w in self.warehouses:
                cell = 'x'.join(map(str, w.cell_shape))
                lines.append(f'{w.name:<{width}}  {len(w.layers):>6}  {cell:<14} {w.num_cells:>6}  '
                             f'{_short_count(w.cell_params):>11}  {_short_count(w.attention_params):>10}')
        by_reason: Dict[str, List[str]] = {}
        for path, reason in self.kept_plain.items():
            by_reason.setdefault(reason, []).append(path)
        if by_reason:
            lines.append('kept plain:')
        for reason, paths in by_reason.items():
            shown = ', '.join(paths[:4]) + (f', ... ({len(paths)} layers)' if len(paths) > 4 else '')
            lines.append(f'  {reason}: {shown}')
        return '\n'.join(lines)


def _select(model: nn.Module, layers: List[Tuple[str, nn.Module]], types: Tuple[type, ...],
            include: List['re.Pattern[str]'], exclude: List['re.Pattern[str]'], depthwise: bool, stem: bool,
            classifier: bool) -> Dict[str, Optional[str]]:
    """For every conv/linear layer, None when it is a candidate for conversion, else why not."""
    reasons: Dict[str, Optional[str]] = {path: None for path, _ in layers}
    if not stem:
        reasons[layers[0][0]] = 'stem'
    if not classifier:
        reasons.update({path: 'classifier' for path in _classifier_paths(model, layers)})
    for path, layer in layers:
        if reasons[path] is not None:
            continue
        if not isinstance(layer, types):
            reasons[path] = 'not one of types'
        elif _is_depthwise(layer) and not depthwise:
            reasons[path] = 'depthwise (depthwise=False)'
        elif include and not any(p.fullmatch(path) for p in include):
            reasons[path] = 'not matched by include'
        elif any(p.fullmatch(path) for p in exclude):
            reasons[path] = 'excluded'
    return reasons


def plan(
        model: nn.Module,
        rule: Union[NamingRule, RulePairs, StageRule, None] = None,
        *,
        include: Optional[Iterable[str]] = None,
        exclude: Optional[Iterable[str]] = None,
        types: Sequence[Type[nn.Module]] = CONVERTIBLE_TYPES,
        depthwise: bool = True,
        stem: bool = False,
        classifier: bool = False,
        **manager_settings,
) -> ConversionPlan:
    """What :func:`convert` with the same arguments would do, without changing ``model``: the
    warehouse name of every layer it would replace (by module path, in module order), with the
    warehouses, the layers kept plain and why, and the parameter counts (see :class:`ConversionPlan`).
    It raises what :func:`convert` would raise.

    A layer is a candidate when it is an instance of ``types`` (subclasses of ``nn.Conv1d/2d/3d`` and
    ``nn.Linear``), its path matches an ``include`` pattern (if any) and no ``exclude`` pattern
    (patterns match the whole path), it is not a depthwise conv unless ``depthwise``, not the stem
    (the model's first conv/linear layer in module order) unless ``stem``, and not in the
    classifier (``model.get_classifier()``, else the last conv/linear layer) unless ``classifier``.
    ``rule`` names each candidate's warehouse or returns None to keep it plain; without a rule,
    :class:`StageRule` names them from the model's stages.
    """
    names, kept_plain = _name_layers(model, rule, include, exclude, types, depthwise, stem, classifier,
                                     manager_settings)
    old_layers = {path: model.get_submodule(path) for path in names}
    with torch.device('meta'):
        return _describe(model, names, kept_plain, *_build(names, old_layers, manager_settings))


def _name_layers(model: nn.Module, rule: Union[NamingRule, RulePairs, StageRule, None],
                 include: Optional[Iterable[str]], exclude: Optional[Iterable[str]],
                 types: Sequence[Type[nn.Module]], depthwise: bool, stem: bool, classifier: bool,
                 manager_settings: Mapping[str, Any]) -> Tuple[Dict[str, str], Dict[str, str]]:
    """:func:`plan`'s selection and naming: the warehouse name of each layer to replace, and why each
    other conv/linear layer stays plain."""
    rule = StageRule() if rule is None else rule
    if not isinstance(rule, StageRule) and not callable(rule):
        rule = RegexRule(rule)
    types = tuple(types)
    if not all(isinstance(t, type) and issubclass(t, CONVERTIBLE_TYPES) for t in types):
        raise ValueError(f'types must be subclasses of nn.Conv1d/2d/3d or nn.Linear, got {types!r}.')
    include_patterns, exclude_patterns = _compile(include, 'include'), _compile(exclude, 'exclude')
    all_paths: Dict[int, List[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        all_paths.setdefault(id(module), []).append(path)
    # The root cannot be replaced in place.
    layers = [(path, m) for path, m in model.named_modules() if path and isinstance(m, CONVERTIBLE_TYPES)]
    if not layers:
        return {}, {}
    kept_plain = _select(model, layers, types, include_patterns, exclude_patterns, depthwise, stem, classifier)
    candidates = [(path, layer) for path, layer in layers if kept_plain[path] is None]
    if isinstance(rule, StageRule):
        names, auto_plain = rule.name_layers(model, candidates, manager_settings)
        kept_plain.update(auto_plain)
    else:
        names = {}
        for path, layer in candidates:
            name = rule(path, layer)
            if name is None:
                kept_plain[path] = 'kept plain by the rule'
            elif not isinstance(name, str) or not name:
                raise ValueError(f'the naming rule returned {name!r} for layer {path!r}; return a warehouse name '
                                 f'(a non-empty string), or None to keep the layer plain.')
            else:
                names[path] = name
    for path, layer in candidates:
        if path in names:
            _check_convertible(path, layer, types, all_paths[id(layer)])
    return names, {p: r for p, r in kept_plain.items() if p not in names}


def _describe(model: nn.Module, names: Dict[str, str], kept_plain: Dict[str, str], manager: WarehouseManager,
              new_layers: Mapping[str, nn.Module]) -> ConversionPlan:
    """The plan of replacing the layers ``names`` of ``model`` (not yet replaced) by ``new_layers``."""
    before = sum(p.numel() for p in model.parameters())
    attention = {idx: 0 for idx in range(len(manager.weights))}
    for layer in new_layers.values():
        conv = layer.conv if isinstance(layer, KWLinear) else layer
        attention[conv.warehouse_id] += sum(p.numel() for p in conv.attention.parameters())
    warehouses = [WarehousePlan(name, list(manager.layer_names[name]), tuple(cells.shape[1:]), cells.shape[0],
                                attention[idx])
                  for idx, (name, cells) in enumerate(zip(manager.warehouse_names, manager.weights))]
    after = (before - sum(p.numel() for path in names for p in model.get_submodule(path).parameters())
             + sum(p.numel() for p in manager.parameters())
             + sum(p.numel() for layer in new_layers.values() for p in layer.parameters()))
    return ConversionPlan(names, warehouses, kept_plain, before, after, type(model).__name__)


def _build(names: Mapping[str, str], old_layers: Mapping[str, nn.Module],
           manager_settings: Mapping[str, Any]) -> Tuple[WarehouseManager, Dict[str, nn.Module]]:
    """The warehouse manager and the KW layers (by path, in module order) that replace ``old_layers``."""
    manager = WarehouseManager(**manager_settings)
    new_layers = {path: manager.reserve(**_layer_arguments(path, layer), warehouse_name=names[path], layer_name=path)
                  for path, layer in old_layers.items()}
    manager.store()
    # Allocation walks the KW layers in the model's module order, which ``names`` keeps.
    manager.allocate(nn.ModuleList(new_layers.values()))
    return manager, new_layers


def _layer_arguments(path: str, layer: nn.Module) -> Dict[str, Any]:
    """The :meth:`WarehouseManager.reserve` arguments that rebuild ``layer``."""
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        return dict(in_planes=layer.in_features, out_planes=layer.out_features, bias=bias, layer_type='linear')
    return dict(in_planes=layer.in_channels, out_planes=layer.out_channels, kernel_size=layer.kernel_size,
                stride=layer.stride, padding=_static_padding(path, layer), dilation=layer.dilation,
                groups=layer.groups, bias=bias, layer_type=_LAYER_TYPES[_base_type(layer)])


def _register_first(model: nn.Module, name: str, module: nn.Module) -> None:
    """Register ``module`` as ``model``'s first child, so that its parameters lead the state dict
    as in the built-in KW models (nn.Module has no public call to insert a child first)."""
    children = model._modules
    others = dict(children)
    children.clear()
    children[name] = module
    children.update(others)


def convert(
        model: nn.Module,
        rule: Union[NamingRule, RulePairs, StageRule, None] = None,
        *,
        include: Optional[Iterable[str]] = None,
        exclude: Optional[Iterable[str]] = None,
        types: Sequence[Type[nn.Module]] = CONVERTIBLE_TYPES,
        depthwise: bool = True,
        stem: bool = False,
        classifier: bool = False,
        **manager_settings,
) -> nn.Module:
    """Replace the layers :func:`plan` selects by KW layers at the same module paths; returns ``model``.

    Without a ``rule``, :class:`StageRule` names the warehouses from the model's stages (timm's
    ``feature_info``). ``manager_settings`` are :class:`WarehouseManager` arguments (``reduction``,
    ``cell_num_ratio``, ``cell_inplane_ratio``, ``cell_outplane_ratio``, ``sharing_range``,
    ``nonlocal_basis_ratio``, ``norm_layer``, ``spatial_partition``). The model gains
    ``warehouse_manager`` (first in its state dict) and, unless it has one,
    ``net_update_temperature(t)``. The keys of the layers left alone do not change. A replaced
    conv's ``weight`` gives way to its attention (``<path>.attention.*``) and its ``bias`` keeps its
    key; a replaced linear layer's keys move under ``<path>.conv.`` (the KW linear holds a KW 1-D
    conv). Biases start at zero and cells are initialised as in the built-in KW models. A warning
    says when the attentions add more than half the model's parameters (and over a million).
    Nothing changes in ``model`` if any step fails.
    """
    if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        raise TypeError(f'convert() adds a warehouse_manager submodule, which nn.{type(model).__name__} would treat '
                        f'as one of its layers: wrap the model in an nn.Module and convert that.')
    if hasattr(model, MANAGER_ATTRIBUTE):
        raise ValueError('the model already has a warehouse_manager: convert() turns a plain model into a KW model, '
                         'once.')
    names, kept_plain = _name_layers(model, rule, include, exclude, types, depthwise, stem, classifier,
                                     manager_settings)
    if not names:
        raise ValueError('no layer was selected: the naming rule returned a name for none of the conv/linear layers '
                         'that pass the filters; check the rule\'s patterns against model.named_modules().')
    old_layers = {path: model.get_submodule(path) for path in names}
    manager, new_layers = _build(names, old_layers, manager_settings)
    conversion = _describe(model, names, kept_plain, manager, new_layers)
    if conversion.attention_params > max(ATTENTION_WARNING_RATIO * conversion.params_before,
                                         ATTENTION_WARNING_MINIMUM):
        warnings.warn(f'converting {conversion.model_name} adds {_short_count(conversion.attention_params)} attention '
                      f'parameters ({_short_count(conversion.params_before)} -> '
                      f'{_short_count(conversion.params_after)} in all): warehouses whose layers share only small '
                      f'cells need large attentions; print(plan(...)) shows them. Keep layers of unrelated widths in '
                      f'different warehouses (convert without a rule does), or use larger cells.', stacklevel=2)
    weight = next(iter(old_layers.values())).weight
    manager.to(device=weight.device, dtype=weight.dtype).train(model.training)
    for path, layer in new_layers.items():
        old = old_layers[path]
        layer.to(device=old.weight.device, dtype=old.weight.dtype).train(old.training)
        parent, _, child = path.rpartition('.')
        setattr(model.get_submodule(parent), child, layer)
    _register_first(model, MANAGER_ATTRIBUTE, manager)
    if not hasattr(model, 'net_update_temperature'):
        # a partial (not a bound method) so that the model still pickles and deep-copies
        model.net_update_temperature = functools.partial(set_temperature, model)
    return model
