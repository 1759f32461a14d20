"""Safe writing of products: atomic (temporary file in the same folder + rename), so an
interrupted run never leaves a half-written product behind."""
from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import SpecredError


def _file_mode() -> int:
    """Permissions of a newly created file under the current umask (mkstemp uses 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path):
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    On any error the temporary file is removed and an OSError becomes a SpecredError
    naming the product (disk full, permission denied, ...).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise SpecredError(f"cannot write {path}: {exc.strerror or exc}") from exc
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SpecredError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_fits(hdul, path, **kw) -> Path:
    with atomic_path(path) as tmp:
        hdul.writeto(tmp, overwrite=True, **kw)
    return Path(path)


def atomic_write_table(table, path, format: str | None = None) -> Path:
    path = Path(path)
    fmt = format or ("ascii.ecsv" if path.suffix == ".ecsv" else None)
    with atomic_path(path) as tmp:
        table.write(tmp, format=fmt, overwrite=True)
    return path


def atomic_write_text(text: str, path) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


_SHA_CACHE: dict[tuple, str] = {}


def sha256(path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content.  Remembered per (path, size, mtime) within a
    process: a night hashes each raw frame for its up-to-date check and again for the
    provenance of every product made from it."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(chunk), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def safe_name(text, keep: str = "+-._") -> str:
    """``text`` with every character other than letters, digits and ``keep`` replaced by
    ``_``: how products, QC plots and report anchors are named after targets."""
    return "".join(c if c.isalnum() or c in keep else "_" for c in str(text))
