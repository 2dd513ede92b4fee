"""The compiled nearest-centroid kernel of tree build and routing (`nearest.c`), loaded with ctypes.

The C source ships with the package and is compiled on first use with the system C compiler
(`$CC`, else `cc`/`gcc`/`clang`) for this CPU (`-O3 -march=native`), into a cache directory
(`$HIERMEM_NATIVE_CACHE`, else `$XDG_CACHE_HOME/hiermem/native`, else `~/.cache/hiermem/native`;
the temp directory when that is not writable)
keyed by the source, the compiler and the CPU, so a shared home directory never hands one CPU's
binary to another. Compiling takes ~0.5 s once per machine; writes are atomic.

Fallback (documented, logged once): with no working compiler, or with `HIERMEM_NATIVE=0`, or for
trees with more than 16 children per node, `kernel()` returns None and routing uses its numpy/BLAS
path. The two paths give the same paths except on exact near-ties (their dot products round
differently); a tree built with one path and routed with the other may disagree there, which is why
build and route of one process always use the same path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

LANES = 16  # centroids per call: sets are padded to 16 columns (+inf norms for the padding)
SOURCE = Path(__file__).with_name("nearest.c")
_FLAGS = ["-O3", "-march=native", "-std=c99", "-ffp-contract=off", "-shared", "-fPIC"]
_lock = threading.Lock()
_state: dict[str, object] = {}


class NearestKernel:
    """ctypes wrapper of `hm_nearest_groups` (see nearest.c): one call handles many groups of rows,
    each against its own set of 16 centroids, with the GIL released."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        lib.hm_variant.restype = ctypes.c_char_p
        self.variant = lib.hm_variant().decode()
        fn = lib.hm_nearest_groups
        vp, i64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [vp, i64, vp, vp, vp, i64, vp, vp, vp]
        fn.restype = None
        self._fn = fn

    def __repr__(self) -> str:
        return f"NearestKernel({self.variant}, {self.path.name})"

    def nearest_groups(self, x: np.ndarray, idx: np.ndarray | None, starts: np.ndarray, sets: np.ndarray,
                       ct: np.ndarray, cn: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out[i] = argmin_j (cn[s, j] + x[row_i] . ct[s, :, j]) for positions i of group g
        (starts[g] <= i < starts[g + 1], s = sets[g]; row_i = idx[i], or i when idx is None).

        x (n, d) float32, idx (m,) int64, starts (G + 1,) int64, sets (G,) int64, ct (S, d, 16) and
        cn (S, 16) float32, out (m,) int64; all C-contiguous. Shapes and index ranges are checked
        here (a bad pointer would crash the interpreter, not raise)."""
        n, d = x.shape
        m = len(out)
        ok = (x.dtype == np.float32 and x.flags.c_contiguous and out.dtype == np.int64 and out.flags.c_contiguous
              and ct.dtype == np.float32 and ct.flags.c_contiguous and ct.shape[1:] == (d, LANES)
              and cn.dtype == np.float32 and cn.flags.c_contiguous and cn.shape == (len(ct), LANES)
              and starts.dtype == np.int64 and sets.dtype == np.int64 and len(starts) == len(sets) + 1
              and starts.flags.c_contiguous and sets.flags.c_contiguous)
        if not ok:
            raise TypeError("nearest_groups: arrays of the wrong dtype, shape or layout")
        if len(sets) == 0 or m == 0:
            return out
        if starts[0] != 0 or starts[-1] != m or (len(starts) > 2 and (np.diff(starts) < 0).any()):
            raise ValueError("nearest_groups: starts must rise from 0 to len(out)")
        if sets.min() < 0 or sets.max() >= len(ct):
            raise ValueError("nearest_groups: a centroid set index is out of range")
        if idx is None:
            if m > n:
                raise ValueError("nearest_groups: more positions than rows")
            idx_ptr = None
        else:
            if idx.dtype != np.int64 or not idx.flags.c_contiguous or len(idx) != m:
                raise TypeError("nearest_groups: idx must be a contiguous int64 array as long as out")
            if idx.min() < 0 or idx.max() >= n:
                raise ValueError("nearest_groups: a row index is out of range")
            idx_ptr = idx.ctypes.data
        self._fn(x.ctypes.data, d, idx_ptr, starts.ctypes.data, sets.ctypes.data, len(sets),
                 ct.ctypes.data, cn.ctypes.data, out.ctypes.data)
        return out


def pad_sets(ct: np.ndarray, cn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scorer sets (..., d, k) and norms (..., k) padded to 16 columns; padding never wins (+inf)."""
    k = ct.shape[-1]
    if k > LANES:
        raise ValueError(f"the compiled kernel handles at most {LANES} children per node, got {k}")
    if k == LANES:
        return np.ascontiguousarray(ct, dtype=np.float32), np.ascontiguousarray(cn, dtype=np.float32)
    ct16 = np.zeros(ct.shape[:-1] + (LANES,), dtype=np.float32)
    ct16[..., :k] = ct
    cn16 = np.full(cn.shape[:-1] + (LANES,), np.inf, dtype=np.float32)
    cn16[..., :k] = cn
    return ct16, cn16


def _disabled() -> bool:
    return os.environ.get("HIERMEM_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def _cache_dirs() -> list[Path]:
    """Where the compiled kernel is kept: the configured cache, then the temp directory (used when
    the first is not writable)."""
    if os.environ.get("HIERMEM_NATIVE_CACHE"):
        first = Path(os.environ["HIERMEM_NATIVE_CACHE"])
    else:
        first = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hiermem" / "native"
    return [first, Path(tempfile.gettempdir()) / f"hiermem-native-{os.getuid() if hasattr(os, 'getuid') else 0}"]


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    return None


def _cpu_signature() -> str:
    """Model and feature flags of this CPU (Linux), else what `platform` knows."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _compile(cc: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(tmp, target)  # atomic: a concurrent process sees the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> NearestKernel | None:
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler found ($CC, cc, gcc, clang): routing uses its numpy/BLAS path (slower)")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = cc
    errors = []
    for flags in (_FLAGS, [f for f in _FLAGS if f != "-march=native"]):  # some compilers lack -march=native
        key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, *flags, _cpu_signature()]).encode())
        for folder in _cache_dirs():
            target = folder / f"nearest-{key.hexdigest()[:16]}.so"
            try:
                if not target.exists():
                    _compile(cc, flags, target)
                return NearestKernel(ctypes.CDLL(str(target)), target)
            except subprocess.CalledProcessError as err:
                errors.append((err.stderr or "").strip()[-400:])
                break  # the compiler rejected these flags: another folder will not help
            except (OSError, subprocess.SubprocessError) as err:
                errors.append(f"{folder}: {err}")
    log.warning("could not build the routing kernel with %s (%s): routing uses its numpy/BLAS path (slower)",
                cc, " | ".join(errors))
    return None


def kernel() -> NearestKernel | None:
    """The compiled kernel, built on first use; None when disabled or unavailable (see module doc)."""
    if _disabled():
        return None
    with _lock:
        if "kernel" not in _state:
            _state["kernel"] = _load()
            if _state["kernel"] is not None:
                log.debug("routing kernel: %r", _state["kernel"])
        return _state["kernel"]  # type: ignore[return-value]
