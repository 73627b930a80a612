"""A loaded AOT package: the shared library run by torch's C++ runner, weights held once.

The runner copies the constants out of the mapped shared library into its own buffer; the
mapped pages are then dead weight counted in the resident set, so they are handed back to
the kernel (madvise MADV_PAGEOUT, which never changes what a page reads). That buffer is
misaligned for AMX (see AotModel), so the constants move once more, into aligned tensors, and
the buffer's pages go back too: the worker holds its weights once. Nothing of Inductor is
imported here.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import zipfile
from pathlib import Path

import torch

from models.backends.base import BackendError
from models.backends.cache import atomic_file

log = logging.getLogger(__name__)
MADV_DONTNEED = 4
MADV_PAGEOUT = 21  # Linux >= 5.4; older kernels answer EINVAL, which is harmless


class AotModel:
    """A loaded package: `model(batch)` returns (fp32 logits, fp32 features) of one batch shape.

    `library` is the package's shared library, extracted (`extract_library`). It is run by
    torch's C++ container runner, which holds the constants in one malloc'd buffer at 16 bytes
    past a 64-byte line: oneDNN's AMX kernels then read every weight tile across two cache
    lines, measurably slower than on aligned weights (BENCHMARKS.md). So the constants are
    copied into aligned tensors, the model is pointed at them, and the old buffer's pages are
    given back.
    """

    def __init__(self, library: str | Path) -> None:
        before = _mapped_files()
        try:
            runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(library), 1)
        except Exception as err:  # a .so that does not link here: say which file
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BackendError(f"{library}: not a loadable AOTInductor model ({first})") from None
        _page_out(_mapped_files() - before)  # the copied-out constants, still mapped from the file
        self.constants = _realign_constants(runner)  # the runner does not own these: keep them
        self.runner = runner

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.runner.run([batch.contiguous()])
        return logits, features


def extract_library(package: Path) -> Path:
    """The package's shared library, extracted beside it once (named by the member's CRC)."""
    with zipfile.ZipFile(package) as archive:
        names = [n for n in archive.namelist() if n.endswith(".so")]
        if len(names) != 1:
            raise BackendError(f"{package}: expected one shared library, found {len(names)}")
        member = archive.getinfo(names[0])
        target = package.with_name(f"{package.name}.{member.CRC:08x}.so")
        if target.exists() and target.stat().st_size == member.file_size:
            return target
        for stale in package.parent.glob(f"{package.name}.*.so"):  # from an older package
            stale.unlink(missing_ok=True)
        # atomic_file fsyncs: clean pages, which MADV_PAGEOUT can drop (AotModel); dirty ones not.
        with atomic_file(target) as f, archive.open(member) as source:
            shutil.copyfileobj(source, f, 1 << 20)
    return target


def _realign_constants(runner) -> dict[str, torch.Tensor]:
    """Copy the runner's constants into aligned tensors, use those, give the old pages back."""
    by_fqn: dict[str, list[str]] = {}
    for name, fqn in runner.get_constant_names_to_original_fqns().items():
        by_fqn.setdefault(fqn, []).append(name)
    old = runner.extract_constants_map(False)  # by original FQN; updates go by constant name
    spans = sorted(_span(t) for t in old.values())
    # A FQN shared by several constants names only one of them here, which one unknown: copying
    # it under any name could give that constant another's value, so those stay where they are.
    aligned = {by_fqn[f][0]: t.clone() for f, t in old.items() if len(by_fqn.get(f, ())) == 1}
    del old
    runner.update_constant_buffer(aligned, False, False, True)  # active buffer, not copied
    now = {_span(t) for t in runner.extract_constants_map(False).values()}
    if now != {_span(t) for t in aligned.values()}:  # some constant still reads the old buffer
        log.warning("AOT constants were not all replaced; keeping the old buffer")
        return aligned
    spans = [(start, end) for start, end in spans if end > start]
    # Only when the old constants tile one buffer (gaps are the runner's padding, under 64
    # bytes): then nothing else lives between the first and the last.
    gaps = [b[0] - a[1] for a, b in zip(spans, spans[1:], strict=False)]
    if spans and all(0 <= gap < 64 for gap in gaps):
        _discard_pages(spans[0][0], spans[-1][1])
    else:
        log.info("AOT constants do not tile one buffer; keeping it")
    return aligned


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes a constant occupies: [start, end)."""
    if tensor.layout == torch._mkldnn:  # oneDNN-prepacked weights: opaque to data_ptr()
        start = torch.ops.mkldnn.data_ptr(tensor)
        return start, start + torch.ops.mkldnn._nbytes(tensor)
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _discard_pages(start: int, end: int) -> None:
    """Drop the whole pages inside [start, end) of memory nothing reads again (MADV_DONTNEED).

    The partial first page keeps malloc's chunk header, so freeing the buffer later still works.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = -(-start // page) * page, end // page * page
    madvise = _madvise()
    if madvise is not None and last > first:
        madvise(first, last - first, MADV_DONTNEED)


def _madvise():
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # not Linux / glibc: keep the memory
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def _mapped_files() -> set[str]:
    """Paths of the files mapped into this process (Linux; empty elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    return {p[5] for p in map(str.split, lines) if len(p) >= 6 and p[5].startswith("/")}


def _page_out(paths: set[str]) -> None:
    """Hand the resident pages of these mapped files back to the kernel (content unchanged)."""
    madvise = _madvise()
    if not paths or madvise is None:
        return
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5] in paths:
            start, end = (int(v, 16) for v in parts[0].split("-"))
            madvise(start, end - start, MADV_PAGEOUT)
