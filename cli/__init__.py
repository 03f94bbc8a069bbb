"""The `mlx-sharedllm` command line (installed as `mlx_sharedllm.cli`)."""

import sys

EXIT_INTERRUPTED = 130


def main() -> None:
    """The console entry point: Ctrl-C while the heavy imports load exits 130 quietly,
    as it does once a command runs."""
    try:
        from .main import cli
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    cli()
