"""`python -m mlx_sharedllm.launch ARGS`: `mlx.launch ARGS`, exiting 1 when a process failed.

`mlx.launch` (MLX 0.32) stops the other processes when one fails, but itself exits 0,
so a script or CI job cannot tell. This runs the same launcher and reads its verdict on
each process.
"""

from __future__ import annotations

import sys

import mlx_sharedllm  # noqa: F401  (preloads OpenBLAS before mlx is imported)


def main(argv: list[str] | None = None) -> int:
    """Run `mlx.launch` with `argv`; 1 if a process exited non-zero or was killed, else 0."""
    from mlx._distributed_utils import launch

    if not hasattr(launch, "log_warning"):
        raise RuntimeError("this MLX's launcher is not the one this wraps: use mlx.launch")
    failed: list[str] = []
    warn = launch.log_warning

    def record(*args, **kwargs) -> None:
        message = " ".join(map(str, args))
        if message.startswith("Node with rank"):
            failed.append(message)
        warn(*args, **kwargs)

    launch.log_warning = record
    sys.argv = ["mlx.launch", *(sys.argv[1:] if argv is None else argv)]
    try:
        launch.main()
    finally:
        launch.log_warning = warn
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
