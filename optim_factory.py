"""Optimizer construction: timm's optimizers with the released recipe's parameter groups.

No weight decay on 1-D parameters and biases (norm affines, KW biases, ``basis_bias``); everything
else is decayed, warehouse cells included. Layer-wise lr decay uses the model's
``group_matcher`` (the ConvNeXt models have one). ``optimizer_state_from_original`` lets training
continue from a checkpoint of the original release, whose groups are ordered differently.
"""
import argparse
from typing import Any, Dict, List

import torch
from timm.optim import create_optimizer_v2, list_optimizers
from torch import nn

from utils import UserError


def create_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    if args.opt.lower() not in list_optimizers():
        raise UserError(f'unknown optimizer --opt {args.opt!r}; choose one of timm\'s optimizers, e.g. sgd, '
                        f'adamw, lamb.')
    kwargs = dict(opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
                  filter_bias_and_bn=True)
    if args.opt_eps is not None:
        kwargs['eps'] = args.opt_eps
    if args.opt_betas is not None:
        kwargs['betas'] = tuple(args.opt_betas)
    if args.layer_decay != 1.0:
        if not hasattr(model, 'group_matcher'):
            raise UserError(f'--layer_decay needs a model that groups its parameters by depth (timm\'s '
                            f'group_matcher), which {args.model} does not; leave it at 1.0.')
        kwargs['layer_decay'] = args.layer_decay
    try:
        return create_optimizer_v2(model, **kwargs)
    except ValueError as error:  # e.g. timm's "sgd" is Nesterov SGD, which needs momentum > 0
        raise UserError(f'cannot create optimizer {args.opt!r}: {error}; check --opt and its options.') from None


def original_param_groups(model: nn.Module) -> List[List[str]]:
    """The parameter names of the original release's optimizer groups, in its order.

    The original builds its groups (ConvNeXt's ``get_parameter_groups``, without layer decay) in the
    order their first parameter appears, a "decay" group and a "no_decay" one (1-D parameters, biases
    and ``model.no_weight_decay()``), where timm puts "no_decay" first.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    groups: Dict[bool, List[str]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            decay = not (param.ndim == 1 or name.endswith('.bias') or name in skip)
            groups.setdefault(decay, []).append(name)
    return list(groups.values())


def optimizer_state_from_original(saved: Dict[str, Any], model: nn.Module,
                                  optimizer: torch.optim.Optimizer, source: str) -> Dict[str, Any]:
    """The original release's optimizer state re-indexed to ``optimizer``'s groups, parameter by
    parameter; each of our groups takes the hyperparameters of the original group its parameters
    were in. Raises UserError when the saved groups are not the original's two for this model."""
    refuse = UserError(f'the optimizer state in {source} does not match the original release\'s parameter '
                       f'groups for this model; to start from its weights with a new optimizer, use --finetune '
                       f'{source} instead of --resume.')
    names = original_param_groups(model)
    saved_groups = saved.get('param_groups') if isinstance(saved, dict) else None
    if not isinstance(saved_groups, list) or [len(group['params']) for group in saved_groups] != list(map(len, names)):
        raise refuse
    params = [param for group in optimizer.param_groups for param in group['params']]
    index_of = {id(param): index for index, param in enumerate(params)}
    param_of = dict(model.named_parameters())
    index_map, group_of = {}, {}  # saved index -> our index; our index -> the saved group's hyperparameters
    for saved_group, group_names in zip(saved_groups, names):
        hyperparameters = {key: value for key, value in saved_group.items() if key != 'params'}
        for saved_index, name in zip(saved_group['params'], group_names):
            index = index_of[id(param_of[name])]
            index_map[saved_index], group_of[index] = index, hyperparameters
    state = {}
    for saved_index, param_state in saved.get('state', {}).items():
        index = index_map.get(saved_index)
        if index is None or any(torch.is_tensor(value) and value.ndim > 0 and value.shape != params[index].shape
                                for value in param_state.values()):
            raise refuse
        state[index] = param_state
    param_groups = []
    for group in optimizer.param_groups:
        indices = [index_of[id(param)] for param in group['params']]
        sources = {id(group_of[index]) for index in indices}
        if len(sources) != 1:  # our group mixes parameters the original decayed differently
            raise refuse
        param_groups.append({**group_of[indices[0]], 'params': indices})
    return {'state': state, 'param_groups': param_groups}
