"""Concurrency: one layer, one stack and plugin discovery used from 8 Python
threads at once give exactly the results of the same calls made one by one."""

import threading

import numpy as np
import pytest

import ferrum_moe as fm
from ferrum_moe import discovery

from conftest import random_activations, random_weight, reference_moe, rel_error

THREADS = 8
CALLS = 10


def run_in_threads(work, threads=THREADS):
    """Runs work(i) for i < threads, all released at once; returns the results
    in thread order and re-raises the first failure."""
    barrier = threading.Barrier(threads)
    results, errors = [None] * threads, []

    def body(i):
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as e:  # noqa: BLE001 - reported in the main thread
            errors.append(e)

    pool = [threading.Thread(target=body, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return results


def _calls(rng, e, hidden, top_k):
    """Inputs of varied token counts, so each thread's workspace grows and shrinks its views."""
    calls = []
    for _ in range(THREADS * CALLS):
        m = int(rng.integers(1, 40))
        ids = np.stack([rng.permutation(e)[:top_k] for _ in range(m)]).astype(np.int32)
        calls.append((random_activations(rng, (m, hidden), "float16"), rng.random((m, top_k)).astype(np.float32), ids))
    return calls


def test_one_moe_layer_from_8_threads_matches_serial_calls(rng):
    e, hidden, inter, top_k = 8, 128, 64, 2
    w13 = [random_weight(rng, hidden, 2 * inter, group_size=64) for _ in range(e)]
    w2 = [random_weight(rng, inter, hidden, group_size=64) for _ in range(e)]
    layer = fm.MoE(fm.ExpertStack.from_gptq(w13), fm.ExpertStack.from_gptq(w2), top_k=top_k)
    calls = _calls(rng, e, hidden, top_k)
    serial = [layer(*c) for c in calls]
    for c, y in zip(calls[:4], serial):  # the serial results themselves are right
        assert rel_error(y, reference_moe(*c[:1], w13, w2, c[1], c[2])) < 3e-3

    def work(i):
        return [layer(*calls[i * CALLS + j]) for j in range(CALLS)]

    concurrent = [y for ys in run_in_threads(work) for y in ys]
    wrong = sum(not np.array_equal(a, b) for a, b in zip(concurrent, serial))
    assert wrong == 0, f"{wrong} of {len(serial)} concurrent calls differ from the serial ones"


def test_one_stack_from_8_threads_matches_serial_calls(rng):
    weights = [random_weight(rng, 256, 96, group_size=64) for _ in range(4)]
    stack = fm.ExpertStack.from_gptq(weights)
    view = stack.expert_linear(16, 160)
    inputs = [random_activations(rng, (int(rng.integers(1, 30)), 256), "float16") for _ in range(THREADS * CALLS)]

    def call(x):
        m = x.shape[0]
        return stack.gemm_batched(x, [[3, 0, 0, m], [1, 0, m, m]]), view(x)

    serial = [call(x) for x in inputs]

    def work(i):
        return [call(inputs[i * CALLS + j]) for j in range(CALLS)]

    concurrent = [r for rs in run_in_threads(work) for r in rs]
    for (a, b), (c, d) in zip(concurrent, serial):
        assert np.array_equal(a, c) and np.array_equal(b, d)


def test_stacks_are_created_and_dropped_from_8_threads(rng):
    weights = [[random_weight(rng, 64, 32, group_size=32, dtype="float32")] for _ in range(THREADS)]
    x = random_activations(rng, (3, 64), "float32")

    def work(i):
        ys = []
        for _ in range(CALLS):
            ys.append(fm.ExpertStack.from_gptq(weights[i], dtype="float32").gemm_batched(x, [[0, 0, 0, 3]]))
        return ys

    for i, ys in enumerate(run_in_threads(work)):
        ref = x.astype(np.float64) @ weights[i][0].dequantize(np.float64)
        assert all(rel_error(y, ref) < 2e-5 for y in ys)


def test_discovery_from_several_threads_loads_each_plugin_once(monkeypatch):
    discovery._reset_for_tests()
    loads = []
    real_load = fm._core.Backend.load

    def counted_load(capsule):
        loads.append(threading.get_ident())
        threading.Event().wait(0.05)  # widen the window in which a second load could start
        return real_load(capsule)

    monkeypatch.setattr(fm._core.Backend, "load", staticmethod(counted_load))
    try:
        got = run_in_threads(lambda i: fm.get_backend("cpu") if i % 2 else fm.backends())
        backends = {id(b) for b in got[1::2]}
        assert len(loads) == 1, f"the cpu plugin was loaded {len(loads)} times"
        assert len(backends) == 1
        assert all(any(b.name == "cpu" and b.available for b in infos) for infos in got[::2])
    finally:
        discovery._reset_for_tests()


@pytest.mark.parametrize("threads", [2, THREADS])
def test_layer_workspaces_are_per_thread(rng, threads):
    """Each thread warms its own buffers; a thread's second call reuses them."""
    e, hidden, inter = 4, 64, 32
    layer = fm.MoE(fm.ExpertStack.from_gptq([random_weight(rng, hidden, 2 * inter, group_size=32) for _ in range(e)]),
                   fm.ExpertStack.from_gptq([random_weight(rng, inter, hidden, group_size=32) for _ in range(e)]),
                   top_k=1)
    x, tw, ids = random_activations(rng, (5, hidden), "float16"), np.ones((5, 1), np.float32), np.zeros((5, 1), np.int32)

    def work(i):
        layer(x, tw, ids)
        first = layer._workspace(0)
        layer(x, tw, ids)
        return first, layer._workspace(0), {name: buf.data_ptr for name, buf in first._buffers.items()}

    results = run_in_threads(work, threads)
    assert all(a is b for a, b, _ in results)
    assert len({id(a) for a, _, _ in results}) == threads
    pointers = [p for _, _, ptrs in results for p in ptrs.values()]
    assert len(set(pointers)) == len(pointers), "two threads share an intermediate buffer"


def test_dropping_a_tensor_runs_its_deleter_without_the_gil(tmp_path):
    """A deleter (for a CUDA result: a device free, which waits for the device)
    runs with the GIL let go, whether the Tensor is dropped by Python or by a
    consumer of its export: nothing stalls the other Python threads, and no
    tool that takes the GIL inside the driver can deadlock against it. The
    deleter here is C that records PyGILState_Check() (a Python deleter would
    take the GIL itself)."""
    import ctypes
    import shutil
    import subprocess

    from ferrum_moe.arrays import import_array
    from handmade_dlpack import DELETER, Producer, _alive

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the recording deleter")
    source = tmp_path / "deleter.c"
    source.write_text("int PyGILState_Check(void);\n"
                      "int gil_held = -1, calls = 0;\n"
                      "void recording_deleter(void* self) { (void)self; gil_held = PyGILState_Check(); ++calls; }\n")
    library = tmp_path / "libdeleter.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    lib = ctypes.CDLL(str(library))
    gil_held, calls = ctypes.c_int.in_dll(lib, "gil_held"), ctypes.c_int.in_dll(lib, "calls")
    deleter = DELETER(ctypes.cast(lib.recording_deleter, ctypes.c_void_p).value)

    def tensor():
        producer = Producer(np.arange(12, dtype=np.float32), (3, 4))
        producer._managed.deleter = deleter
        t = import_array(producer, "x")
        _alive.discard(producer)  # the C deleter does not; the test holds the memory
        return producer, t

    producer, t = tensor()
    gil_held.value = -1
    del t
    assert (calls.value, gil_held.value) == (1, 0)

    producer, t = tensor()
    exported = np.from_dlpack(t)
    del t
    assert calls.value == 1  # the export keeps the Tensor alive
    np.testing.assert_array_equal(exported, np.arange(12, dtype=np.float32).reshape(3, 4))
    gil_held.value = -1
    del exported
    assert (calls.value, gil_held.value) == (2, 0)
