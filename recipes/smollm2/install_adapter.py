"""Copy a trained adapter into the package as the default model's adapter.

    python recipes/smollm2/install_adapter.py recipes/smollm2/run

The adapter gets a version tag (a hash of its weights and of the inference settings it
records), which names the cached default model folder, so a new adapter is never mixed
up with an old fused model.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from mlx_sharedllm.adapters import ADAPTER_JSON, ADAPTER_WEIGHTS
from mlx_sharedllm.default import ADAPTER, adapter_tag


def main() -> None:
    run = Path(sys.argv[1])
    weights = (run / ADAPTER_WEIGHTS).read_bytes()
    meta = json.loads((run / ADAPTER_JSON).read_text())
    meta["version"] = adapter_tag(weights, meta)
    meta["recipe"] = "recipes/smollm2/README.md"
    ADAPTER.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / ADAPTER_WEIGHTS, ADAPTER / ADAPTER_WEIGHTS)
    (ADAPTER / ADAPTER_JSON).write_text(json.dumps(meta, indent=1) + "\n")
    print(f"installed {meta['version']} into {ADAPTER}")


if __name__ == "__main__":
    main()
