"""`l2d` under DeepSpeed on CPU processes, for tests/test_train.py (run by torchrun, one per rank).

accelerate enables DeepSpeed only on accelerator devices: on a CPU machine it leaves the ranks
that torchrun started undetected (one process, no backend). This launcher reports them to
accelerate as gloo ranks, as it does for plain CPU DDP, and changes nothing else: DeepSpeed's own
engine (ZeRO stage from ACCELERATE_DEEPSPEED_ZERO_STAGE) and accelerate's DeepSpeed preparation
and checkpointing run as they do on GPUs.
"""
import os
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

_detect = PartialState._prepare_backend


def _gloo_ranks(self, cpu=False, sagemaker_dp=False, backend=None):
    if int(os.environ.get("LOCAL_RANK", -1)) != -1:
        return "gloo", DistributedType.MULTI_CPU
    return _detect(self, cpu, sagemaker_dp, backend)


PartialState._prepare_backend = _gloo_ranks

if __name__ == "__main__":
    from l2d.cli import main

    sys.exit(main(sys.argv[1:]))
