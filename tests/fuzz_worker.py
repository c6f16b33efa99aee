"""A child process that runs one ferrum-moe call per request, for inputs that
could crash a process (hostile dispatch rows, lying routing arrays, hand-built
DLPack tensors): a crash then fails the one test that caused it instead of
ending the test run.

Protocol: the parent writes an 8-byte length and a pickle of (operation name,
keyword arguments) to stdin; the worker answers the same way with ("ok",
value) or ("raised", exception type name, message). `Worker` is the parent's
side."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import tempfile

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


OPERATIONS = {f.__name__: f for f in (gemm_batched, gemm_routed, moe_align_block_size, import_handmade)}


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


def serve():
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing a call prints may corrupt the replies
    while (request := _read(stdin)) is not None:
        name, kwargs = request
        try:
            reply = ("ok", OPERATIONS[name](**kwargs))
        except Exception as e:  # noqa: BLE001 - every exception goes back to the parent
            reply = ("raised", type(e).__name__, str(e))
        _write(stdout, reply)


class WorkerDied(AssertionError):
    pass


class Worker:
    """The parent's side: call() runs an operation in the child and returns its
    reply; if the child dies, it raises WorkerDied with its exit status and
    last words, and the next call starts a fresh child."""

    def __init__(self):
        self._process = None
        self._log = tempfile.TemporaryFile()
        self.calls = 0

    def _start(self):
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self._log.seek(0)
        self._log.truncate()
        self._process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._log, env=env)

    def call(self, name, **kwargs):
        if self._process is None or self._process.poll() is not None:
            self._start()
        self.calls += 1
        try:
            _write(self._process.stdin, (name, kwargs))
            reply = _read(self._process.stdout)
        except BrokenPipeError:
            reply = None
        if reply is None:
            status = self._process.wait()
            self._log.seek(0)
            last_words = self._log.read().decode(errors="replace")[-2000:]
            self._process = None
            raise WorkerDied(f"the worker died (exit status {status}) running {name}: {last_words}")
        return reply

    def close(self):
        if self._process is not None and self._process.poll() is None:
            self._process.stdin.close()
            self._process.wait(timeout=30)
        self._log.close()


if __name__ == "__main__":
    serve()
