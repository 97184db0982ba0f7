"""Run a script under ``accelerate launch --use_fsdp`` on a CPU-only machine: ``python -m helpers.accelerate_fsdp_cpu
SCRIPT ARGS`` as the launched program.

accelerate turns an FSDP launch into ``DistributedType.FSDP`` only on accelerator devices. Its launcher refuses
``--cpu`` together with ``--use_fsdp``, and on the CPU its ``AcceleratorState`` keeps ``MULTI_CPU`` and drops the
plugin (accelerate 1.16, ``state.py``, the branch that lists ``MULTI_GPU``, ``MULTI_XPU``, ...). This shim lifts
exactly that gate: it sets what ``--cpu`` sets (``ACCELERATE_USE_CPU``, so the processes form a gloo group), and
does what that branch does for a GPU (the distributed type, the plugin, its mixed precision). Everything else is
accelerate's: the plugin built
from the launcher's environment, ``Accelerator.prepare``'s FSDP2 path (``fsdp2_prepare_model``: wrap policy,
``fully_shard`` calls, optimizer swap) and ``Accelerator.backward`` run unchanged, over gloo. Test-only: users on
GPUs launch without it.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Any

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_accelerator_state_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self: AcceleratorState, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def main() -> None:
    os.environ["ACCELERATE_USE_CPU"] = "true"
    AcceleratorState.__init__ = _init_with_fsdp_on_cpu
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
