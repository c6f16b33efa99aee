"""A third-party backend built only from the installed headers (examples/minimal_backend)
loads through the entry point and passes the conformance check for what it implements."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ferrum_moe as fm
from ferrum_moe import discovery
from ferrum_moe.testing import check_backend

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "minimal_backend"


@pytest.fixture(scope="module")
def built_example(tmp_path_factory):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is needed to build the example plugin")
    build = tmp_path_factory.mktemp("minimal-build")
    subprocess.run(["cmake", "-S", str(EXAMPLE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    f"-Dferrum_moe_DIR={fm.get_cmake_dir()}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    (library,) = build.glob("libferrum_moe_minimal.so")
    return library


@pytest.fixture
def registered(built_example, tmp_path, monkeypatch):
    """The built library registered under the entry point name 'minimal'; yields the folder on sys.path."""
    dist = tmp_path / "ferrum_moe_minimal_example-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ferrum-moe-minimal-example\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[ferrum_moe.backends]\nminimal = minimal_shim:backend_api\n")
    (tmp_path / "minimal_shim.py").write_text(
        "from ferrum_moe.plugin import capsule_from_library\n"
        f"def backend_api():\n    return capsule_from_library({str(built_example)!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(discovery.ENV_VAR, "minimal,cpu")
    discovery._reset_for_tests()
    yield tmp_path
    discovery._reset_for_tests()
    sys.modules.pop("minimal_shim", None)


def test_the_example_plugin_loads_through_its_entry_point(registered):
    infos = {b.name: b for b in fm.backends()}
    assert infos["minimal"].available and infos["minimal"].abi == fm._core.build_info()["abi"]
    assert infos["minimal"].description == "float32 reference loops (example plugin)"


def test_the_example_plugin_passes_conformance_for_what_it_implements(registered):
    report = check_backend("minimal", dtype="float32")
    assert report.ok, str(report)
    results = report.results
    assert all(results[name] == "ok" for name in results if name.startswith(("gemm_batched", "expert_linear")))
    assert results["moe_align_block_size"].startswith("unsupported: moe_align_block_size: the minimal example")
    assert results["fused_moe"].startswith("unsupported")


def test_the_conformance_suite_runs_from_the_command_line(registered):
    env = {**os.environ, "PYTHONPATH": str(registered), discovery.ENV_VAR: "minimal,cpu"}
    done = subprocess.run([sys.executable, "-m", "ferrum_moe.testing", "minimal", "--dtype", "float32"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "conformance of backend 'minimal'" in done.stdout
    assert re.search(r"gemm_batched int4 g128 +ok", done.stdout)
    assert re.search(r"moe_align_block_size +unsupported: moe_align_block_size: the minimal example", done.stdout)


def test_unsupported_operations_reach_the_user_as_not_implemented(registered, rng):
    w = fm.gptq.quantize(rng.standard_normal((64, 32)), 4, 32, scale_dtype=np.float32)
    with pytest.raises(NotImplementedError, match="computes in float32 only"):
        fm.ExpertStack.from_gptq([w], backend="minimal", dtype="float16")
