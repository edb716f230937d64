"""Shared file helpers: atomic writes, JSON configs, fingerprints, the cache directory and run directories
(their `config.json` and the package versions recorded with every result).

Every artifact in saealign goes through these so that an interrupted write never leaves a
half-written file behind, and so that "what does this artifact belong to" is computed one way.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch


def cache_dir() -> Path:
    """Root of saealign's cache (`SAEALIGN_CACHE`, default `~/.cache/saealign`)."""
    root = Path(os.environ.get("SAEALIGN_CACHE", Path.home() / ".cache" / "saealign"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; artifacts get normal permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path` (which must not exist); on success it is renamed to
    `path`, so the files written into it (e.g. tensors and their config) appear together or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Write a safetensors file atomically; returns its manifest (`tensor_manifest`) for the artifact's config."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return tensor_manifest(tensors)


# Values no saealign artifact can hold legitimately (sums of densities, residual means, SAE weights):
# a file with larger ones is corrupt, not unusual.
MAX_ABS = 1e20


def tensor_manifest(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Per tensor: shape, dtype and a sha256 of its bytes, recorded in a config so that loading can
    tell the tensors are the ones written with it."""
    return {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "sha256": _tensor_sha256(t)}
            for name, t in sorted(tensors.items())}


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def check_values(tensors: dict[str, torch.Tensor], source: str | os.PathLike, max_abs: float = MAX_ABS) -> None:
    """Refuse non-finite or absurdly large values: a corrupt artifact must not load and run silently."""
    for name, t in tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"{source}: tensor {name!r} has {bad} non-finite value(s) (NaN/inf); the file is corrupt")
        biggest = float(t.abs().max())
        if biggest > max_abs:
            raise ValueError(f"{source}: tensor {name!r} has a value of magnitude {biggest:.3g} (> {max_abs:g}); "
                             "the file is corrupt")


def load_tensors(path: str | os.PathLike, manifest: dict[str, dict[str, Any]] | None = None,
                 max_abs: float = MAX_ABS) -> dict[str, torch.Tensor]:
    """Load a safetensors file, checked: readable, finite, not absurd, and equal to `manifest` (names,
    shapes, dtypes, checksums) when the config recorded one. Every error names the file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors' own errors do not name the file
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    if manifest is not None:
        missing, extra = sorted(set(manifest) - set(tensors)), sorted(set(tensors) - set(manifest))
        if missing:
            raise ValueError(f"{path}: missing tensor {missing[0]!r} that its config records (have {sorted(tensors)})")
        if extra:
            raise ValueError(f"{path}: tensor {extra[0]!r} is not among those its config records ({sorted(manifest)})")
        for name, want in manifest.items():
            got = tensors[name]
            if list(got.shape) != list(want["shape"]) or str(got.dtype).removeprefix("torch.") != want["dtype"]:
                raise ValueError(f"{path}: tensor {name!r} is {str(got.dtype).removeprefix('torch.')} {list(got.shape)}, "
                                 f"its config records {want['dtype']} {want['shape']}")
    check_values(tensors, path, max_abs)
    for name, want in (manifest or {}).items():
        if _tensor_sha256(tensors[name]) != want["sha256"]:
            raise ValueError(f"{path}: tensor {name!r} does not match the checksum in its config "
                             "(changed after it was written, or written by an interrupted save)")
    return tensors


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def tensor_fingerprint(tensors: dict[str, torch.Tensor], config: dict[str, Any] | None = None) -> str:
    """A short stable hash of named tensors (and an optional config) — identifies weights."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if config is not None:
        digest.update(json.dumps(config, sort_keys=True, default=_json_default).encode())
    return digest.hexdigest()[:16]


def text_fingerprint(items: Any) -> str:
    """Hash of JSON-serialisable data (e.g. a list of preference triples)."""
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def safe_name(name: str) -> str:
    """A file-name-safe form of a model or judge name (`org/model` -> `org--model`)."""
    cleaned = "".join(c if c.isalnum() or c in "-_.+" else "-" for c in name.replace("/", "--"))
    return cleaned.strip(".") or "unnamed"


def require_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


_VERSIONED = ("saealign", "torch", "transformers", "numpy", "trl", "peft", "safetensors")


def versions() -> dict[str, str]:
    """Package versions, Python, platform and the accelerator, recorded next to every result."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in _VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    if "torch" in sys.modules:
        import torch

        out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return out


def start_run(out_dir: str | os.PathLike, config: dict[str, Any], generation_fields: Sequence[str]) -> None:
    """Write `config.json` (config + versions) into `out_dir`. Runs resume from the outputs already there,
    so a run whose `generation_fields` differ from the previous run's is refused rather than mixed in."""
    path = Path(out_dir) / "config.json"
    current = json.loads(json.dumps(config, default=str))
    if path.exists():
        previous = read_json(path).get("config", {})
        changed = [f for f in generation_fields if f in previous and previous[f] != current.get(f)]
        if changed:
            raise ValueError(f"{path}: the outputs in {out_dir} were generated with other {changed} "
                             f"({[previous[f] for f in changed]} vs {[current.get(f) for f in changed]}); "
                             "use a new output directory")
    write_json(path, {"config": current, "versions": versions()})
