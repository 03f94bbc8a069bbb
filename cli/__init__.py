"""The `mlx-sharedllm` command line (installed as `mlx_sharedllm.cli`)."""

import os
import sys

EXIT_INTERRUPTED = 130


def main() -> None:
    """The console entry point: Ctrl-C while the heavy imports load exits 130 quietly,
    as it does once a command runs."""
    try:
        from .main import cli
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        sys.stderr.flush()
        # Not sys.exit: an import cut short can leave the interpreter marking the
        # interrupt unhandled, and it would then die of SIGINT (-2) instead of 130.
        os._exit(EXIT_INTERRUPTED)
    cli()
