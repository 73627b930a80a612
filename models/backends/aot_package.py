"""Ahead-of-time compiled CPU predictors: an AOTInductor package built once, cached, loaded fast.

`torch.compile` in every worker costs its start-up (about 14 s for B/16 on 2 cores) and its
memory: Dynamo, Inductor and sympy stay imported, and tracing plus the C++ build leave about
265 MB resident. Here the frozen `FusedMixer` is exported and compiled once by AOTInductor
(`torch.export` + `aoti_compile_and_package`, freezing on: oneDNN-prepacked weights live in
the package as constants), in a child process so none of the compiler's memory is ever the
worker's. Workers run the package's shared library with torch's C++ runner (`torch._C._aoti`),
which imports nothing of Inductor, in-process.

Static int8 (torch_int8.py) is packaged the same way: the child quantizes, calibrates and
compiles, so a worker loading it never imports torchao either; its key adds the quantization
recipe (torch_int8.package_recipe: recipe version, torchao's version, mixed bf16).

Packages are cached under a key made of everything that determines them: the weights'
sha256, the model's geometry, precision, batch shape, the FusedMixer source, the torch
version, the CPU's instruction sets (kernels and prepacked weight layouts are chosen for
them) and the C library. The compiler is not in the key: a package loads without one, so a
worker image without g++ can use a package built elsewhere. The cache is a local folder,
optionally backed by any `CacheStore` (an S3 prefix: pipeline/engine_cache.py), so a cluster
compiles each package once.

Memory: the runner copies the constants out of the mapped shared library into its own buffer;
the mapped pages are then dead weight counted in the resident set, so they are handed back to
the kernel (madvise MADV_PAGEOUT, which never changes what a page reads). That buffer is
misaligned for AMX (see AotModel), so the constants move once more, into aligned tensors, and
the buffer's pages go back too: the worker holds its weights once. (B/16, 2-core AMX Xeon:
the int8 package's GEMMs run 0.79x on the runner's buffer, bf16's 0.64x to 0.74x.)
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from models.backends.auto import cpu_info
from models.backends.base import BackendError
from models.backends.cache import CacheStore, LocalCacheStore
from models.mixer import MixerConfig, MlpMixer

log = logging.getLogger(__name__)
FORMAT = 1  # bump when what a package holds, or how it is called, changes
KEY_METADATA = "mixer_label_key"  # the cache key, stored in the package's own metadata
ISA_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
BUILD_TIMEOUT_S = 1800
MADV_DONTNEED = 4
MADV_PAGEOUT = 21  # Linux >= 5.4; older kernels answer EINVAL, which is harmless


def package_key(
    config: MixerConfig,
    weights_sha256: str,
    precision: str,
    batch_size: int,
    gelu_by_table: bool,
    recipe: dict[str, object] | None = None,
) -> str:
    """The cache key (a plain file name) of the package for exactly these inputs on this host.

    `recipe`: whatever else decides what is compiled (int8: the quantization recipe's version,
    torchao's version, mixed bf16; torch_int8.package_recipe).
    """
    from models.backends import torch_fused

    info = cpu_info()
    determinants = {
        "recipe": recipe,
        "format": FORMAT,
        "weights_sha256": weights_sha256,
        "config": config.to_dict(),
        "precision": precision,
        "batch_size": batch_size,
        "gelu_by_table": gelu_by_table,
        "fused_source": hashlib.sha256(Path(torch_fused.__file__).read_bytes()).hexdigest(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "libc": "-".join(platform.libc_ver()),
        "capability": info.capability,
        "isa": sorted(f for f in ISA_FLAGS if f in info.flags),
        "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")
        or os.environ.get("DNNL_MAX_CPU_ISA"),
    }
    digest = hashlib.sha256(json.dumps(determinants, sort_keys=True).encode()).hexdigest()
    return f"aoti-{precision}-b{batch_size}-{digest[:32]}.pt2"


class AotModel:
    """A loaded package: `model(batch)` returns (fp32 logits, fp32 features) of one batch shape.

    `library` is the package's shared library, extracted (`extract_library`). It is run by
    torch's C++ container runner, which holds the constants in one malloc'd buffer at 16 bytes
    past a 64-byte line: oneDNN's AMX kernels then read every weight tile across two cache
    lines (B/16: 0.64x the speed of the same kernels on aligned weights). So the constants are
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
        with (
            tempfile.NamedTemporaryFile(dir=package.parent, prefix=".tmp-", delete=False) as f,
            archive.open(member) as source,
        ):
            shutil.copyfileobj(source, f, 1 << 20)
            f.flush()
            os.fsync(f.fileno())  # clean pages: MADV_PAGEOUT cannot drop dirty ones (AotModel)
    Path(f.name).replace(target)
    return target


def load_or_build(
    model: MlpMixer,
    sha256: str,
    precision: str,
    batch_size: int,
    cache_dir: Path,
    cache_store: CacheStore | None = None,
    release_source: bool = False,
    threads: int | None = None,
    recipe: dict[str, object] | None = None,
) -> tuple[AotModel, dict[str, object]]:
    """The packaged model for one batch shape, and how it was obtained.

    fp32 / bf16 package `FusedMixer`; int8 packages the static int8 graph of torch_int8.py
    (quantized and calibrated in the child too: the worker never imports torchao), and
    `recipe` is then torch_int8.package_recipe(). Looks in `cache_dir`, then `cache_store`; a
    package that fails to load there is logged and rebuilt. Building compiles in a child
    process and writes both caches. `release_source` moves `model`'s weights to the meta
    device as soon as they are no longer needed (before loading a cached package: they are
    never converted at all then).
    """
    if precision not in ("fp32", "bf16", "int8"):
        raise BackendError(f"AOT packages run fp32, bf16 or int8, not {precision!r}")
    if (precision == "int8") != (recipe is not None):
        raise BackendError("an int8 AOT package needs its recipe, and only int8 has one")
    gelu_by_table = precision == "bf16"
    key = package_key(model.config, sha256, precision, batch_size, gelu_by_table, recipe)
    local = LocalCacheStore(cache_dir)
    path = local.path(key)
    start = time.perf_counter()
    found = _from_caches(key, path, local, cache_store, model, release_source, start)
    if found is not None:
        return found
    # Actors starting together on one node build once: the others wait, then load it.
    with _build_lock(path):
        found = _from_caches(key, path, local, None, model, release_source, start)
        if found is not None:
            return found
        return _build(
            model,
            key,
            precision,
            batch_size,
            path,
            cache_store,
            release_source,
            threads,
            start,
            recipe,
            gelu_by_table,
        )


def _from_caches(key, path, local, cache_store, model, release_source, start):
    """(loaded package, info) from the local folder, then `cache_store`; None if neither has
    a usable one (an unusable one is deleted)."""
    for source in ("local", "store"):
        if source == "store":
            data = cache_store.get(key) if cache_store is not None else None
            if data is None:
                continue
            local.put(key, data)
            del data
        elif not path.exists():
            continue
        problem = check_package(path, key)
        if problem:
            log.warning("cached AOT package %s is unusable (%s); rebuilding", path, problem)
            path.unlink(missing_ok=True)
            continue
        if release_source:  # a checked package needs no weights: free them before loading
            model.to("meta")
        try:
            loaded = AotModel(extract_library(path))
        except BackendError as err:
            path.unlink(missing_ok=True)
            if release_source:  # nothing left to rebuild from here; a new predictor will
                raise BackendError(f"{err}; removed it, create the predictor again") from None
            log.warning("%s; rebuilding", err)
            continue
        info = {"key": key, "source": source, "seconds": time.perf_counter() - start}
        log.info("AOT package from the %s cache: %s", source, key)
        return loaded, info
    return None


@contextlib.contextmanager
def _build_lock(path: Path):
    """An exclusive lock on `path`'s build, shared by every process on this machine."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(
    model,
    key,
    precision,
    batch_size,
    path,
    cache_store,
    release_source,
    threads,
    start,
    recipe,
    gelu_by_table,
):
    """Compile the package for `key` into `path` (and `cache_store`), then load it."""
    from models.backends.torch_backend import DTYPES
    from models.backends.torch_fused import FusedMixer

    if precision == "int8":  # the child quantizes the fp32 model itself
        # Released only once built: a failed build leaves the caller its weights to fall back on.
        build_in_child(model, model.config, batch_size, path, key, threads, recipe)
        if release_source:
            model.to("meta")
    else:
        module = FusedMixer(model, DTYPES[precision], gelu_by_table=gelu_by_table).eval()
        if release_source:
            model.to("meta")
        build_in_child(module, model.config, batch_size, path, key, threads)
        del module
    loaded = AotModel(extract_library(path))
    if cache_store is not None:
        cache_store.put(key, path.read_bytes())
    info = {"key": key, "source": "built", "seconds": time.perf_counter() - start}
    log.info("AOT package built in %.0f s: %s", info["seconds"], key)
    return loaded, info


def check_package(path: Path, key: str) -> str | None:
    """What is wrong with the package file at `path` for `key` (CRCs, metadata), or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            if bad:
                return f"member {bad} fails its CRC"
            names = [n for n in archive.namelist() if n.endswith("wrapper_metadata.json")]
            if len(names) != 1:
                return "no AOTInductor model in the archive"
            metadata = json.loads(archive.read(names[0]))
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        return str(err) or type(err).__name__
    if metadata.get(KEY_METADATA) != key:
        return f"built for key {metadata.get(KEY_METADATA)!r}"
    return None


def build_in_child(
    module: torch.nn.Module,
    config: MixerConfig,
    batch_size: int,
    path: Path,
    key: str,
    threads: int | None = None,
    recipe: dict[str, object] | None = None,
) -> None:
    """Compile `module` into the package `path` in a fresh Python process (its memory, not ours).

    The module travels as a safetensors file of its state plus the config to rebuild it: a
    `FusedMixer`, or with an int8 `recipe` the fp32 `MlpMixer` that the child quantizes.
    """
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp:
        weights = Path(tmp) / "module.safetensors"
        state = {k: v.contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(weights))
        del state
        request = {
            "config": config.to_dict(),
            "recipe": recipe,
            "batch_size": batch_size,
            "weights": str(weights),
            "package": str(Path(tmp) / "model.pt2"),
            "key": key,
            "threads": threads or torch.get_num_threads(),
        }
        if recipe is None:
            request["dtype"] = str(module.dtype).removeprefix("torch.")
            request["gelu_by_table"] = module.gelu_by_table
        root = str(Path(__file__).resolve().parents[2])  # the folder holding `models`
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        }
        args = [sys.executable, "-m", "models.backends.aot_package", json.dumps(request)]
        try:
            done = subprocess.run(
                args, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            raise BackendError(f"AOT compile of {key} took over {BUILD_TIMEOUT_S} s") from None
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            raise BackendError(f"AOT compile of {key} failed: {lines[-1]}")
        Path(request["package"]).replace(path)


def compile_package(
    module: torch.nn.Module, image_size: int, batch_size: int, package: str | Path, key: str
) -> None:
    """Export `module` at one batch shape and compile it with AOTInductor (freezing on)."""
    import warnings

    size = image_size
    example = torch.zeros(batch_size, 3, size, size)
    with torch.no_grad(), warnings.catch_warnings(), _unique_constant_fqns():
        warnings.simplefilter("ignore")
        exported = torch.export.export(module, (example,))
        torch._inductor.aoti_compile_and_package(
            exported,
            package_path=str(package),
            inductor_configs={
                "freezing": True,  # weights become constants, oneDNN prepacks them
                "aot_inductor.metadata": {KEY_METADATA: key},
            },
        )


def _child_main(request: dict) -> None:
    """Rebuild the module from its state and config (int8: quantize it), compile it."""
    from safetensors.torch import load_file

    torch.set_num_threads(int(request["threads"]))
    config = MixerConfig.from_dict(request["config"])
    batch_size, package = int(request["batch_size"]), request["package"]
    with torch.device("meta"):
        source = MlpMixer(config)
    if request.get("recipe") is not None:
        from models.backends.torch_int8 import package_module

        source.load_state_dict(load_file(request["weights"]), assign=True)
        module = package_module(source, batch_size, request["recipe"])  # no .eval(): PT2E
    else:
        from models.backends.torch_fused import FusedMixer

        dtype = getattr(torch, request["dtype"])
        module = FusedMixer(source, dtype, gelu_by_table=request["gelu_by_table"])
        module.load_state_dict(load_file(request["weights"]), assign=True)
        module.eval()
    compile_package(module, config.image_size, batch_size, package, request["key"])


@contextlib.contextmanager
def _unique_constant_fqns():
    """Give every constant Inductor adds its own original FQN while compiling a package.

    The int8 lowering adds each activation scale and zero point as a constant named "x_scale"
    / "x_zp"; Inductor numbers the names but records the bare name as each one's original
    FQN, and the runner's extract_constants_map is keyed by FQN, so all but one would be
    invisible to _realign_constants. Where Inductor's internals differ, nothing is patched:
    _realign_constants then keeps the runner's buffer (correct, slower on AMX).
    """
    try:
        from torch._inductor.graph import GraphLowering
    except ImportError:
        yield
        return
    original = getattr(GraphLowering, "allocate_non_dup_const_name", None)
    if original is None:
        yield
        return

    def allocate(self, name, data):
        new_name = original(self, name, data)
        named = getattr(self, "allocated_constant_name", None)
        if isinstance(named, dict) and new_name != name and named.get(new_name) == name:
            named[new_name] = new_name  # a numbered duplicate: its own name is its FQN
        return new_name

    GraphLowering.allocate_non_dup_const_name = allocate
    try:
        yield
    finally:
        GraphLowering.allocate_non_dup_const_name = original


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


if __name__ == "__main__":
    _child_main(json.loads(sys.argv[1]))
