"""`mlx-sharedllm train ARGS` in this process: the script tests run under `mlx.launch`.

With DIE_AFTER=<step> in the environment, rank 1 kills itself (SIGKILL) once it has taken
that step, as a process that crashes or runs out of memory would; with HANG=1 as well, it
stops answering instead (sleeps), as a process on a host that dropped off the network.
"""

import os
import signal
import sys
import time

import mlx_sharedllm  # noqa: F401  (preloads OpenBLAS before mlx is imported)
from mlx_sharedllm import train as train_module
from mlx_sharedllm.cli.main import cli


def die_after(step: int) -> None:
    advance = train_module._Trainer.advance

    def advance_then_die(self, examples, start):
        info = advance(self, examples, start)
        if self.world.rank == 1 and info.step == step:
            if os.environ.get("HANG"):
                time.sleep(3600)
            os.kill(os.getpid(), signal.SIGKILL)
        return info

    train_module._Trainer.advance = advance_then_die


if __name__ == "__main__":
    if "DIE_AFTER" in os.environ:
        die_after(int(os.environ["DIE_AFTER"]))
    cli(["train", *sys.argv[1:]])
