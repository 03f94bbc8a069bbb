"""Copy a trained adapter into the package as the default model's adapter.

    python recipes/smollm2/install_adapter.py RUN [--log-scale-entries N] [--select-chunks K]

The options replace the inference settings the adapter records: the attention scale's
base that training used, and chunk selection (off in training); the recipe's README says
why the shipped adapter sets them. The adapter gets a version tag (a hash of its weights
and settings), which names the cached default model folder, so a new adapter is never
mixed up with an old fused model.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from mlx_sharedllm.adapters import ADAPTER_JSON, ADAPTER_WEIGHTS
from mlx_sharedllm.config import check_log_scale, check_select_chunks
from mlx_sharedllm.default import ADAPTER, adapter_tag


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a training run's folder")
    p.add_argument("--log-scale-entries", type=int, default=None)
    p.add_argument("--select-chunks", type=int, default=None)
    a = p.parse_args()
    weights = (a.run / ADAPTER_WEIGHTS).read_bytes()
    meta = json.loads((a.run / ADAPTER_JSON).read_text())
    if a.log_scale_entries is not None:
        check_log_scale(a.log_scale_entries)
        meta["trained_log_scale_entries"] = meta.get("log_scale_entries", 0)
        meta["log_scale_entries"] = a.log_scale_entries
    if a.select_chunks is not None:
        check_select_chunks(a.select_chunks)
        meta["select_chunks"] = a.select_chunks
    meta["version"] = adapter_tag(weights, meta)
    meta["recipe"] = "recipes/smollm2/README.md"
    ADAPTER.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(a.run / ADAPTER_WEIGHTS, ADAPTER / ADAPTER_WEIGHTS)
    (ADAPTER / ADAPTER_JSON).write_text(json.dumps(meta, indent=1) + "\n")
    print(f"installed {meta['version']} into {ADAPTER}")


if __name__ == "__main__":
    main()
