"""Building an AOT package: export and AOTInductor-compile a module in a child process.

The child gets the module as a safetensors file of its state plus the config to rebuild it
(a `FusedMixer`, or for int8 the fp32 `MlpMixer` that the child quantizes and calibrates,
torch_int8.package_module), so none of the compiler's (or torchao's) memory is ever the
caller's. Run as `python -m models.backends.aot_build REQUEST_JSON`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from models.backends.base import BackendError
from models.mixer import MixerConfig, MlpMixer

BUILD_TIMEOUT_S = 1800
KEY_METADATA = "mixer_label_key"  # the cache key, stored in the package's own metadata


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
        args = [sys.executable, "-m", "models.backends.aot_build", json.dumps(request)]
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


if __name__ == "__main__":
    _child_main(json.loads(sys.argv[1]))
