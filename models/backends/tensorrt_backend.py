"""TensorRT 10/11: an engine built from the ONNX export, cached, run on torch CUDA tensors.

Build (once per cache key): builder -> strongly typed network (the precision lives in the
ONNX graph, see onnx_graph.py; TensorRT 11 has no other kind) -> ONNX parser -> builder
config with a workspace limit, one optimization profile for the batch range, and a timing
cache (kept beside the engines, so rebuilding for another batch profile is quick) ->
`build_serialized_network`.

The engine is cached under a key made of everything that makes a plan incompatible or
different: ONNX sha256, TensorRT version, GPU name and compute capability, precision and batch
profile. The cache is a local folder or any `CacheStore` (an S3 prefix adapter lets a
cluster build each engine once). A plan that no longer deserializes is rebuilt.

Run: `set_input_shape`, `set_tensor_address` for every I/O tensor (torch CUDA tensors), then
`execute_async_v3` on torch's current stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from models.backends.base import BackendError, Predictor
from models.backends.cache import CacheStore, LocalCacheStore, default_cache_dir
from models.backends.hardware import gpu_info
from models.backends.onnx_graph import FEATURES_NAME, export_cached
from models.export import INPUT_NAME, OUTPUT_NAME, onnx_sha256
from models.mixer import MlpMixer

PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
log = logging.getLogger(__name__)


def import_tensorrt():
    """The tensorrt module with its builder, or BackendError saying why not."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise BackendError(f"tensorrt does not import here ({err})") from None
    if not hasattr(trt, "Builder"):  # tensorrt_lean / tensorrt_dispatch: runtime only
        raise BackendError(f"tensorrt {trt.__version__} here has no builder (a runtime-only wheel)")
    return trt


@dataclass(frozen=True)
class EngineKey:
    """Everything that makes one serialized engine differ from another."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int

    def file_name(self) -> str:
        """A readable, unique file name: the fields that matter to a person, then a digest."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", self.gpu_name).strip("-").lower()
        return (
            f"mixer-{self.onnx_sha256[:12]}-{self.precision}"
            f"-b{self.min_batch}-{self.opt_batch}-{self.max_batch}"
            f"-trt{self.tensorrt_version}-{gpu}-sm{self.compute_capability.replace('.', '')}"
            f"-{digest[:12]}.plan"
        )

    def timing_cache_name(self) -> str:
        """Timing caches depend on TensorRT and the GPU only, not on the network."""
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", self.gpu_name).strip("-").lower()
        cc = self.compute_capability.replace(".", "")
        return f"timing-trt{self.tensorrt_version}-{gpu}-sm{cc}.cache"


class TensorRTPredictor(Predictor):
    """A cached TensorRT engine of the exported graph on one CUDA device."""

    name = "tensorrt"

    def __init__(
        self,
        model: MlpMixer,
        precision: str = "bf16",
        device: str = "cuda:0",
        batch_size: int | None = None,
        max_batch_size: int | None = None,
        cache_dir: str | Path | None = None,
        cache_store: CacheStore | None = None,
        workspace_gib: float = 4.0,
    ) -> None:
        super().__init__(model)
        trt = import_tensorrt()
        if not device.startswith("cuda") or not torch.cuda.is_available():
            raise BackendError(f"tensorrt needs a CUDA device, not {device!r}")
        if precision not in PRECISIONS:
            raise BackendError(f"tensorrt runs {', '.join(PRECISIONS)}, not {precision!r}")
        if precision == "fp8":  # Q/DQ in the graph (onnx_fp8.py); the GPU must have fp8 cores
            from models.backends.torch_fp8 import check_fp8_device

            check_fp8_device(device)
        self.trt, self.precision, self.device = trt, precision, device
        self.preferred_batch_size = batch_size or 256
        self.max_batch_size = max(max_batch_size or 2 * self.preferred_batch_size, 1)
        self.preferred_batch_size = min(self.preferred_batch_size, self.max_batch_size)
        self.workspace_bytes = int(workspace_gib * 2**30)
        folder = Path(cache_dir) if cache_dir else default_cache_dir()
        self.store = cache_store or LocalCacheStore(folder / "tensorrt")
        self.logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(torch.device(device)):
            self.onnx_path = export_cached(model, precision, folder)
            self.key = self._engine_key()
            self.engine = self._load_or_build()
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError("tensorrt could not create an execution context (GPU memory?)")
        self.output_dtypes = {
            name: torch_dtype(trt, self.engine.get_tensor_dtype(name))
            for name in (OUTPUT_NAME, FEATURES_NAME)
        }

    def _engine_key(self) -> EngineKey:
        gpu = gpu_info(torch.device(self.device).index or 0)
        if gpu is None:
            raise BackendError(f"tensorrt needs a CUDA device, not {self.device!r}")
        return EngineKey(
            onnx_sha256=onnx_sha256(self.onnx_path),
            tensorrt_version=self.trt.__version__,
            gpu_name=gpu.name,
            compute_capability=f"{gpu.capability[0]}.{gpu.capability[1]}",
            precision=self.precision,
            min_batch=1,
            opt_batch=self.preferred_batch_size,
            max_batch=self.max_batch_size,
        )

    def _load_or_build(self):
        runtime = self.trt.Runtime(self.logger)
        name = self.key.file_name()
        plan = self.store.get(name)
        if plan is not None:
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is not None:
                log.info("tensorrt engine from cache: %s", name)
                return engine
            log.warning("cached tensorrt engine %s does not deserialize; rebuilding", name)
        plan = self._build()
        self.store.put(name, plan)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BackendError(f"tensorrt built {name} but cannot deserialize it")
        return engine

    def _build(self) -> bytes:
        trt = self.trt
        log.info("building tensorrt engine %s (minutes)", self.key.file_name())
        builder = trt.Builder(self.logger)
        flags = 0
        strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if strongly_typed is not None:  # required on 10.x, accepted and ignored on 11.x
            flags |= 1 << int(strongly_typed)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(self.onnx_path)):
            errors = [_error_text(parser.get_error(i)) for i in range(parser.num_errors)]
            raise BackendError(f"tensorrt cannot parse {self.onnx_path}: {'; '.join(errors)}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        timing_name = self.key.timing_cache_name()
        timing = config.create_timing_cache(self.store.get(timing_name) or b"")
        config.set_timing_cache(timing, False)  # False: a mismatched cache is an error
        profile = builder.create_optimization_profile()
        size = self.config.image_size
        profile.set_shape(
            INPUT_NAME,
            (self.key.min_batch, 3, size, size),
            (self.key.opt_batch, 3, size, size),
            (self.key.max_batch, 3, size, size),
        )
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendError(f"tensorrt failed to build an engine from {self.onnx_path}")
        self.store.put(timing_name, bytes(config.get_timing_cache().serialize()))
        return bytes(serialized)

    def _run(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(self.device)
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device)
            images = batch.to(device, torch.float32, non_blocking=True).contiguous()
            if not self.context.set_input_shape(INPUT_NAME, tuple(images.shape)):
                raise BackendError(f"tensorrt rejected input shape {tuple(images.shape)}")
            self.context.set_tensor_address(INPUT_NAME, images.data_ptr())
            outputs = {}
            for name, dtype in self.output_dtypes.items():
                shape = tuple(self.context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=dtype, device=device)
                self.context.set_tensor_address(name, outputs[name].data_ptr())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise BackendError("tensorrt execute_async_v3 failed")
            # .cpu() waits for the stream; the tensors stay alive until then
            return outputs[OUTPUT_NAME].float().cpu(), outputs[FEATURES_NAME].float().cpu()


def torch_dtype(trt, dtype) -> torch.dtype:
    """The torch dtype of a tensorrt.DataType."""
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16}
    for name, value in table.items():
        if getattr(trt.DataType, name, None) == dtype:
            return value
    raise BackendError(f"unexpected tensorrt output type {dtype}")


def _error_text(error) -> str:
    return error.desc() if hasattr(error, "desc") else str(error)
