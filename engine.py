"""Per-iteration logic: the temperature schedule, one training epoch, evaluation.

No argument parsing here (``main.py`` owns it). Both functions work with and without a
DistributedDataParallel wrapper: the temperature is set on the unwrapped model.
"""
import math
from contextlib import nullcontext
from typing import Callable, Dict, Iterable, Optional

import numpy as np
import torch
from torch import nn

from modules.kernel_warehouse import Attention
from utils import MetricLogger, SmoothedValue, UserError, all_reduce_sum, is_main_process, unwrap_model


def get_temperature(step: int, epoch: int, iters_per_epoch: int, temp_epoch: float = 20,
                    temp_init_value: float = 1.0, temp_end: float = 0.0) -> float:
    """The attention temperature before data iteration ``step`` (from 0) of ``epoch`` (KW-SPEC section 3):
    linear from ``temp_init_value`` to ``temp_end`` over the first ``temp_epoch`` epochs, then constant."""
    total = iters_per_epoch * temp_epoch
    current = iters_per_epoch * epoch + step + 1
    return temp_end + max(0.0, (temp_init_value - temp_end) * (total - current) / max(1, total))


def capture_training_graph(model: nn.Module, sample: torch.Tensor,
                           amp_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Capture ``model``'s training forward and backward in CUDA graphs, in place; returns ``model``.

    After this, a forward in train mode replays the captured kernels (no Python, no launch per
    kernel) on a copy of its input, which must have ``sample``'s shape; eval mode runs the model
    as before. A KW model is host-bound on fast GPUs (docs/performance.md): its many small kernels
    take longer to launch than to run. Uses ``torch.cuda.make_graphed_callables``, under autocast to
    ``amp_dtype`` as in training (its cast cache off, as graphs need). The KW attentions blend their
    temperature even at 0 (``Attention.blend_always``) and read it from a buffer, so the graph
    follows the schedule; the warm-up passes leave the model's buffers (batch-norm statistics) as
    they were.
    """
    for module in model.modules():
        if isinstance(module, Attention):
            module.blend_always = True
    buffers = [buffer.detach().clone() for buffer in model.buffers()]
    model.train()
    with torch.autocast('cuda', dtype=amp_dtype, enabled=amp_dtype is not None, cache_enabled=False):
        torch.cuda.make_graphed_callables(model, (sample,))
    with torch.no_grad():  # in place: the graph reads these tensors
        for buffer, saved in zip(model.buffers(), buffers):
            buffer.copy_(saved)
    return model


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite."""


def _set_schedules(optimizer: torch.optim.Optimizer, lr: Optional[float], weight_decay: Optional[float]) -> None:
    for group in optimizer.param_groups:
        if lr is not None:
            group['lr'] = float(lr) * group.get('lr_scale', 1.0)
        if weight_decay is not None and group['weight_decay'] > 0:
            group['weight_decay'] = float(weight_decay)


def train_one_epoch(
        model: nn.Module,
        criterion: Callable,
        data_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        epoch: int,
        scaler: torch.amp.GradScaler,
        amp_dtype: Optional[torch.dtype] = None,
        update_freq: int = 1,
        max_norm: Optional[float] = None,
        model_ema=None,
        mixup_fn: Optional[Callable] = None,
        log_writer=None,
        lr_schedule: Optional[np.ndarray] = None,
        wd_schedule: Optional[np.ndarray] = None,
        temperature_fn: Optional[Callable[[int, int], float]] = None,
        print_freq: int = 10,
        iters_per_epoch: Optional[int] = None,
        start_step: int = 0,
        step_callback: Optional[Callable[[int, int], None]] = None,
        memory_format: torch.memory_format = torch.preserve_format,
) -> Dict[str, float]:
    """Train for one epoch; returns the epoch's average loss, last lr, weight decay and temperature.

    ``update_freq`` accumulates gradients over that many iterations per optimizer step; the
    schedules are indexed by optimizer step, ``temperature_fn(epoch, data_iter_step)`` by data
    iteration. To resume part-way, ``data_loader`` yields only the rest of the epoch, which has
    ``iters_per_epoch`` iterations in all, starting after optimizer step ``start_step``.
    ``step_callback(epoch, steps_done)`` runs after every optimizer step. Images are moved to the
    device in ``memory_format`` (``torch.channels_last`` for ``--channels_last``).
    """
    model.train(True)
    kw_model = unwrap_model(model)
    metric_logger = MetricLogger()
    metric_logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.6f}'))
    metric_logger.add_meter('temperature', SmoothedValue(window_size=1, fmt='{value:.4f}'))
    iters_per_epoch = iters_per_epoch or len(data_loader)
    steps_per_epoch = iters_per_epoch // update_freq
    first_iteration = start_step * update_freq
    optimizer.zero_grad(set_to_none=True)
    temperature = lr = weight_decay = 0.0
    for data_iter_step, (samples, targets) in enumerate(
            metric_logger.log_every(data_loader, print_freq, f'Epoch: [{epoch}]'), start=first_iteration):
        step = data_iter_step // update_freq
        if step >= steps_per_epoch:
            continue  # a last incomplete accumulation window is dropped
        global_step = epoch * steps_per_epoch + step
        if data_iter_step % update_freq == 0:
            _set_schedules(optimizer, lr_schedule[global_step] if lr_schedule is not None else None,
                           wd_schedule[global_step] if wd_schedule is not None else None)
        if temperature_fn is not None:
            temperature = temperature_fn(epoch, data_iter_step)
            kw_model.net_update_temperature(temperature)

        samples = samples.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        need_update = (data_iter_step + 1) % update_freq == 0
        # gradients are only all-reduced on the iteration that steps the optimizer
        sync = model.no_sync() if hasattr(model, 'no_sync') and not need_update else nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = criterion(model(samples), targets)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(f'the loss is {loss_value} at epoch {epoch}, iteration {data_iter_step}; '
                                         f'lower --lr, enable --clip_grad, or disable --use_amp.')
            scaler.scale(loss / update_freq).backward()
        if need_update:
            if max_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if model_ema is not None:
                model_ema.update(model)
            if step_callback is not None:
                step_callback(epoch, step + 1)

        lr = max(group['lr'] for group in optimizer.param_groups)
        weight_decay = max(group['weight_decay'] for group in optimizer.param_groups)
        metric_logger.update(loss=loss_value, lr=lr, temperature=temperature)
        if log_writer is not None and need_update:
            for name, value in (('loss', loss_value), ('lr', lr), ('weight_decay', weight_decay),
                                ('temperature', temperature)):
                log_writer.add_scalar(f'train/{name}', value, global_step)
    return {'loss': metric_logger.meters['loss'].global_avg, 'lr': lr, 'weight_decay': weight_decay,
            'temperature': temperature}


@torch.no_grad()
def evaluate(data_loader: Iterable, model: nn.Module, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None, print_freq: int = 10,
             temperature: float = 0.0, memory_format: torch.memory_format = torch.preserve_format
             ) -> Dict[str, float]:
    """Top-1/top-5 accuracy (%) and loss over the whole loader, summed over all processes.

    The model runs at ``temperature``: 0 for a trained model; during the temperature schedule,
    the temperature it is being trained at (as the original release does). With a distributed
    loader each process must see a disjoint part of the data: then every image counts once.
    """
    criterion = nn.CrossEntropyLoss(reduction='sum')
    model.eval()
    unwrap_model(model).net_update_temperature(temperature)
    metric_logger = MetricLogger()
    loss_sum = correct1 = correct5 = count = 0.0
    for images, targets in metric_logger.log_every(data_loader, print_freq, 'Test:'):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(images)
        output = output.float()
        batch = targets.shape[0]
        hits = output.topk(min(5, output.shape[1]), dim=1).indices.eq(targets[:, None])
        batch_correct1, batch_correct5 = hits[:, :1].sum().item(), hits.sum().item()
        loss = criterion(output, targets).item()
        loss_sum += loss
        correct1 += batch_correct1
        correct5 += batch_correct5
        count += batch
        metric_logger.update(loss=loss / batch, acc1=100.0 * batch_correct1 / batch, acc5=100.0 * batch_correct5 / batch)
    loss_sum, correct1, correct5, count = all_reduce_sum([loss_sum, correct1, correct5, count], device)
    stats = {'acc1': 100.0 * correct1 / max(count, 1), 'acc5': 100.0 * correct5 / max(count, 1),
             'loss': loss_sum / max(count, 1), 'num_images': int(count), 'temperature': temperature}
    if is_main_process():
        print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} "
              f"({stats['num_images']} images, temperature {temperature:g})", flush=True)
    return stats
