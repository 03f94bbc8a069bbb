"""Write an adapter that is another adapter plus a reader LoRA (train_reader.py).

    python recipes/smollm2/add_reader.py runs/reader runs/with-reader \
        [--adapter mlx_sharedllm/weights/smollm2-135m-m19]

The injection weights and settings are the given adapter's (default: the shipped one);
the LoRA factors and their scale are added, and `train` lists "reader". The result is an
adapter folder like any other: `install_adapter.py` ships it, `fuse` merges it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx_sharedllm  # noqa: F401  (first: on Linux it preloads OpenBLAS before mlx loads)

# isort: split
import mlx.core as mx

from mlx_sharedllm.adapters import ADAPTER_JSON, ADAPTER_WEIGHTS, read_adapter
from mlx_sharedllm.default import ADAPTER


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", help="a train_reader.py output folder")
    p.add_argument("out", help="the adapter folder to write")
    p.add_argument("--adapter", default=str(ADAPTER), help="the adapter to add the LoRA to")
    a = p.parse_args(argv)
    run, out = Path(a.run), Path(a.out)
    meta, weights = read_adapter(a.adapter)
    reader = json.loads((run / "reader.json").read_text())
    lora = mx.load(str(run / "reader_lora.safetensors"))
    weights = {**weights, **lora}
    meta = {k: v for k, v in meta.items() if k != "version"}
    meta["parameters"] = {name: list(w.shape) for name, w in sorted(weights.items())}
    meta["train"] = [*meta.get("train", []), "reader"]
    meta["lora_scale"] = reader["scale"]
    meta["reader"] = {k: v for k, v in reader.items() if k != "scale"}
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / ADAPTER_WEIGHTS), weights)
    (out / ADAPTER_JSON).write_text(json.dumps(meta, indent=1) + "\n")
    read_adapter(out)
    print(f"wrote {out}: {len(lora)} LoRA factors (rank {reader['rank']}, step {reader['step']})")


if __name__ == "__main__":
    main()
