"""DeepSpeed under `l2d train` (accelerate's ``distributed_type: DEEPSPEED``).

The training loop owns batching, gradient accumulation (loss normalised by the real number of
response tokens across micro-batches and processes) and the learning-rate schedule. A DeepSpeed
engine instead divides each loss by its own accumulation count and runs the optimizer step inside
``backward`` whenever it believes an accumulation ends, and it reads its micro-batch size from a
dataloader, which this loop does not hand to accelerate. So its config is made to agree with the
recipe before ``accelerator.prepare``, and the loop tells the engine where each step ends.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure(accelerator, train_config) -> None:
    """Write the recipe's micro-batch size and clipping into the DeepSpeed config, accumulation 1.

    ``train_micro_batch_size_per_gpu = train.micro_batch_size``,
    ``train_batch_size = micro_batch_size x processes`` (one engine step per micro-batch as far as
    DeepSpeed's bookkeeping goes; :func:`backward` marks the real boundaries), and
    ``gradient_clipping = train.grad_clip`` (DeepSpeed clips inside its step, so the recipe's value
    has to reach it there; 0 turns clipping off in both).
    """
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    gas = config.get("gradient_accumulation_steps")
    if gas not in (None, "auto", 1):
        logger.warning("DeepSpeed config sets gradient_accumulation_steps=%s; l2d train accumulates itself "
                       "(train.batch_size / (train.micro_batch_size x processes)), so it is set to 1", gas)
    clip = config.get("gradient_clipping")
    grad_clip = float(train_config.grad_clip) if train_config.grad_clip > 0 else 0.0
    if clip not in (None, "auto") and float(clip) != grad_clip:
        logger.warning("DeepSpeed config sets gradient_clipping=%s; using the recipe's train.grad_clip=%s",
                       clip, grad_clip)
    config["train_micro_batch_size_per_gpu"] = train_config.micro_batch_size
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = train_config.micro_batch_size * accelerator.num_processes
    config["gradient_clipping"] = grad_clip


def backward(accelerator, model, loss, boundary: bool) -> None:
    """Backward of one micro-batch; under DeepSpeed also the optimizer step when ``boundary``.

    Under DeepSpeed ``model`` is the engine: it keeps (ZeRO-2: reduces and partitions) the gradients
    of micro-batches before the boundary and, at the boundary, clips and steps with the learning
    rate already in its param groups. The caller's ``optimizer.step()`` is then a no-op (accelerate's
    wrapper), so the learning rate of a step must be set before its first backward.
    """
    if not is_deepspeed(accelerator):
        accelerator.backward(loss)
        return
    model.set_gradient_accumulation_boundary(boundary)
    model.backward(loss)
    if boundary:
        model.step()
