"""models.backends.aot_package: AOTInductor packages built once, cached locally and on S3."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.backends import BackendError, create
from models.backends.aot_package import check_package, load_or_build, package_key
from models.backends.hardware import compiler_available
from pipeline.engine_cache import StorageCacheStore
from tests.models.fresh_worker import load_cached_in_fresh_process

pytestmark = pytest.mark.skipif(
    not compiler_available(), reason="no C++ compiler: AOTInductor cannot build a package"
)
ROOT = Path(__file__).resolve().parents[2]
BATCH = 4


@pytest.fixture(scope="module")
def images():
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def built(tiny, s3_server, tmp_path_factory):
    """One package built for the tiny preset, kept in a local folder and on an S3 prefix."""
    store = StorageCacheStore(f"s3://{s3_server.new_bucket('aoti')}/packages/")
    cache_dir = tmp_path_factory.mktemp("aoti-cache")
    predictor = aot_predictor(tiny, cache_dir, store)
    return predictor, cache_dir, store


def aot_predictor(model, cache_dir, store=None, precision="bf16"):
    return create(
        model,
        "torch",
        precision,
        "cpu",
        batch_size=BATCH,
        compile="aot",
        cache_dir=cache_dir,
        cache_store=store,
    )


def package_file(predictor, cache_dir: Path) -> Path:
    return cache_dir / "aoti" / predictor.aot_info["key"]


def test_first_create_builds_and_second_loads_from_the_local_cache(built, tiny, images):
    first, cache_dir, _ = built
    assert first.aot and first.aot_info["source"] == "built"
    assert package_file(first, cache_dir).is_file()
    second = aot_predictor(tiny, cache_dir)
    assert second.aot_info["source"] == "local"
    assert second.aot_info["key"] == first.aot_info["key"]
    assert torch.equal(second.predict(images), first.predict(images))


def test_another_node_loads_the_package_from_the_store(built, tiny, images, tmp_path):
    first, _, store = built
    assert store.get(first.aot_info["key"]) is not None
    other = aot_predictor(tiny, tmp_path, store)  # empty local cache, shared S3 prefix
    assert other.aot_info["source"] == "store"
    assert package_file(other, tmp_path).is_file()  # kept locally for the next start
    assert torch.equal(other.predict(images), first.predict(images))


def test_predictions_equal_torch_compile_to_bf16_tolerance(built, tiny, images):
    aot = built[0]
    jit = create(tiny, "torch", "bf16", "cpu", batch_size=BATCH, compile="jit")
    assert jit.compiled and not jit.aot
    logits, features = aot.predict_with_features(images)  # 6 images: one split, one padded
    jit_logits, jit_features = jit.predict_with_features(images)
    assert logits.shape == (6, 10) and features.shape == (6, 64)
    assert (logits - jit_logits).abs().max() < 0.02
    assert (features - jit_features).abs().max() < 0.02
    with torch.inference_mode():
        reference = tiny(images)
    assert (logits - reference).abs().max() < 0.05
    assert torch.equal(logits.argmax(1), reference.argmax(1))


def test_a_corrupt_cache_entry_is_rebuilt_not_crashed_on(built, tiny, images, tmp_path):
    first, cache_dir, _ = built
    shutil.copytree(cache_dir / "aoti", tmp_path / "aoti")
    package_file(first, tmp_path).write_bytes(b"PK\x03\x04 not really a zip file")
    rebuilt = aot_predictor(tiny, tmp_path)
    assert rebuilt.aot_info["source"] == "built"
    assert check_package(package_file(rebuilt, tmp_path), rebuilt.aot_info["key"]) is None
    assert torch.equal(rebuilt.predict(images), first.predict(images))


def test_check_package_names_truncation_garbage_and_a_foreign_key(built, tmp_path):
    first, cache_dir, _ = built
    key = first.aot_info["key"]
    good = package_file(first, cache_dir)
    assert check_package(good, key) is None
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert check_package(truncated, key)
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"\x00" * 1000)
    assert check_package(garbage, key)
    assert "built for key" in check_package(good, "aoti-bf16-b4-someotherkey.pt2")


def test_a_cached_package_is_loaded_without_the_source_weights(built, tiny):
    _, cache_dir, _ = built
    model = copy.deepcopy(tiny)
    sha = tiny.weights_sha256()
    loaded, info = load_or_build(model, sha, "bf16", BATCH, cache_dir / "aoti", None, True)
    assert info["source"] == "local"
    assert model.stem.weight.device.type == "meta"  # released before loading, never converted


def test_loaded_constants_are_cache_line_aligned(built):
    """The runner's own buffer puts weights 16 bytes past a line (0.64x on AMX); ours do not."""
    constants = built[0]._forward.constants
    assert len(constants) > 10
    for name, tensor in constants.items():
        if tensor.layout == torch._mkldnn:
            address = torch.ops.mkldnn.data_ptr(tensor)
        else:
            address = tensor.data_ptr()
        assert address % 64 == 0, name


def test_the_key_changes_with_precision_batch_weights_and_geometry(tiny):
    base = dict(config=tiny.config, weights_sha256="a" * 64, precision="bf16", batch_size=16)
    key = package_key(**base, gelu_by_table=True)
    assert key == package_key(**base, gelu_by_table=True)  # deterministic
    variants = [
        {**base, "precision": "fp32"},
        {**base, "batch_size": 8},
        {**base, "weights_sha256": "b" * 64},
        {**base, "config": tiny.config.replace(num_classes=11)},
    ]
    keys = {package_key(**v, gelu_by_table=True) for v in variants}
    keys.add(package_key(**base, gelu_by_table=False))
    assert key not in keys and len(keys) == 5
    assert "/" not in key and key.endswith(".pt2")


def test_the_int8_key_differs_from_bf16_and_follows_its_recipe(tiny):
    from models.backends.torch_int8 import package_recipe

    base = dict(config=tiny.config, weights_sha256="a" * 64, batch_size=16, gelu_by_table=False)
    recipe = package_recipe(bf16=True)
    assert recipe["version"] >= 1 and recipe["mixed_bf16"] is True
    int8 = package_key(**base, precision="int8", recipe=recipe)
    assert int8.startswith("aoti-int8-b16-") and int8 == package_key(
        **base, precision="int8", recipe=package_recipe(bf16=True)
    )
    others = {
        package_key(**{**base, "gelu_by_table": True}, precision="bf16"),
        package_key(**base, precision="fp32"),
        package_key(**base, precision="int8", recipe=package_recipe(bf16=False)),
        package_key(**base, precision="int8", recipe={**recipe, "torchao": "0.0.1"}),
        package_key(**base, precision="int8", recipe={**recipe, "version": recipe["version"] + 1}),
    }
    assert int8 not in others and len(others) == 5


def test_loading_a_cached_package_imports_no_compiler(built):
    """The memory and start-up claim: a worker loading a package never imports Dynamo/Inductor."""
    _, cache_dir, _ = built
    never = ("torch._inductor", "torch._dynamo", "sympy")
    load_cached_in_fresh_process("tiny", "bf16", BATCH, cache_dir, 2, never)


def test_actors_starting_together_build_the_package_once(tmp_path):
    """Two processes on one node, one empty cache: one compiles, the other waits and loads."""
    script = (
        "import torch\n"
        "from models.backends import create\n"
        f"p = create('tiny', 'torch', 'bf16', 'cpu', batch_size={BATCH}, compile='aot',"
        f" cache_dir={str(tmp_path)!r})\n"
        "p.predict(torch.zeros(2, 3, 32, 32))\n"
        "print(p.aot_info['source'])\n"
    )
    args = [sys.executable, "-c", script]
    starts = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in "ab"]
    sources = sorted(p.communicate(timeout=600)[0].split()[-1] for p in starts)
    assert [p.returncode for p in starts] == [0, 0]
    assert sources == ["built", "local"]


def test_aot_rejects_what_it_cannot_run(tiny):
    with pytest.raises(BackendError, match="AOT packages run fp32, bf16 or int8"):
        load_or_build(tiny, "a" * 64, "fp16", BATCH, Path("unused"))
    with pytest.raises(BackendError, match="int8 AOT package needs its recipe"):
        load_or_build(tiny, "a" * 64, "int8", BATCH, Path("unused"))
    with pytest.raises(ValueError, match="compile must be"):
        create(tiny, "torch", "bf16", "cpu", compile="ahead")
