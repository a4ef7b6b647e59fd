"""open_clip's trainer under torchrun on a machine without GPUs.

open_clip wraps the model as ``DistributedDataParallel(model, device_ids=[device])``. For a CPU
device, torch (2.x) rejects ``device_ids`` ("only work with ... GPU modules or CPU modules, but
got device_ids [device(type='cpu')]"); for CPU modules it must be left out. This entry point
drops a CPU-only ``device_ids`` and then runs ``open_clip_train.main`` unchanged. ``curate
train`` uses it only for several processes with no GPU visible (tests, CPU boxes); with GPUs
torchrun starts ``open_clip_train.main`` itself.
"""

from __future__ import annotations

import runpy

import torch


class _CpuDDP(torch.nn.parallel.DistributedDataParallel):
    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


def main() -> None:
    if not torch.cuda.is_available():
        torch.nn.parallel.DistributedDataParallel = _CpuDDP
    runpy.run_module("open_clip_train.main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
