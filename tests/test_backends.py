"""Backend discovery through the ferrum_moe.backends entry points: lazy loading,
failures recorded and raised only when asked for, FERRUM_MOE_BACKENDS."""

import subprocess
import sys
import textwrap

import pytest

import ferrum_moe as fm
from ferrum_moe import discovery

FAKE_PLUGINS = {
    "fake_broken": "raise ImportError('libfake.so: cannot open shared object file')\n",
    "fake_exits": "import sys\nsys.exit('fake_exits: no device, giving up')\n",
    "fake_badabi": textwrap.dedent("""
        import ctypes
        class Table(ctypes.Structure):
            _fields_ = [("struct_size", ctypes.c_size_t), ("abi_major", ctypes.c_uint32),
                        ("abi_minor", ctypes.c_uint32), ("name", ctypes.c_char_p), ("version", ctypes.c_char_p)]
        TABLE = Table(ctypes.sizeof(Table), 99, 3, b"badabi", b"9.9")
        _new = ctypes.pythonapi.PyCapsule_New
        _new.restype = ctypes.py_object
        _new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        def backend_api():
            return _new(ctypes.addressof(TABLE), b"ferrum_moe.backend_api", None)
        """),
    "fake_wrong": textwrap.dedent("""
        import ctypes
        _new = ctypes.pythonapi.PyCapsule_New
        _new.restype = ctypes.py_object
        _new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        def backend_api():
            return _new(ctypes.c_void_p(16), b"something.else", None)
        """),
}


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    """Installs a distribution registering three faulty backends, on sys.path."""
    dist = tmp_path / "fake_plugins-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugins\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[ferrum_moe.backends]\nbroken = fake_broken:backend_api\nbadabi = fake_badabi:backend_api\n"
        "exits = fake_exits:backend_api\n"
        "wrongcapsule = fake_wrong:backend_api\n"
    )
    for module, source in FAKE_PLUGINS.items():
        (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(discovery.ENV_VAR, raising=False)
    discovery._reset_for_tests()
    yield tmp_path
    discovery._reset_for_tests()
    for module in FAKE_PLUGINS:
        sys.modules.pop(module, None)


@pytest.fixture(autouse=True)
def fresh_discovery():
    discovery._reset_for_tests()
    yield
    discovery._reset_for_tests()


def test_the_cpu_backend_registers_through_its_entry_point():
    (cpu,) = [b for b in fm.backends() if b.name == "cpu"]
    assert cpu.available and cpu.device_types == ("cpu",) and cpu.abi == fm._core.build_info()["abi"] and cpu.error is None
    assert cpu.version == fm.__version__


def test_a_broken_plugin_is_recorded_not_raised_until_asked_for(fake_plugins):
    infos = {b.name: b for b in fm.backends()}
    assert infos["cpu"].available
    assert not infos["broken"].available
    assert "ImportError: libfake.so: cannot open shared object file" in infos["broken"].error
    with pytest.raises(fm.BackendUnavailableError, match="backend 'broken' is unavailable: ImportError: libfake.so"):
        fm.get_backend("broken")


def test_an_abi_major_mismatch_names_both_versions(fake_plugins):
    with pytest.raises(fm.BackendUnavailableError,
                       match=r"plugin 'badabi' 9\.9 \(ABI 99\.3\) is incompatible with this ferrum-moe \(ABI "
                             + fm._core.build_info()["abi"].replace(".", r"\.") + r"\): "
                             "rebuild the plugin"):
        fm.get_backend("badabi")


def test_a_capsule_of_another_kind_is_refused(fake_plugins):
    with pytest.raises(fm.BackendUnavailableError, match="capsule named 'something.else'; expected 'ferrum_moe.backend_api'"):
        fm.get_backend("wrongcapsule")


def test_a_missing_plugin_says_it_is_not_installed(monkeypatch):
    monkeypatch.setenv(discovery.ENV_VAR, "nosuch,cpu")
    infos = fm.backends()
    assert [b.name for b in infos] == ["nosuch", "cpu"]
    assert infos[0].error == "no plugin named 'nosuch' is installed"
    with pytest.raises(fm.BackendUnavailableError, match="backend 'nosuch' is unavailable: no plugin named 'nosuch'"):
        fm.get_backend("nosuch")


def test_the_environment_variable_selects_and_orders(fake_plugins, monkeypatch):
    monkeypatch.setenv(discovery.ENV_VAR, "broken, cpu")
    assert [b.name for b in fm.backends()] == ["broken", "cpu"]
    with pytest.raises(fm.BackendUnavailableError, match="backend 'badabi' is not selected"):
        fm.get_backend("badabi")


def test_auto_skips_broken_backends_and_picks_one_for_the_device(fake_plugins, monkeypatch):
    monkeypatch.setenv(discovery.ENV_VAR, "broken,cpu")
    assert discovery.resolve("auto", (1, 0)).name == "cpu"
    with pytest.raises(fm.BackendUnavailableError, match=r"no backend computes on cuda:0 \(broken: ImportError"):
        discovery.resolve("auto", (2, 0))


def test_discovery_is_lazy(fake_plugins):
    discovery._discover()
    assert "fake_broken" not in sys.modules  # nothing imported until a backend is used
    fm.get_backend("cpu")
    assert "fake_broken" not in sys.modules


def test_info_lists_backends_truthfully(fake_plugins):
    env = {**__import__("os").environ, "PYTHONPATH": str(fake_plugins)}
    out = subprocess.run([sys.executable, "-m", "ferrum_moe.cli", "info"], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert "ferrum-moe " + fm.__version__ in out
    assert "cpu      available" in out
    assert "broken   unavailable" in out and "libfake.so" in out
    assert "badabi   unavailable" in out and "ABI 99.3" in out
    assert "exits    unavailable" in out and "SystemExit: fake_exits: no device, giving up" in out


def test_plugins_that_fail_at_import_do_not_break_importing_ferrum_moe(fake_plugins):
    env = {**__import__("os").environ, "PYTHONPATH": str(fake_plugins)}
    code = "import ferrum_moe as fm; print(sorted(b.name for b in fm.backends() if b.available))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['cpu']"


@pytest.mark.parametrize("device, message", [("tpu", r"device: expected 'cpu', 'cuda', 'cuda:N' or a \(device_type, "
                                                    r"device_id\) tuple; got 'tpu'"),
                                             ("cuda:x", "got 'cuda:x'")])
def test_bad_device_strings_are_named(device, message):
    with pytest.raises(ValueError, match=message):
        discovery.parse_device(device)


def test_a_named_backend_must_compute_on_the_device():
    with pytest.raises(ValueError, match="backend 'cpu' does not compute on cuda:0"):
        discovery.resolve("cpu", (2, 0))


def test_the_conformance_suite_runs_from_the_command_line():
    done = subprocess.run([sys.executable, "-m", "ferrum_moe.testing", "cpu", "--dtype", "all"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    for dtype in ("bfloat16", "float16", "float32"):
        assert f"{dtype}: conformance of backend 'cpu'" in done.stdout
    assert done.stdout.count(" ok\n") == 39 and "FAILED" not in done.stdout and "unsupported" not in done.stdout
    missing = subprocess.run([sys.executable, "-m", "ferrum_moe.testing", "nosuch"], capture_output=True, text=True)
    assert missing.returncode == 2 and "backend 'nosuch' is not selected" in missing.stderr
