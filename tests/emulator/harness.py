"""Run a `kernels.Launch` on the CPU: its Metal body compiled as C++ by g++.

The translation unit is what `mx.fast.metal_kernel` hands to Apple's compiler, with
`metal_shim.h` in place of MLX's Metal preamble: the header, the signature MLX
generates (template line, buffers, shape arguments, thread attributes), the body and
the explicit instantiation; then a `main` that loads the inputs, runs the dispatch
with `emu_runtime.h` and saves the outputs. Binaries are cached by the hash of that
source.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_sharedllm.kernels import Launch

HERE = Path(__file__).parent
CXX_FLAGS = [
    "-std=c++14",
    "-O1",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wno-attributes",
    "-Wno-unused-parameter",
]
MAX_CONSTANT_SIZE = 8  # MLX passes smaller inputs in the constant address space
TYPE_NAMES = {
    mx.float32: "float",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.int32: "int32_t",
    mx.uint32: "uint32_t",
    mx.bool_: "bool",
}
NUMPY_TYPES = {
    mx.float32: np.float32,
    mx.float16: np.float16,
    mx.int32: np.int32,
    mx.uint32: np.uint32,
    mx.bool_: np.bool_,
}
# The thread attributes MLX adds when the body names them (in MLX's order), and the
# expression the driver passes for each: `t` is the emulated thread, `G`/`TG` the grid
# and threadgroup sizes.
ATTRIBUTES = {
    "dispatch_quadgroups_per_threadgroup": ("uint", "(TG.x * TG.y * TG.z + 3) / 4"),
    "dispatch_simdgroups_per_threadgroup": ("uint", "(TG.x * TG.y * TG.z + 31) / 32"),
    "dispatch_threads_per_threadgroup": ("uint3", "TG"),
    "grid_origin": ("uint3", "uint3{0, 0, 0}"),
    "grid_size": ("uint3", "G"),
    "quadgroup_index_in_threadgroup": ("uint", "t.index_in_group / 4"),
    "quadgroups_per_threadgroup": ("uint", "(TG.x * TG.y * TG.z + 3) / 4"),
    "simdgroup_index_in_threadgroup": ("uint", "t.simd_group"),
    "simdgroups_per_threadgroup": ("uint", "(TG.x * TG.y * TG.z + 31) / 32"),
    "thread_execution_width": ("uint", "32"),
    "thread_index_in_quadgroup": ("uint", "t.index_in_group % 4"),
    "thread_index_in_simdgroup": ("uint", "t.simd_lane"),
    "thread_index_in_threadgroup": ("uint", "t.index_in_group"),
    "thread_position_in_grid": ("uint3", "to_uint3(t.pos_in_grid)"),
    "thread_position_in_threadgroup": ("uint3", "to_uint3(t.pos_in_group)"),
    "threadgroup_position_in_grid": ("uint3", "to_uint3(t.group_pos)"),
    "threadgroups_per_grid": ("uint3", "uint3{G.x / TG.x, G.y / TG.y, G.z / TG.z}"),
    "threads_per_grid": ("uint3", "G"),
    "threads_per_simdgroup": ("uint", "32"),
    "threads_per_threadgroup": ("uint3", "TG"),
}


class EmulatorError(RuntimeError):
    """The kernel did not compile, or its dispatch failed (crash, deadlock, race)."""


def _as_array(x) -> mx.array:
    return x if isinstance(x, mx.array) else mx.array(x)


def _template_value(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return TYPE_NAMES[value]


def _template_kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    return "int" if isinstance(value, int) else "typename"


def kernel_name(launch: Launch) -> str:
    """The name MLX gives the instantiated kernel (template, input and output dtypes)."""
    name = "custom_kernel_" + launch.spec.name
    if launch.template:
        name += "__" + "_".join(_template_value(v) for _, v in launch.template)
    for x in map(_as_array, launch.inputs):
        name += "_" + TYPE_NAMES[x.dtype]
        name += "s" if x.ndim == 0 else ("c" if x.size < MAX_CONSTANT_SIZE else "")
    return name + "".join("_" + TYPE_NAMES[d] for d in launch.output_dtypes)


def _input_params(name: str, x: mx.array, source: str, slot: int) -> list[str]:
    space = "constant" if x.size < MAX_CONSTANT_SIZE else "device"
    ref = "&" if x.ndim == 0 else "*"
    params = [f"const {space} {TYPE_NAMES[x.dtype]}{ref} {name} [[buffer({slot})]]"]
    if x.ndim:
        for suffix, ctype in (("shape", "int*"), ("strides", "int64_t*"), ("ndim", "int&")):
            if f"{name}_{suffix}" in source:
                params.append(
                    f"const constant {ctype} {name}_{suffix} [[buffer({slot + len(params)})]]"
                )
    return params


def _shape_arrays(index: int, name: str, x: mx.array, source: str) -> tuple[list[str], list[str]]:
    """Declarations and arguments for the `<name>_shape/_strides/_ndim` the body uses."""
    strides = [int(np.prod(x.shape[i + 1 :])) for i in range(x.ndim)]
    decls, args = [], []
    for suffix, ctype, value in (("shape", "int", x.shape), ("strides", "int64_t", strides)):
        if f"{name}_{suffix}" in source:
            decls.append(
                f"  static const {ctype} in{index}_{suffix}[] = {{{', '.join(map(str, value))}}};"
            )
            args.append(f"in{index}_{suffix}")
    if f"{name}_ndim" in source:
        decls.append(f"  static const int in{index}_ndim = {x.ndim};")
        args.append(f"in{index}_ndim")
    return decls, args


def translation_unit(launch: Launch, source: str, header: str) -> str:
    """The C++ source of one emulated dispatch of `launch` with this body and header."""
    spec, inputs = launch.spec, [_as_array(x) for x in launch.inputs]
    name = kernel_name(launch)
    params: list[str] = []
    for input_name, x in zip(spec.input_names, inputs):
        params += _input_params(input_name, x, source, len(params))
    for out_name, dtype in zip(spec.output_names, launch.output_dtypes):
        params.append(f"device {TYPE_NAMES[dtype]}* {out_name} [[buffer({len(params)})]]")
    attrs = [a for a in ATTRIBUTES if a in source]
    params += [f"{ATTRIBUTES[a][0]} {a} [[{a}]]" for a in attrs]
    lines = ['#include "metal_shim.h"', header]
    instance = name
    if launch.template:
        kinds = ", ".join(f"{_template_kind(v)} {k}" for k, v in launch.template)
        lines.append(f"template <{kinds}>")
        instance += "<" + ", ".join(_template_value(v) for _, v in launch.template) + ">"
    lines += [f"[[kernel]] void {name}(", ",\n".join("  " + p for p in params) + ") {"]
    lines += [source, "}"]
    if launch.template:
        lines.append(
            f'template [[host_name("{name}")]] [[kernel]] decltype({instance}) {instance};'
        )
    lines.append(_driver(launch, inputs, instance, attrs, source))
    return "\n".join(lines) + "\n"


def _driver(
    launch: Launch, inputs: list[mx.array], kernel: str, attrs: list[str], source: str
) -> str:
    body = [
        "int main(int argc, char** argv) {",
        "  if (argc != 3) return 2;",
        "  emu::Buffers io(argv[1]);",
    ]
    args: list[str] = []
    for i, (name, x) in enumerate(zip(launch.spec.input_names, inputs)):
        ctype = TYPE_NAMES[x.dtype]
        if x.ndim == 0:
            body.append(f"  const {ctype}& in{i} = *io.input<{ctype}>({i});")
            args.append(f"in{i}")
            continue
        body.append(f"  const {ctype}* in{i} = io.input<{ctype}>({i});")
        decls, extra = _shape_arrays(i, name, x, source)
        body += decls
        args += [f"in{i}", *extra]
    for i, (shape, dtype) in enumerate(zip(launch.output_shapes, launch.output_dtypes)):
        ctype = TYPE_NAMES[dtype]
        body.append(f"  {ctype}* out{i} = io.output<{ctype}>({int(np.prod(shape)) * dtype.size});")
        args.append(f"out{i}")
    args += [ATTRIBUTES[a][1] for a in attrs]
    grid, group = launch.grid, launch.threadgroup
    body += [
        f"  const uint3 G{{{grid[0]}, {grid[1]}, {grid[2]}}};",
        f"  const uint3 TG{{{group[0]}, {group[1]}, {group[2]}}};",
        "  io.run(emu::Dim3{G.x, G.y, G.z}, emu::Dim3{TG.x, TG.y, TG.z}, [&](const emu::Lane& t) {",
        f"    {kernel}({', '.join(args)});",
        "  });",
        "  io.save(argv[2]);",
        "  return 0;",
        "}",
    ]
    return "\n".join(body)


def _to_numpy(x: mx.array) -> np.ndarray:
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.ascontiguousarray(np.array(x))


def _from_bytes(data: bytes, shape: tuple[int, ...], dtype: mx.Dtype) -> mx.array:
    if dtype == mx.bfloat16:
        return mx.array(np.frombuffer(data, np.uint16).reshape(shape)).view(mx.bfloat16)
    return mx.array(np.frombuffer(data, NUMPY_TYPES[dtype]).reshape(shape))


class Emulator:
    """Compiles (once per source, cached in `cache_dir`) and runs emulated dispatches."""

    def __init__(self, cache_dir: Path, compiler: str = "g++"):
        self.cache_dir = Path(cache_dir)
        self.compiler = shutil.which(compiler)

    def _precompile_shim(self) -> None:
        """Precompile metal_shim.h once (g++ uses it when flags match, else the header)."""
        pch = self.cache_dir / "metal_shim.h.gch"
        if not pch.exists():
            cmd = [self.compiler, *CXX_FLAGS[:2], "-x", "c++-header", str(HERE / "metal_shim.h")]
            subprocess.run([*cmd, "-o", str(pch)], capture_output=True)

    def build(self, launch: Launch, source: str | None = None, header: str | None = None) -> Path:
        """The binary for `launch`, or for it with another kernel body or header."""
        if self.compiler is None:
            raise EmulatorError("no C++ compiler (g++) found")
        self._precompile_shim()
        unit = translation_unit(
            launch,
            launch.spec.source if source is None else source,
            launch.spec.header if header is None else header,
        )
        digest = hashlib.sha256((unit + " ".join(CXX_FLAGS)).encode()).hexdigest()[:20]
        binary = self.cache_dir / f"kernel_{digest}"
        if binary.exists():
            return binary
        cpp = self.cache_dir / f"kernel_{digest}.cpp"
        cpp.write_text(unit)
        tmp = binary.with_suffix(".tmp")
        cmd = [
            self.compiler,
            *CXX_FLAGS,
            f"-I{self.cache_dir}",
            f"-I{HERE}",
            str(cpp),
            "-o",
            str(tmp),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            raise EmulatorError(f"{launch.spec.name} does not compile:\n{result.stderr[-4000:]}")
        tmp.rename(binary)
        return binary

    def run(
        self, launch: Launch, source: str | None = None, header: str | None = None
    ) -> list[mx.array]:
        """Run `launch` on the CPU (optionally with another body or header); its outputs."""
        binary = self.build(launch, source, header)
        with tempfile.TemporaryDirectory(dir=self.cache_dir) as tmp:
            inputs, outputs = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
            _write_inputs(inputs, launch.inputs)
            result = subprocess.run(
                [str(binary), str(inputs), str(outputs)],
                capture_output=True,
                text=True,
                timeout=300,
            )
            if result.returncode:
                why = result.stderr.strip() or f"exit status {result.returncode}"
                if result.returncode < 0:
                    why += " (crashed: out-of-bounds access?)"
                raise EmulatorError(f"{launch.spec.name}: {why}")
            return _read_outputs(outputs.read_bytes(), launch)


def _write_inputs(path: Path, inputs: list) -> None:
    """The input file: a count, then the size and bytes of each input."""
    arrays = [_to_numpy(_as_array(x)) for x in inputs]
    with path.open("wb") as f:
        f.write(np.uint32(len(arrays)).tobytes())
        for a in arrays:
            f.write(np.uint64(a.nbytes).tobytes() + a.tobytes())


def _read_outputs(data: bytes, launch: Launch) -> list[mx.array]:
    out, offset = [], 0
    for shape, dtype in zip(launch.output_shapes, launch.output_dtypes):
        size = int(np.prod(shape)) * dtype.size
        out.append(_from_bytes(data[offset : offset + size], tuple(shape), dtype))
        offset += size
    return out
