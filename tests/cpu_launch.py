"""`l2d` under DeepSpeed or FSDP on CPU processes, for tests/test_train.py (run by torchrun, one per rank).

accelerate enables DeepSpeed and FSDP only on accelerator devices: on a CPU machine it leaves the
ranks that torchrun started undetected (one process, no backend) under DeepSpeed, and runs plain
gloo DDP under FSDP. This launcher reports the ranks to accelerate as gloo ranks and, when
ACCELERATE_USE_FSDP is set, turns their distributed type into FSDP with the plugin accelerate built
from the environment, and changes nothing else: DeepSpeed's engine, torch's FSDP, and accelerate's
preparation and checkpointing of both run as they do on GPUs.
"""
import os
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_detect = PartialState._prepare_backend
_init = AcceleratorState.__init__


def _gloo_ranks(self, cpu=False, sagemaker_dp=False, backend=None):
    if int(os.environ.get("LOCAL_RANK", -1)) != -1:
        return "gloo", DistributedType.MULTI_CPU
    return _detect(self, cpu, sagemaker_dp, backend)


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # (every later AcceleratorState() copies PartialState's type back in: set it there too)
        PartialState._shared_state["distributed_type"] = self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


PartialState._prepare_backend = _gloo_ranks
AcceleratorState.__init__ = _fsdp_on_cpu

if __name__ == "__main__":
    from l2d.cli import main

    sys.exit(main(sys.argv[1:]))
