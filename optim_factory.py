"""Optimizer construction: timm's optimizers with the released recipe's parameter groups.

No weight decay on 1-D parameters and biases (norm affines, KW biases, ``basis_bias``); everything
else is decayed, warehouse cells included. Layer-wise lr decay uses the model's
``group_matcher`` (the ConvNeXt models have one).
"""
import argparse

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
            raise UserError(f'--layer_decay is supported for the ConvNeXt models only, not {args.model}; '
                            f'leave it at 1.0.')
        kwargs['layer_decay'] = args.layer_decay
    try:
        return create_optimizer_v2(model, **kwargs)
    except ValueError as error:  # e.g. timm's "sgd" is Nesterov SGD, which needs momentum > 0
        raise UserError(f'cannot create optimizer {args.opt!r}: {error}; check --opt and its options.') from None
