"""A child process that runs one ferrum-moe call per request, for inputs that
could crash a process (hostile dispatch rows, lying routing arrays, hand-built
DLPack tensors, mutated checkpoint files): a crash then fails the one test
that caused it instead of ending the test run.

Protocol: the parent writes an 8-byte length and a pickle of (operation name,
keyword arguments) to stdin; the worker answers the same way with (reply, peak
RSS in bytes while it ran), the reply ("ok", value) or ("raised", exception
type name, message). `Worker` is the parent's side; it can bound each call's
time and the child's address space."""

from __future__ import annotations

import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np


def _stack(weights, dtype):
    import ferrum_moe as fm

    return fm.ExpertStack.from_gptq(weights, dtype=dtype)


def guarded_output(rows, width, dtype, col_offset):
    """NaN [rows + 2, col_offset + width + 1] with out = its [1:-1, col_offset:-1]
    window: one guard row above and below and guard columns on each side."""
    from ferrum_moe.testing import NUMPY_DTYPES

    backing = np.full((rows + 2, col_offset + width + 1), np.nan, NUMPY_DTYPES[dtype])
    return backing, backing[1:rows + 1, col_offset:col_offset + width]


def gemm_batched(weights, dtype, x, dispatches, out=None):
    """out: None (a new result) or (rows, width, out dtype, column offset) of a
    guarded buffer, returned whole so the parent sees the guards."""
    stack = _stack(weights, dtype)
    if out is None:
        return stack.gemm_batched(x, dispatches)
    backing, window = guarded_output(*out)
    stack.gemm_batched(x, dispatches, out=window)
    return backing


def gemm_routed(weights, dtype, x, sorted_token_ids, expert_ids, num_tokens_post_padded, block_size, top_k,
                topk_weights=None, out=None):
    import ferrum_moe as fm

    stack = _stack(weights, dtype)
    routing = fm.Routing(sorted_token_ids, expert_ids, num_tokens_post_padded, block_size=block_size, top_k=top_k,
                         num_tokens=x.shape[0])
    backing, window = guarded_output(*out)
    stack.gemm_routed(x, routing, topk_weights=topk_weights, out=window)
    return backing


def moe_align_block_size(topk_ids, block_size, num_experts, expert_map=None):
    import ferrum_moe as fm

    r = fm.moe_align_block_size(topk_ids, block_size, num_experts, expert_map=expert_map)
    return r.sorted_token_ids, r.expert_ids, r.num_tokens_post_padded


def import_handmade(buffer, metadata):
    """Imports a hand-built DLPack tensor over `buffer` and returns a copy of
    what a consumer then reads through ferrum's own export (None past 2^16
    elements: stride-0 dimensions can make a tiny buffer look huge)."""
    from ferrum_moe.arrays import import_array
    from handmade_dlpack import Producer

    producer = Producer(buffer, **metadata)
    try:
        t = import_array(producer, "x")
    finally:
        if producer.deleted not in (0, 1):
            raise AssertionError(f"the deleter ran {producer.deleted} times")
    small = int(np.prod(t.shape, dtype=object)) <= 2**16
    return np.from_dlpack(t).copy() if small else None, t.shape, t.strides


def load_checkpoint(path, tokens=3, seed=0):
    """Loads every MoE layer of the checkpoint at ``path`` in float32 and returns,
    per layer, what a reference can check: the router's weight and bias as
    loaded, each expert alone on random tokens (weight 1), and the shared
    expert on the same tokens."""
    import ferrum_moe as fm

    rng = np.random.default_rng(seed)
    result = {}
    for i, layer in fm.load_moe_layers(path, dtype="float32", progress=False).items():
        e, k = layer.w13.num_experts, layer.w13.k
        x = rng.standard_normal((tokens, k)).astype(np.float32)
        ids = np.repeat(np.arange(e, dtype=np.int32), tokens)[:, None]  # token block j goes to expert j
        experts = fm.fused_moe(np.tile(x, (e, 1)), layer.w13, layer.w2, np.ones(ids.shape, np.float32), ids)
        result[i] = dict(x=x, top_k=layer.top_k, router=layer.router.weight, bias=layer.router.correction_bias,
                         experts=experts.reshape(e, tokens, -1),
                         shared=None if layer.shared_expert is None else layer.shared_expert(x))
    return result


def hold_memory(nbytes):
    """Touches ``nbytes`` of new memory: the test of the worker's own bounds."""
    return int(np.ones(nbytes, np.uint8).sum())


def sleep(seconds):
    """Does nothing for ``seconds``: the test of the worker's own time limit."""
    time.sleep(seconds)


OPERATIONS = {f.__name__: f for f in (gemm_batched, gemm_routed, moe_align_block_size, import_handmade,
                                      load_checkpoint, hold_memory, sleep)}


def _read(stream):
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    return pickle.loads(stream.read(size))


def _write(stream, obj):
    data = pickle.dumps(obj)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _reset_peak_rss():
    """Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so each request's
    peak is its own; where that is refused the peak read after it stays the
    process's, an upper bound of the request's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss() -> int:
    """The peak resident set in bytes: VmHWM where /proc has it, else getrusage's
    (bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def serve():
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing a call prints may corrupt the replies
    if "FERRUM_MOE_WORKER_ADDRESS_SPACE" in os.environ:
        # A bound on what a runaway allocation can take from the machine: past it, a MemoryError.
        import resource

        limit = int(os.environ["FERRUM_MOE_WORKER_ADDRESS_SPACE"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    while (request := _read(stdin)) is not None:
        name, kwargs = request
        _reset_peak_rss()
        try:
            reply = ("ok", OPERATIONS[name](**kwargs))
        except Exception as e:  # noqa: BLE001 - every exception goes back to the parent
            reply = ("raised", type(e).__name__, str(e))
        _write(stdout, (reply, _peak_rss()))


class WorkerDied(AssertionError):
    pass


class Worker:
    """The parent's side: call() runs an operation in the child and returns its
    reply, and sets peak_rss to the bytes the child held at most while it ran;
    if the child dies, it raises WorkerDied with its exit status and last
    words, and the next call starts a fresh child. ``timeout``: seconds a call
    may take before the child is killed (WorkerDied says so); ``address_space``:
    the child's RLIMIT_AS in bytes."""

    def __init__(self, timeout=None, address_space=None):
        self._process = None
        self._log = tempfile.TemporaryFile()
        self.calls = 0
        self.timeout, self.address_space = timeout, address_space
        self.peak_rss = None

    def _start(self):
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        if self.address_space is not None:
            env["FERRUM_MOE_WORKER_ADDRESS_SPACE"] = str(self.address_space)
        self._log.seek(0)
        self._log.truncate()
        self._process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._log, env=env)

    def call(self, name, **kwargs):
        if self._process is None or self._process.poll() is not None:
            self._start()
        self.calls += 1
        hung = False
        try:
            _write(self._process.stdin, (name, kwargs))
            # The child writes a reply whole, so once its first bytes arrive the rest follows.
            hung = not select.select([self._process.stdout], [], [], self.timeout)[0]
            answer = None if hung else _read(self._process.stdout)
        except BrokenPipeError:
            answer = None
        if answer is None:
            if hung:
                self._process.kill()
            status = self._process.wait()
            self._log.seek(0)
            last_words = self._log.read().decode(errors="replace")[-2000:]
            self._close_pipes()
            what = f"no reply within {self.timeout} s (killed)" if hung else f"the worker died (exit status {status})"
            raise WorkerDied(f"{what} running {name}: {last_words}")
        reply, self.peak_rss = answer
        return reply

    def _close_pipes(self):
        """Lets go of a finished child's pipes (and of the child)."""
        for pipe in (self._process.stdin, self._process.stdout):
            try:
                pipe.close()
            except BrokenPipeError:  # unflushed bytes for a child that is gone
                pass
        self._process = None

    def close(self):
        if self._process is not None:
            if self._process.poll() is None:
                self._process.stdin.close()  # the child's end of requests: it returns
                self._process.wait(timeout=30)
            self._close_pipes()
        self._log.close()


if __name__ == "__main__":
    serve()
