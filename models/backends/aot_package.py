"""Ahead-of-time compiled CPU predictors: an AOTInductor package built once, cached, loaded fast.

`torch.compile` in every worker costs its start-up (seconds per model) and its memory:
Dynamo, Inductor and sympy stay imported, and tracing plus the C++ build leave hundreds of MB
resident (BENCHMARKS.md). Here the frozen `FusedMixer` is exported and compiled once by AOTInductor
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

Three modules: this one (the key, the caches, `load_or_build`), aot_build.py (the child
process that compiles) and aot_runtime.py (the loaded package, its weights held once).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import platform
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from models.backends.aot_build import KEY_METADATA, build_in_child
from models.backends.aot_runtime import AotModel, extract_library
from models.backends.base import BackendError
from models.backends.cache import CacheStore, LocalCacheStore, file_lock
from models.backends.hardware import cpu_info
from models.backends.torch_fused import FusedMixer
from models.backends.torch_helpers import DTYPES
from models.mixer import MixerConfig, MlpMixer

log = logging.getLogger(__name__)
FORMAT = 1  # bump when what a package holds, or how it is called, changes
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
    info = cpu_info()
    determinants = {
        "recipe": recipe,
        "format": FORMAT,
        "weights_sha256": weights_sha256,
        "config": config.to_dict(),
        "precision": precision,
        "batch_size": batch_size,
        "gelu_by_table": gelu_by_table,
        "fused_source": hashlib.sha256(Path(inspect.getfile(FusedMixer)).read_bytes()).hexdigest(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "libc": "-".join(platform.libc_ver()),
        "capability": info.capability,
        "isa": sorted(f for f in ISA_FLAGS if f in info.flags),
        "onednn_max_isa": info.isa_cap or None,
    }
    digest = hashlib.sha256(json.dumps(determinants, sort_keys=True).encode()).hexdigest()
    return f"aoti-{precision}-b{batch_size}-{digest[:32]}.pt2"


@dataclass
class PackageRequest:
    """One package to load or build: the model, its shape and where it is cached."""

    model: MlpMixer
    sha256: str
    precision: str
    batch_size: int
    cache_dir: Path
    cache_store: CacheStore | None = None
    release_source: bool = False  # move the model's weights to meta once no longer needed
    threads: int | None = None
    recipe: dict[str, object] | None = None  # int8: torch_int8.package_recipe()

    @property
    def gelu_by_table(self) -> bool:
        return self.precision == "bf16"

    @property
    def key(self) -> str:
        return package_key(
            self.model.config,
            self.sha256,
            self.precision,
            self.batch_size,
            self.gelu_by_table,
            self.recipe,
        )


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
    request = PackageRequest(
        model,
        sha256,
        precision,
        batch_size,
        Path(cache_dir),
        cache_store,
        release_source,
        threads,
        recipe,
    )
    key = request.key
    local = LocalCacheStore(request.cache_dir)
    path = local.path(key)
    start = time.perf_counter()
    found = _from_caches(request, key, local, cache_store, start)
    if found is not None:
        return found
    # Actors starting together on one node build once: the others wait, then load it.
    with file_lock(path):
        found = _from_caches(request, key, local, None, start)
        if found is not None:
            return found
        return _build(request, key, path, start)


def _from_caches(request: PackageRequest, key: str, local: LocalCacheStore, cache_store, start):
    """(loaded package, info) from the local folder, then `cache_store`; None if neither has
    a usable one (an unusable one is deleted)."""
    path = local.path(key)
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
        if request.release_source:  # a checked package needs no weights: free them first
            request.model.to("meta")
        try:
            loaded = AotModel(extract_library(path))
        except BackendError as err:
            path.unlink(missing_ok=True)
            if request.release_source:  # nothing left to rebuild from here; a new predictor will
                raise BackendError(f"{err}; removed it, create the predictor again") from None
            log.warning("%s; rebuilding", err)
            continue
        info = {"key": key, "source": source, "seconds": time.perf_counter() - start}
        log.info("AOT package from the %s cache: %s", source, key)
        return loaded, info
    return None


def _build(request: PackageRequest, key: str, path: Path, start: float):
    """Compile the package for `key` into `path` (and the cache store), then load it."""
    model, config = request.model, request.model.config
    if request.precision == "int8":  # the child quantizes the fp32 model itself
        # Released only once built: a failed build leaves the caller its weights to fall back on.
        build_in_child(
            model, config, request.batch_size, path, key, request.threads, request.recipe
        )
        if request.release_source:
            model.to("meta")
    else:
        dtype = DTYPES[request.precision]
        module = FusedMixer(model, dtype, gelu_by_table=request.gelu_by_table).eval()
        if request.release_source:
            model.to("meta")
        build_in_child(module, config, request.batch_size, path, key, request.threads)
        del module
    loaded = AotModel(extract_library(path))
    if request.cache_store is not None:
        request.cache_store.put(key, path.read_bytes())
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
