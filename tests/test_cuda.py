"""The CUDA backend beyond the shared API tests (test_api.py runs those on CUDA
too): zero-copy with PyTorch, CuPy and JAX, streams and graph capture, guarded
device-resident indices, and the shapes of real models against a float32 GPU
reference. Skipped where no CUDA backend is available."""

import numpy as np
import pytest

import ferrum_moe as fm

from conftest import REL_TOL, as64, poisoned, random_activations, random_weight, reference_moe, rel_error
from ferrum_moe.testing import captured_graph, random_codes_weight, silu_product

pytestmark = pytest.mark.skipif(not any(b.name == "cuda" and b.available for b in fm.backends()),
                                reason="no CUDA backend (install ferrum-moe-cuda on a machine with a GPU)")
torch = pytest.importorskip("torch")

MODELS = {  # experts, top_k, hidden, intermediate
    "mixtral": (8, 2, 4096, 14336),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "deepseek-v2-lite": (64, 6, 2048, 1408),
}


def cuda(a):
    return torch.from_numpy(np.ascontiguousarray(a)).cuda()


def dequantize_on_gpu(w: fm.GPTQWeight) -> "torch.Tensor":
    """float32 [K, N] on the GPU, computed with torch ops: an independent reference."""
    q = torch.from_numpy(w.qweight).cuda()
    shifts = torch.arange(0, 32, 4, device="cuda", dtype=torch.int32)
    codes = ((q.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF).reshape(-1, q.shape[1])[: w.k].float()
    g = torch.from_numpy(w.group_index()).cuda().long()
    zeros = torch.from_numpy(w.zeros()).cuda().float()
    scales = torch.from_numpy(np.asarray(w.scales, np.float32)).cuda()
    return (codes - zeros[g]) * scales[g]


def moe_reference_on_gpu(x, w13, w2, tw, ids):
    torch.backends.cuda.matmul.allow_tf32 = False
    x = x.float()
    out = torch.zeros(x.shape[0], w2[0].n, device="cuda")
    inter = w2[0].k
    for e in torch.unique(ids).tolist():
        tokens, slots = torch.nonzero(ids == e, as_tuple=True)
        h = x[tokens] @ dequantize_on_gpu(w13[e])
        act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        out.index_add_(0, tokens, tw[tokens, slots, None] * (act @ dequantize_on_gpu(w2[e])))
    return out


@pytest.mark.parametrize("model", sorted(MODELS))
# The layer's own routing, and pair routing named at 2 and 8 tokens (Mixtral's experts repeat there; at
# 8 tokens its first GEMM has more tiles than stream-K slots).
@pytest.mark.parametrize("m, block_size", [(1, None), (2, None), (2, 0), (8, 0), (16, None), (256, None),
                                           (4096, None)])
def test_model_shapes_match_a_float32_reference(rng, model, m, block_size):
    e, top_k, hidden, inter = MODELS[model]
    w13 = [random_codes_weight(rng, hidden, 2 * inter) for _ in range(e)]
    w2 = [random_codes_weight(rng, inter, hidden) for _ in range(e)]
    s13 = fm.ExpertStack.from_gptq(w13, device="cuda", dtype="float16")
    s2 = fm.ExpertStack.from_gptq(w2, device="cuda", dtype="float16")
    x = torch.randn(m, hidden, device="cuda").half()
    logits = torch.randn(m, e, device="cuda")
    tw, ids = torch.topk(torch.softmax(logits, -1), top_k)
    ids = ids.int()
    out = torch.full((m, hidden), float("nan"), device="cuda", dtype=torch.float16)
    fm.fused_moe(x, s13, s2, tw.contiguous(), ids.contiguous(), out=out, block_size=block_size)
    ref = moe_reference_on_gpu(x, w13, w2, tw, ids)
    assert rel_error(out, ref) < 3e-3


def test_cuda_and_cpu_backends_agree(rng):
    e, k, n = 5, 200, 72  # odd sizes: padding at load
    weights = [random_weight(rng, k, n, group_size=-1, sym=False) for _ in range(e)]
    x = random_activations(rng, (13, k), "float16")
    d = np.array([[4, 0, 0, 13], [1, 3, 13, 7]])
    on_cpu = fm.ExpertStack.from_gptq(weights, dtype="float16").gemm_batched(x, d)
    on_gpu = fm.ExpertStack.from_gptq(weights, device="cuda", dtype="float16").gemm_batched(cuda(x), d)
    assert rel_error(on_gpu, on_cpu) < 2e-3


def _small_stack(rng, dtype="float16"):
    weights = [random_weight(rng, 128, 64, group_size=32, dtype=dtype) for _ in range(2)]
    return weights, fm.ExpertStack.from_gptq(weights, device="cuda", dtype=dtype)


def test_torch_inputs_are_zero_copy_and_outputs_are_torch(rng):
    from ferrum_moe.arrays import import_array

    _, stack = _small_stack(rng)
    x = cuda(random_activations(rng, (4, 128), "float16"))
    assert import_array(x, "x").data_ptr == x.data_ptr()
    y = stack.gemm_batched(x, [[0, 0, 0, 4]])
    assert isinstance(y, torch.Tensor) and y.is_cuda and y.dtype == torch.float16


def test_cupy_in_cupy_out(rng):
    cupy = pytest.importorskip("cupy")
    from ferrum_moe.arrays import import_array

    weights, stack = _small_stack(rng)
    xh = random_activations(rng, (4, 128), "float16")
    x = cupy.asarray(xh)
    assert import_array(x, "x").data_ptr == x.data.ptr
    y = stack.gemm_batched(x, [[1, 0, 0, 4]])
    assert isinstance(y, cupy.ndarray)
    assert rel_error(cupy.asnumpy(y), xh.astype(np.float64) @ weights[1].dequantize(np.float64)) < 3e-3


def test_jax_in_jax_out(rng):
    jax = pytest.importorskip("jax")
    weights, stack = _small_stack(rng)
    xh = random_activations(rng, (4, 128), "float16")
    x = jax.device_put(xh, jax.devices("gpu")[0])
    from ferrum_moe.arrays import import_array

    assert import_array(x, "x").data_ptr == x.unsafe_buffer_pointer()
    y = stack.gemm_batched(x, [[0, 0, 0, 4]])
    assert isinstance(y, jax.Array)
    assert rel_error(np.asarray(y), xh.astype(np.float64) @ weights[0].dequantize(np.float64)) < 3e-3
    with pytest.raises(ValueError, match="read-only"):
        stack.gemm_batched(x, [[0, 0, 0, 4]], out=jax.numpy.zeros((4, 64), jax.numpy.float16))


def test_a_cpu_array_to_a_cuda_stack_is_refused(rng):
    _, stack = _small_stack(rng)
    with pytest.raises(ValueError, match=r"x must be on cuda:0 \(the stack's device\); got an array on cpu"):
        stack.gemm_batched(random_activations(rng, (4, 128), "float16"), [[0, 0, 0, 4]])
    with pytest.raises(TypeError, match="x must have dtype float16"):
        stack.gemm_batched(torch.zeros(4, 128, device="cuda"), [[0, 0, 0, 4]])


def test_the_cuda_backend_refuses_float32_stacks(rng):
    with pytest.raises(NotImplementedError, match="float16 or bfloat16"):
        fm.ExpertStack.from_gptq([random_weight(rng, 64, 64, group_size=32, dtype="float32")], device="cuda",
                                 dtype="float32")


def test_misaligned_activations_are_refused_or_correct(rng):
    weights, stack = _small_stack(rng)
    flat = torch.randn(4 * 128 + 1, device="cuda").half()
    x = flat[1:].view(4, 128)  # 2 bytes off a 16-byte boundary
    try:
        y = stack.gemm_batched(x, [[0, 0, 0, 4]])
    except ValueError as e:
        assert "align" in str(e)
    else:
        ref = x.double().cpu().numpy() @ weights[0].dequantize(np.float64)
        assert rel_error(y, ref) < 3e-3


def test_corrupt_device_routing_is_skipped_never_followed(rng):
    """Device-resident routing with garbage entries: kernels skip them; the
    result equals the CPU backend's on the same corrupt routing."""
    weights = [random_weight(rng, 128, 64, group_size=32) for _ in range(4)]
    x = random_activations(rng, (6, 128), "float16")
    sorted_ids = rng.integers(-(2**31), 2**31, 64, dtype=np.int64).astype(np.int32)
    # Valid ids appear once: a pair named twice would make the survivor depend on write order.
    sorted_ids[rng.choice(64, 12, replace=False)] = rng.permutation(12)
    expert_ids = rng.integers(-3, 7, 16).astype(np.int32)
    post = np.array([2**30], np.int32)
    results = []
    for device, put, get in (("cpu", lambda a: a, lambda a: a), ("cuda", cuda, lambda a: a.cpu().numpy())):
        stack = fm.ExpertStack.from_gptq(weights, device=device, dtype="float16")
        r = fm.Routing(put(sorted_ids), put(expert_ids), put(post), block_size=4, top_k=2, num_tokens=6)
        out = put(poisoned((12, 64), "float16"))
        stack.gemm_routed(put(x), r, out=out)
        results.append(get(out).astype(np.float64))
    cpu, gpu = results
    assert np.array_equal(np.isnan(cpu), np.isnan(gpu))
    written = ~np.isnan(cpu)
    assert rel_error(gpu[written], cpu[written]) < 2e-3


def test_streams_order_work_with_the_callers_stream(rng):
    weights, stack = _small_stack(rng)
    s = torch.cuda.Stream()
    xh = random_activations(rng, (64, 128), "float16")
    with torch.cuda.stream(s):
        x = cuda(xh)
        y = stack.gemm_batched(x, [[1, 0, 0, 64]], stream=s)  # torch.cuda.Stream has cuda_stream
    s.synchronize()
    assert rel_error(y, xh.astype(np.float64) @ weights[1].dequantize(np.float64)) < 3e-3


def test_torch_tensors_take_the_protocol_only_where_a_stream_needs_ordering(monkeypatch):
    """A CUDA tensor whose device's current PyTorch stream is the call's stream is
    exported through PyTorch's C export (nothing to order); where the streams
    differ, the protocol runs and orders PyTorch's stream before the call's."""
    from ferrum_moe.arrays import import_array
    x = torch.randn(4, 8, device="cuda")
    streams = []
    export = torch.Tensor.__dlpack__

    def spy(self, *args, **kwargs):
        streams.append(kwargs.get("stream"))
        return export(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "__dlpack__", spy)
    side = torch.cuda.Stream()
    assert import_array(x, "x").data_ptr == x.data_ptr()  # both on the legacy default stream
    with torch.cuda.stream(side):
        import_array(x, "x", side.cuda_stream)  # both on `side`
    assert streams == []
    with torch.cuda.stream(side):
        import_array(x, "x")  # PyTorch on `side`, the call on the legacy default (1 in DLPack)
    import_array(x, "x", side.cuda_stream)  # PyTorch on its default, the call on `side`
    assert streams == [1, side.cuda_stream]


def test_a_result_read_on_another_stream_waits_for_its_producer(rng):
    """The result comes back to torch while torch's current stream is not the
    one the GEMM ran on: DLPack's export orders the consumer's stream after the
    producer's (the producer is held back by a sleep, so without the order the
    copy below would read the zero-filled buffer)."""
    weights, stack = _small_stack(rng)
    xh = random_activations(rng, (64, 128), "float16")
    x = cuda(xh)
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    producer.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(producer):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the GEMM
    with torch.cuda.stream(consumer):
        y = stack.gemm_batched(x, [[1, 0, 0, 64]], stream=producer)
        seen = y.clone()  # queued on the consumer's stream
    torch.cuda.synchronize()
    assert rel_error(seen, xh.astype(np.float64) @ weights[1].dequantize(np.float64)) < 3e-3


def _layer(rng, dtype="float16", e=8, hidden=256, inter=128, act_order=False):
    w13 = [random_weight(rng, hidden, 2 * inter, group_size=64, act_order=act_order, dtype=dtype) for _ in range(e)]
    w2 = [random_weight(rng, inter, hidden, group_size=64, act_order=act_order, dtype=dtype) for _ in range(e)]
    s13 = fm.ExpertStack.from_gptq(w13, device="cuda", dtype=dtype)
    s2 = fm.ExpertStack.from_gptq(w2, device="cuda", dtype=dtype)
    return w13, w2, fm.MoE(s13, s2, top_k=2)


def _inputs(rng, m, e=8, hidden=256):
    xh = random_activations(rng, (m, hidden), "float16")
    ids = np.stack([rng.permutation(e)[:2] for _ in range(m)]).astype(np.int32)
    tw = rng.random((m, 2)).astype(np.float32)
    return xh, tw, ids


@pytest.mark.parametrize("k, n", [(4096, 256), (448, 256), (200, 72)])
def test_stream_k_decode_is_exact_across_calls_and_graph_replays(rng, k, n):
    """Decode GEMMs deal K slices out to one wave of CTAs (stream-K): a tile
    shared by several CTAs (448 x 256: 14 slices over 3 CTAs, two of them
    crossing from one tile into the next) meets in a slot whose sums and
    counters must be clean after every call, replays included."""
    w = random_weight(rng, k, n, group_size=64)
    lin = fm.Linear.from_gptq(w, device="cuda", dtype="float16")
    dense = w.dequantize(np.float64)
    for m in (1, 3, 12, 40, 1):  # 8-, 16-, 32/64-row tiles: each shares slots
        xh = random_activations(rng, (m, k), "float16")
        assert rel_error(lin(cuda(xh)), xh.astype(np.float64) @ dense) < 3e-3
    x = cuda(random_activations(rng, (2, k), "float16"))
    out = torch.empty(2, n, device="cuda", dtype=torch.float16)
    graph = captured_graph(lambda stream: lin(x, out=out, stream=stream))
    for _ in range(3):
        xh = random_activations(rng, (2, k), "float16")
        x.copy_(cuda(xh))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_error(out, xh.astype(np.float64) @ dense) < 3e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_tiles_that_fill_the_gpu_match_float64(rng, dtype):
    """Launches of 128-row tiles for under 3/4 of the SMs run on 64-row tiles
    (stream-K); at these sizes (>= 132 tiles of 128 x 256) they run on the
    Hopper wgmma tiles, which the small shapes of test_api.py no longer reach."""
    e, k, n = 4, 128, 66 * 256
    name = str(dtype).split(".")[1]
    weights = [random_weight(rng, k, n, group_size=64, sym=False) for _ in range(e)]
    dense = [w.dequantize(np.float64) for w in weights]
    stack = fm.ExpertStack.from_gptq(weights, device="cuda", dtype=name)
    x = cuda(rng.standard_normal((600, k)).astype(np.float32)).to(dtype)
    x64 = x.cpu().double().numpy()
    tol = REL_TOL[name]
    # gemm_batched: two dispatches of 256 and 300 rows (2 + 3 tiles of 128 rows).
    out = torch.full((600, n), float("nan"), device="cuda", dtype=dtype)
    stack.gemm_batched(x, np.array([[1, 0, 0, 256], [3, 256, 256, 300]]), out=out)
    got = out.cpu().double().numpy()
    assert rel_error(got[:256], x64[:256] @ dense[1]) < tol
    assert rel_error(got[256:556], x64[256:556] @ dense[3]) < tol
    assert np.all(np.isnan(got[556:]))
    # gemm_routed: blocks of 128 over 1,200 pairs.
    ids = rng.integers(0, e, (600, 2)).astype(np.int32)
    routing = fm.moe_align_block_size(cuda(ids), 128, e)
    out = torch.full((1200, n), float("nan"), device="cuda", dtype=dtype)
    stack.gemm_routed(x, routing, out=out)
    got = out.cpu().double().numpy()
    for expert in range(e):
        pairs = np.flatnonzero(ids.reshape(-1) == expert)
        assert rel_error(got[pairs], x64[pairs // 2] @ dense[expert]) < tol


@pytest.mark.parametrize("dtype, bits, sym, act_order", [
    ("float16", 4, True, False), ("bfloat16", 4, False, False), ("float16", 8, False, False),
    ("float16", 4, True, True)])
def test_few_prefill_tiles_split_k_and_match_float64(rng, dtype, bits, sym, act_order):
    """Too few 128 x 256 tiles for the SMs split K among CTAs where the stream-K
    workspace holds them (params.hpp, wgmma_tiles_fill): 256 x 4096 x 2048 is 16
    tiles of 64 K slices, 8 CTAs a tile on an H200, whose partial sums meet in
    the tile's slot. Dense, windowed with a bias, into float32, routed; each
    against float64, the slots clean for the next call."""
    k, n, m = 4096, 2048, 256
    weights = [random_weight(rng, k, n, bits=bits, group_size=128, sym=sym, act_order=act_order, dtype=dtype)
               for _ in range(2)]
    dense = [w.dequantize(np.float64) for w in weights]
    stack = fm.ExpertStack.from_gptq(weights, device="cuda", dtype=dtype)
    tdtype = getattr(torch, dtype)
    tol = REL_TOL[dtype]
    x = cuda(rng.standard_normal((m, k)).astype(np.float32)).to(tdtype)
    x64 = x.cpu().double().numpy()
    layer = stack.expert_linear(n, n)  # expert 1
    for out_dtype in (tdtype, torch.float32, tdtype):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=out_dtype)
        layer(x, out=out)
        assert rel_error(out, x64 @ dense[1]) < tol, out_dtype
    offset, width = 8, n - 24
    bias = cuda(rng.standard_normal(width).astype(np.float32)).to(tdtype)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=tdtype)
    stack.expert_linear(offset, width, bias=bias)(x, out=out[:, :width])
    got = out.double().cpu().numpy()
    assert rel_error(got[:, :width], x64 @ dense[0][:, offset:offset + width] + bias.cpu().double().numpy()) < tol
    assert np.all(np.isnan(got[:, width:])), "columns past the window written"
    # Routed: every token to both experts, one block of 128 rows each (the host plans
    # for the routing's bound, the kernel again for the two blocks it filled).
    xr = x[:128]
    ids = cuda(np.stack([rng.permutation(2) for _ in range(128)]).astype(np.int32))
    routing = fm.moe_align_block_size(ids, 128, 2)
    out = torch.full((256, n), float("nan"), device="cuda", dtype=tdtype)
    stack.gemm_routed(xr, routing, out=out)
    got = out.double().cpu().numpy()
    ids_np = ids.cpu().numpy().reshape(-1)
    for expert in range(2):
        pairs = np.flatnonzero(ids_np == expert)
        assert rel_error(got[pairs], x64[pairs // 2] @ dense[expert]) < tol


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
# (k, half, tokens, experts): many unshared tiles, an odd tile count between
# gate and up, and few tiles whose CTAs split K (the kernels' second copy).
@pytest.mark.parametrize("k, half, m, e", [(128, 33 * 128, 600, 4), (256, 3 * 128, 2000, 6), (4096, 1024, 128, 2)])
def test_the_gated_epilogue_of_the_prefill_tiles_matches_float64(rng, dtype, k, half, m, e):
    """gemm_routed with gated_out on 128-row tiles (ABI 1.3): one CTA takes gate
    tile t and up tile t + half / 128 and stores silu(gate) * up; the backend
    says it wrote the product. Routing blocks under a tile keep the host's
    activation (the backend answers False and launches nothing)."""
    from ferrum_moe.arrays import import_array, import_output

    weights = [random_weight(rng, k, 2 * half, group_size=128, dtype=dtype) for _ in range(e)]
    dense = [w.dequantize(np.float64) for w in weights]
    stack = fm.ExpertStack.from_gptq(weights, device="cuda", dtype=dtype)
    tdtype = getattr(torch, dtype)
    x = cuda(rng.standard_normal((m, k)).astype(np.float32)).to(tdtype)
    x64 = x.cpu().double().numpy()
    ids = np.stack([rng.permutation(e)[:2] for _ in range(m)]).astype(np.int32)
    ids[5, 1] = -1  # a dropped pair: its row stays as it was
    tw = cuda(rng.random((m, 2)).astype(np.float32))
    for block_size, fused in ((128, True), (16, False)):
        routing = fm.moe_align_block_size(cuda(ids), block_size, e)
        out = torch.full((2 * m, half), float("nan"), device="cuda", dtype=tdtype)
        written = stack._core.gemm_routed(import_array(x, "x"), *routing.tensors(0), block_size, 2,
                                          import_array(tw, "topk_weights"), None, 0,
                                          gated_out=import_output(out, "gated_out"))
        assert written == fused
        got = out.double().cpu().numpy()
        if not fused:
            assert np.all(np.isnan(got)), "a refused gated call launched work"
            continue
        assert np.all(np.isnan(got[11])), "the dropped pair's row was written"
        tw64 = tw.cpu().double().numpy()
        for expert in range(e):
            pairs = np.flatnonzero(ids.reshape(-1) == expert)
            y = x64[pairs // 2] @ dense[expert] * tw64.reshape(-1)[pairs, None]
            assert rel_error(got[pairs], silu_product(y)) < 2 * REL_TOL[dtype], expert
    # The layer at a prefill size takes the same epilogue; the Python call too.
    routing = fm.moe_align_block_size(cuda(ids), 128, e)
    y = stack.gemm_routed(x, routing, topk_weights=tw, activation="silu")
    assert y.dtype == tdtype and y.shape == (2 * m, half)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("with_weights", [False, True])
# 60 pairs x 2 or 20 column tiles: a launch with stream-K slots, and one past them (1,200 tiles).
@pytest.mark.parametrize("n", [256, 2560])
def test_pair_routing_with_repeated_experts_matches_float64(rng, bits, with_weights, n):
    """Pair routing where experts repeat: each pair its own tile row, one
    expert taking 20 pairs, one none; ids out of range and a device map's -1
    are skipped; int64 ids."""
    from ferrum_moe.arrays import import_array, import_output

    e, k, tokens, top_k = 6, 384, 12, 5
    weights = [random_weight(rng, k, n, bits=bits, group_size=128, dtype="float16") for _ in range(e)]
    dense = [w.dequantize(np.float64) for w in weights]
    stack = fm.ExpertStack.from_gptq(weights, device="cuda", dtype="float16")
    x = cuda(rng.standard_normal((tokens, k)).astype(np.float32)).half()
    x64 = x.cpu().double().numpy()
    n_global = e + 2
    expert_map = np.array([0, 1, 2, -1, 3, 4, 5, 1], np.int32)  # global 3 is not local; 7 shares local 1
    ids = rng.choice([0, 1, 2, 3, 5, 6, 7], size=(tokens, top_k)).astype(np.int64)
    ids[:, 0] = 4  # local 3: 12 pairs
    ids[:8, 1] = 4  # and 8 more: 20
    ids[2, 3], ids[5, 2] = -1, n_global  # out of range
    tw = rng.random((tokens, top_k)).astype(np.float32)
    out = torch.full((tokens * top_k, n), float("nan"), device="cuda", dtype=torch.float16)
    stack._core.gemm_routed_pairs(import_array(x, "x"), import_array(cuda(ids), "topk_ids"), n_global,
                                  import_array(cuda(expert_map), "expert_map"),
                                  import_array(cuda(tw), "topk_weights") if with_weights else None,
                                  import_output(out, "out"), 0)
    got = out.double().cpu().numpy()
    for p in range(tokens * top_k):
        t, j = divmod(p, top_k)
        g = ids[t, j]
        local = expert_map[g] if 0 <= g < n_global else -1
        if local < 0:
            assert np.all(np.isnan(got[p])), f"skipped pair {p} written"
            continue
        y = x64[t] @ dense[local] * (tw[t, j] if with_weights else 1.0)
        assert rel_error(got[p], y) < 2 * REL_TOL["float16"], p


# (k, x's row length, group size): one K slice (7 of the 8 warps idle); K past its last whole
# slice and not a multiple of 8, rows 16-byte aligned (the last token values read one by one,
# or copied 8 and 10 bytes at a time for align's blocks);
# channelwise groups over 2 rounds of slices per warp (INT4; INT8 rounds are half as long);
# groups of 64 over 2 rounds; then the stacks the GEMV leaves to the 8-row tiles: groups of 32
# (not whole slices), rows that are not 16-byte aligned (row length odd, x from column 1), and K
# past kGemvMaxGatedK (the gated epilogue; plain, K that long runs on the GEMV, whose only bound
# there is the group scales' staging size). Act-order stacks (aligned; K past its last slice in
# rows that are not aligned; K not a multiple of 8) run on the GEMV: pair routing reads x through
# each pair's expert's permutation (the GEMV's permuted form) where each warp's K is one round of
# slices, else (K = 4160: 3 rounds) a copy in that order, as routing blocks do.
@pytest.mark.parametrize("k, x_columns, group_size, act_order", [
    (64, 64, 64, False), (196, 208, 128, False), (197, 208, 128, False), (4000, 4000, -1, False),
    (3072, 3072, 64, False),
    (512, 512, 32, False), (512, 512, 128, True), (200, 201, 128, False), (200, 201, 128, True),
    (197, 208, 128, True), (4160, 4160, 128, False), (4160, 4160, 128, True)])
@pytest.mark.parametrize("bits, sym", [(4, True), (4, False), (8, True)])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
# Pair routing (3 tokens), or align's blocks of 8 or 3 rows (9 tokens: experts of 5-9 rows, so
# full blocks, partial ones and experts over two blocks) on the GEMV's block form.
@pytest.mark.parametrize("block", [None, 8, 3])
def test_routing_on_the_decode_gemv_and_off_it_matches_float64(rng, k, x_columns, group_size, act_order, bits, sym,
                                                               dtype, block):
    """Pair routing and routing blocks of up to 8 rows on their two kernels
    (the decode GEMV where its layout holds, the 8-row tiles elsewhere), plain
    into float32 rows with the router weights and gated into the compute
    dtype: every written row matches float64, dropped pairs and the columns
    past N stay as they were."""
    from ferrum_moe.arrays import import_array, import_output

    e, tokens, top_k, half = 5, 3 if block is None else 9, 4, 256
    weights = [random_weight(rng, k, 2 * half, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                             dtype=dtype) for _ in range(e)]
    dense = [w.dequantize(np.float64) for w in weights]
    stack = fm.ExpertStack.from_gptq(weights, device="cuda", dtype=dtype)
    tdtype = getattr(torch, dtype)
    rows = cuda(rng.standard_normal((tokens, x_columns)).astype(np.float32)).to(tdtype)
    x = rows[:, :k] if x_columns % 8 == 0 else rows[:, 1:k + 1]
    x64 = x.double().cpu().numpy()
    ids = np.stack([rng.permutation(e)[:top_k] for _ in range(tokens)]).astype(np.int32)
    ids[1, 2] = -1  # dropped
    tw = rng.random((tokens, top_k)).astype(np.float32)
    pairs = tokens * top_k
    out = torch.full((pairs, 2 * half + 3), float("nan"), device="cuda", dtype=torch.float32)
    gated = torch.full((pairs, half + 3), float("nan"), device="cuda", dtype=tdtype)
    x_in, weights_in = import_array(x, "x"), import_array(cuda(tw), "topk_weights")
    if block is None:
        routing = (import_array(cuda(ids), "topk_ids"), e, None)
        call = stack._core.gemm_routed_pairs
    else:
        routing = (*fm.moe_align_block_size(cuda(ids), block, e).tensors(0), block, top_k)
        call = stack._core.gemm_routed
    call(x_in, *routing, weights_in, import_output(out[:, :2 * half], "out"), 0)
    assert call(x_in, *routing, None, None, 0, gated_out=import_output(gated[:, :half], "gated_out"))
    got, got_gated = out.double().cpu().numpy(), gated.double().cpu().numpy()
    assert np.all(np.isnan(got[:, 2 * half:])) and np.all(np.isnan(got_gated[:, half:])), "written past N"
    for p in range(pairs):
        t, j = divmod(p, top_k)
        if ids[t, j] < 0:
            assert np.all(np.isnan(got[p])) and np.all(np.isnan(got_gated[p])), f"dropped pair {p} written"
            continue
        y = x64[t] @ dense[ids[t, j]]
        assert rel_error(got[p, :2 * half], y * tw[t, j]) < REL_TOL[dtype], p
        assert rel_error(got_gated[p, :half], silu_product(y)) < 2 * REL_TOL[dtype], p


@pytest.mark.parametrize("k, group_size, act_order", [(2112, 128, False), (512, -1, False), (256, 128, True),
                                                     (197, 64, False)])
@pytest.mark.parametrize("bits, sym", [(4, True), (4, False), (8, True)])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_few_row_dispatches_on_the_decode_gemv_and_off_it_match_float64(rng, k, group_size, act_order, bits, sym,
                                                                         dtype):
    """gemm_batched's dispatches of up to 16 rows run on the decode GEMV as work
    items of up to 8 rows where its layout and its rule take them (x's rows 16-byte
    aligned: not at K = 197; 110 CTAs a row of items, 220 for two), taller ones on
    the tiles: a Linear window off the 32-column slots and across two experts, with
    a bias, into float32 and into a compute-dtype view of an odd row stride; then
    one table of several dispatches of several experts. Every written row matches
    float64; rows and columns outside stay as they were."""
    e, n = 3, 27 * 128
    weights = [random_weight(rng, k, n, bits=bits, group_size=group_size, sym=sym, act_order=act_order, dtype=dtype)
               for _ in range(e)]
    stacked = np.concatenate([w.dequantize(np.float64) for w in weights], axis=1)
    stack = fm.ExpertStack.from_gptq(weights, device="cuda", dtype=dtype)
    tdtype = getattr(torch, dtype)
    tol = REL_TOL[dtype]
    offset, width = 8, n + 45  # the first slot from column 8, the last to expert 1's column 53
    for m in (1, 3, 8, 13, 16, 17):
        x = cuda(rng.standard_normal((m, k)).astype(np.float32)).to(tdtype)
        x64 = x.double().cpu().numpy()
        bias = cuda(rng.standard_normal(width).astype(np.float32)).to(tdtype)
        layer = stack.expert_linear(offset, width, bias=bias)
        expect = x64 @ stacked[:, offset:offset + width] + bias.double().cpu().numpy()
        for backing in (torch.full((m + 1, width + 5), float("nan"), device="cuda"),
                        torch.full((m + 1, width + 3), float("nan"), device="cuda", dtype=tdtype)):
            layer(x, out=backing[:m, :width])
            got = backing.double().cpu().numpy()
            assert rel_error(got[:m, :width], expect) < tol, (m, backing.dtype)
            assert np.all(np.isnan(got[:m, width:])) and np.all(np.isnan(got[m])), (m, "written outside out")

    # Several dispatches (expert, in_row, out_row, m) in one table, rows of x
    # reused, out rows between them left alone.
    x = cuda(rng.standard_normal((20, k)).astype(np.float32)).to(tdtype)
    x64 = x.double().cpu().numpy()
    for table in ([[2, 0, 0, 1], [0, 3, 2, 8], [1, 5, 11, 3], [2, 4, 15, 5]],
                  [[1, 0, 0, 16], [0, 2, 17, 2], [2, 19, 20, 1]]):
        rows_out = max(r[2] + r[3] for r in table) + 1
        out = torch.full((rows_out, n), float("nan"), device="cuda", dtype=torch.float32)
        stack.gemm_batched(x, table, out=out)
        got = out.double().cpu().numpy()
        written = np.zeros(rows_out, bool)
        for expert, in_row, out_row, m in table:
            y = x64[in_row:in_row + m] @ stacked[:, expert * n:(expert + 1) * n]
            assert rel_error(got[out_row:out_row + m], y) < tol, (table, expert)
            written[out_row:out_row + m] = True
        assert np.all(np.isnan(got[~written])), (table, "rows no dispatch names written")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("values", ["offset", "tiny", "outliers"])
def test_the_decode_gemv_keeps_its_precision_where_token_values_are_uneven(rng, dtype, sym, values):
    """The decode GEMV's sums against float64 where a token row is uneven:
    far from zero mean (the sums cancel), of values ~1e-3 (whose gated
    products fall among fp16's subnormals), and with a few outlier columns
    400 times the rest; through
    one-token pair routing (plain and gated) and a Linear's work items of 1
    and 5 rows, K of two rounds a warp; output poisoned."""
    from ferrum_moe.arrays import import_array, import_output

    e, k, half = 3, 4096, 14 * 128  # 56 slots a pair's gate half: the GEMV at one token
    weights = [random_weight(rng, k, 2 * half, bits=4, group_size=128, sym=sym, dtype=dtype) for _ in range(e)]
    dense = [w.dequantize(np.float64) for w in weights]
    stack = fm.ExpertStack.from_gptq(weights, device="cuda", dtype=dtype)
    tdtype = getattr(torch, dtype)
    tol = REL_TOL[dtype]

    def tokens(m):
        x = rng.standard_normal((m, k))
        if values == "offset":
            x = x + 8.0
        elif values == "tiny":
            x = x * 1e-3
        else:
            x[:, rng.choice(k, 6, replace=False)] *= 400.0
        return cuda(x.astype(np.float32)).to(tdtype)

    x = tokens(1)
    x64 = x.double().cpu().numpy()
    ids = rng.permutation(e)[:2].reshape(1, 2).astype(np.int32)
    out = torch.full((2, 2 * half), float("nan"), device="cuda", dtype=torch.float32)
    gated = torch.full((2, half), float("nan"), device="cuda", dtype=tdtype)
    x_in, routing = import_array(x, "x"), (import_array(cuda(ids), "topk_ids"), e, None)
    stack._core.gemm_routed_pairs(x_in, *routing, None, import_output(out, "out"), 0)
    assert stack._core.gemm_routed_pairs(x_in, *routing, None, None, 0, gated_out=import_output(gated, "gated_out"))
    # silu(gate) * up of the tiny rows (~1e-7) lands among fp16's subnormals,
    # spaced 2^-24: the gated rows' bound adds that spacing per element.
    spacing = 2.0 ** -24 if dtype == "float16" else 0.0
    for p in range(2):
        y = x64[0] @ dense[ids[0, p]]
        assert rel_error(out[p], y) < tol, p
        got, expect = as64(gated[p]), silu_product(y)
        assert np.all(np.isfinite(got)), p
        assert np.linalg.norm(got - expect) < 2 * tol * np.linalg.norm(expect) + spacing * np.sqrt(half), p
    layer = stack.expert_linear(0, 2 * half)
    for m in (1, 5):
        x = tokens(m)
        out = torch.full((m, 2 * half), float("nan"), device="cuda", dtype=tdtype)
        layer(x, out=out)
        assert rel_error(out, x.double().cpu().numpy() @ dense[0]) < tol, m


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
# Symmetric 4- and 8-bit, and asymmetric act-order (the slot places zeros and row groups too).
@pytest.mark.parametrize("bits, sym, act_order", [(4, True, False), (8, True, False), (4, False, True)])
# (k, half): a few K slices, and a long K whose tiles split K over many CTAs.
@pytest.mark.parametrize("k, half", [(256, 3 * 128), (4096, 2 * 128)])
def test_the_gated_epilogue_of_the_decode_tiles_matches_float64(rng, dtype, bits, sym, act_order, k, half):
    """gemm_routed with gated_out on the 8-row tiles (ABI 1.3): one CTA takes a
    64-column half of a gate tile (two warps) and the same half of its up tile
    (the other two) and stores silu(gate) * up; pair routing (one token: the
    layer's decode path, no `out`) and align's blocks of 8. A gate half of
    partial tiles answers False and launches nothing."""
    from ferrum_moe.arrays import import_array, import_output

    e, top_k = 6, 4
    weights = [random_weight(rng, k, 2 * half, bits=bits, group_size=128, sym=sym, act_order=act_order, dtype=dtype)
               for _ in range(e)]
    dense = [w.dequantize(np.float64) for w in weights]
    stack = fm.ExpertStack.from_gptq(weights, device="cuda", dtype=dtype)
    tdtype = getattr(torch, dtype)

    def check(got, x64, ids, tw):
        for p in range(ids.size):
            t, j = divmod(p, top_k)
            if not 0 <= ids[t, j] < e:
                assert np.all(np.isnan(got[p])), f"dropped pair {p} written"
                continue
            y = x64[t] @ dense[ids[t, j]] * tw[t, j]
            assert rel_error(got[p], silu_product(y)) < 2 * REL_TOL[dtype], p

    # One token, pair routing.
    x = cuda(rng.standard_normal((1, k)).astype(np.float32)).to(tdtype)
    ids = rng.permutation(e)[:top_k].reshape(1, top_k).astype(np.int32)
    ids[0, 2] = e + 3  # out of range: skipped
    # Not near 0: weighted twice, the product would underflow the compute dtype.
    tw = rng.uniform(0.25, 1.0, (1, top_k)).astype(np.float32)
    out = torch.full((top_k, half), float("nan"), device="cuda", dtype=tdtype)
    assert stack._core.gemm_routed_pairs(import_array(x, "x"), import_array(cuda(ids), "topk_ids"), e, None,
                                         import_array(cuda(tw), "topk_weights"), None, 0,
                                         gated_out=import_output(out, "gated_out"))
    check(out.double().cpu().numpy(), x.cpu().double().numpy(), ids, tw)
    # Three tokens on align's blocks of 8, into every other row of a wider buffer, with the
    # plain output given too (the epilogue may use it as scratch).
    x = cuda(rng.standard_normal((3, k)).astype(np.float32)).to(tdtype)
    ids = np.stack([rng.permutation(e)[:top_k] for _ in range(3)]).astype(np.int32)
    ids[1, 0] = -1
    tw = rng.uniform(0.25, 1.0, (3, top_k)).astype(np.float32)
    routing = fm.moe_align_block_size(cuda(ids), 8, e)
    wide = torch.full((2 * 3 * top_k, half + 8), float("nan"), device="cuda", dtype=tdtype)
    plain = torch.zeros((3 * top_k, 2 * half), device="cuda", dtype=tdtype)
    assert stack._core.gemm_routed(import_array(x, "x"), *routing.tensors(0), 8, top_k,
                                   import_array(cuda(tw), "topk_weights"), import_output(plain, "out"), 0,
                                   gated_out=import_output(wide[::2, :half], "gated_out"))
    check(wide[::2, :half].double().cpu().numpy(), x.cpu().double().numpy(), ids, tw)
    assert torch.isnan(wide[1::2]).all() and torch.isnan(wide[:, half:]).all(), "written outside the view"
    # A gate half of partial tiles keeps the host's activation.
    odd = fm.ExpertStack.from_gptq([random_weight(rng, k, 2 * 192, bits=bits, group_size=128, dtype=dtype)],
                                   device="cuda", dtype=dtype)
    out = torch.full((top_k, 192), float("nan"), device="cuda", dtype=tdtype)
    assert not odd._core.gemm_routed_pairs(import_array(x[:1], "x"), import_array(cuda(np.zeros((1, top_k), np.int32)),
                                                                                  "topk_ids"),
                                           1, None, None, None, 0, gated_out=import_output(out, "gated_out"))
    assert torch.isnan(out).all()


def test_stream_k_prefill_ranges_cross_tiles_and_replay_clean(rng):
    """Where an even share of the slices beats aligned splits, a CTA's range of
    128-row slices crosses from one tile into the next: 300 x 6208 x 2304 is 27
    tiles (3 row tiles, the last with 44 rows) of 97 slices, 2,619 slices over 132
    CTAs on an H200 (schedule_check.cpp pins that plan). Every call, graph
    replays and eager calls alternating, matches float64: the slots and
    counters are zero again after each launch."""
    k, n, m = 6208, 2304, 300
    weight = random_weight(rng, k, n, group_size=64, sym=False)
    dense = weight.dequantize(np.float64)
    lin = fm.Linear.from_gptq(weight, device="cuda", dtype="float16")
    x = cuda(random_activations(rng, (m, k), "float16"))
    out = torch.empty(m, n, device="cuda", dtype=torch.float16)
    graph = captured_graph(lambda stream: lin(x, out=out, stream=stream))
    for replay in range(3):
        xh = random_activations(rng, (m, k), "float16")
        x.copy_(cuda(xh))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        expect = xh.astype(np.float64) @ dense
        assert rel_error(out, expect) < REL_TOL["float16"], replay
        eager = lin(x)
        assert rel_error(eager, expect) < REL_TOL["float16"], replay


@pytest.mark.parametrize("dtype, bits, act_order", [("float16", 4, True), ("bfloat16", 8, False)])
def test_prefill_ctas_take_tiles_in_turn_and_match_float64(rng, dtype, bits, act_order):
    """More 128-row tiles than a wave of CTAs: each CTA takes whole tiles in turn
    (kernel.cuh, walk), its pipeline running on from one tile's last slices into
    the next one's first while its warpgroups store the last: 600 x 1024 x 16896
    is 330 tiles of 16 slices, 2-3 per CTA on 132 SMs. Eager and under graph
    replays with fresh inputs, each against float64."""
    k, n, m = 1024, 66 * 256, 600
    weight = random_weight(rng, k, n, bits=bits, group_size=128, act_order=act_order, dtype=dtype)
    dense = weight.dequantize(np.float64)
    lin = fm.Linear.from_gptq(weight, device="cuda", dtype=dtype)
    tdtype = getattr(torch, dtype)
    x = cuda(random_activations(rng, (m, k), "float32")).to(tdtype)
    out = torch.empty(m, n, device="cuda", dtype=tdtype)
    graph = captured_graph(lambda stream: lin(x, out=out, stream=stream))
    for replay in range(2):
        x.copy_(cuda(random_activations(rng, (m, k), "float32")).to(tdtype))
        expect = x.cpu().double().numpy() @ dense
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_error(out, expect) < REL_TOL[dtype], replay
        eager = torch.full((m, n), float("nan"), device="cuda", dtype=tdtype)
        lin(x, out=eager)
        assert rel_error(eager, expect) < REL_TOL[dtype], replay


def test_prefill_ctas_skip_tiles_between_live_ones_and_match_float64(rng):
    """Routing blocks of 256 rows on 128-row tiles: an expert's last block has a
    second chunk past its rows, a tile row every CTA taking tiles in turn skips
    in the middle of its walk (its producer and warpgroups stay in step). 600
    tokens to one of 2 experts: 4 planned blocks, 8 tile rows x 66 column pairs
    over a wave of CTAs; every pair's row against float64."""
    e, k, n, m = 2, 256, 66 * 256, 600
    weights = [random_weight(rng, k, n, group_size=128) for _ in range(e)]
    dense = [w.dequantize(np.float64) for w in weights]
    stack = fm.ExpertStack.from_gptq(weights, device="cuda", dtype="float16")
    x = cuda(random_activations(rng, (m, k), "float16"))
    x64 = x.cpu().double().numpy()
    ids = rng.integers(0, e, (m, 1)).astype(np.int32)
    routing = fm.moe_align_block_size(cuda(ids), 256, e)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
    stack.gemm_routed(x, routing, out=out)
    got = out.cpu().double().numpy()
    for expert in range(e):
        pairs = np.flatnonzero(ids.reshape(-1) == expert)
        assert rel_error(got[pairs], x64[pairs] @ dense[expert]) < REL_TOL["float16"], expert


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_tiles_store_windows_bias_and_every_output_layout(rng, dtype):
    """The wgmma tiles' results leave through 16-byte row stores where the output
    allows (unit column stride, 16-byte aligned base and rows, a window starting on a
    16-byte boundary: 8 columns of the compute dtype, 4 of float32, which goes in two
    passes) and element by element elsewhere. Windows whose end cuts a chunk or whose
    start is off the boundary, with a bias, in both dtypes, into views 2 or 4 bytes off
    alignment and rows of a stride off the chunk: each matches float64 and writes no
    column outside."""
    name = str(dtype).split(".")[1]
    # 5 row tiles x 66+ column tiles: the wgmma tiles; 133 tiles of 128 columns, so the
    # last CTA's second warpgroup has no stack tile where a window reaches the end
    k, n_stack, m = 128, 133 * 128, 600
    weight = random_weight(rng, k, n_stack, group_size=64, sym=False)
    dense = weight.dequantize(np.float64)
    stack = fm.ExpertStack.from_gptq([weight], device="cuda", dtype=name)
    x = cuda(rng.standard_normal((m, k)).astype(np.float32)).to(dtype)
    x64 = x.cpu().double().numpy()
    tol = REL_TOL[name]
    for offset, n in [(8, n_stack - 13), (3, n_stack - 3), (0, 66 * 256)]:
        bias = cuda(rng.standard_normal(n).astype(np.float32)).to(dtype)
        layer = stack.expert_linear(offset, n, bias=bias)
        expect = x64 @ dense[:, offset:offset + n] + bias.cpu().double().numpy()
        padded = (n + 7) // 8 * 8
        layouts = {
            "16-byte rows": torch.full((m, padded + 8), float("nan"), device="cuda", dtype=dtype),
            "float32": torch.full((m, padded + 8), float("nan"), device="cuda"),
            "float32 4 bytes off": torch.full((m * (padded + 8) + 1,), float("nan"), device="cuda")[1:]
            .view(m, padded + 8),
            "float32 odd row stride": torch.full((m, padded + 9), float("nan"), device="cuda"),
            "2 bytes off": torch.full((m * (padded + 8) + 1,), float("nan"), device="cuda", dtype=dtype)[1:]
            .view(m, padded + 8),
            "odd row stride": torch.full((m, padded + 9), float("nan"), device="cuda", dtype=dtype),
        }
        for what, backing in layouts.items():
            layer(x, out=backing[:, :n])
            got = backing.double().cpu().numpy()
            assert rel_error(got[:, :n], expect) < tol, (offset, n, what)
            assert np.all(np.isnan(got[:, n:])), f"columns past the window written ({offset}, {n}, {what})"


@pytest.mark.parametrize("dtype, bits, group_size, sym, act_order", [
    ("float16", 4, 128, True, False),
    ("bfloat16", 4, 64, False, False),
    ("float16", 8, 128, True, True),
    ("bfloat16", 4, 32, True, False),
])
def test_mid_m_tiles_match_float64(rng, dtype, bits, group_size, sym, act_order):
    """Blocks of 17-64 rows run on 32-row tiles, partly filled where an
    expert's block ends: routed blocks of 32 and of 64 (two tiles a block),
    over a short grid and over a long one (900 tokens at block 32: 63 blocks
    x 66 column pairs, over 24 tiles an SM, so Hopper takes the 32-row
    mma.sync tiles where the short grids take the wgmma ones), host
    dispatches of 20, 32 and 45 rows (the last in two tiles, the second of
    13 rows), the same table in device memory, K with a tail slice, groups
    per slice, per k-step (32) and per row (act-order), the compute dtype and
    float32 out; each against float64, the output poisoned."""
    e, k, n, m = 6, 200, 66 * 256, 150
    weights = [random_weight(rng, k, n, bits=bits, group_size=group_size, sym=sym, act_order=act_order, dtype=dtype)
               for _ in range(e)]
    dense = [w.dequantize(np.float64) for w in weights]
    stack = fm.ExpertStack.from_gptq(weights, device="cuda", dtype=dtype)
    tdtype = getattr(torch, dtype)
    tol = REL_TOL[dtype]
    for tokens, block in [(m, 32), (m, 64), (900, 32)]:
        x = cuda(random_activations(rng, (tokens, k), "float32")).to(tdtype)
        x64 = x.cpu().double().numpy()
        ids = rng.integers(0, e, (tokens, 2)).astype(np.int32)
        routing = fm.moe_align_block_size(cuda(ids), block, e)
        out = torch.full((2 * tokens, n), float("nan"), device="cuda", dtype=tdtype)
        stack.gemm_routed(x, routing, out=out)
        got = out.cpu().double().numpy()
        for expert in range(e):
            pairs = np.flatnonzero(ids.reshape(-1) == expert)
            assert rel_error(got[pairs], x64[pairs // 2] @ dense[expert]) < tol, (tokens, block, expert)
    x = cuda(random_activations(rng, (m, k), "float32")).to(tdtype)
    x64 = x.cpu().double().numpy()
    table = np.array([[0, 0, 0, 20], [2, 20, 20, 32], [5, 52, 52, 45]])
    named = int(table[:, 3].sum())  # the dispatches name rows 0..named-1, end to end
    for where, out_dtype in [("host", tdtype), ("host", torch.float32), ("device", tdtype)]:
        out = torch.full((m, n), float("nan"), device="cuda", dtype=out_dtype)
        stack.gemm_batched(x, table if where == "host" else cuda(table), out=out)
        got = out.cpu().double().numpy()
        for expert, row, _, rows in table:
            assert rel_error(got[row:row + rows], x64[row:row + rows] @ dense[expert]) < tol, (where, out_dtype)
        assert np.all(np.isnan(got[named:])), (where, out_dtype)


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_device_dispatch_rows_out_of_range_are_skipped_never_followed(rng, index_dtype):
    """A device-resident table the host never reads: rows with a bad expert,
    negative or huge rows, or m past x or out are skipped by the kernel; the
    good rows are computed; nothing outside out is written."""
    weights, stack = _small_stack(rng)
    xh = random_activations(rng, (24, 128), "float16")
    big = np.iinfo(index_dtype).max - 2
    good = [[1, 0, 2, 5], [0, 10, 8, 14]]
    bad = [[2, 0, 0, 1], [-1, 0, 0, 1], [0, -3, 0, 2], [0, 0, -1, 2], [0, 20, 0, 5], [0, 0, 21, 4],
           [0, big, 0, 4], [0, 0, big, 4], [0, 1, 1, big], [1, 0, 0, -4]]
    table = np.array(bad[:5] + good[:1] + bad[5:] + good[1:], index_dtype)
    backing = torch.full((26, 64), float("nan"), device="cuda", dtype=torch.float16)
    out = backing[1:25]  # a row of guard on each side
    stack.gemm_batched(cuda(xh), cuda(table), out=out)
    torch.cuda.synchronize()
    got = backing.double().cpu().numpy()
    assert np.all(np.isnan(got[0])) and np.all(np.isnan(got[25])), "nothing may be written outside out"
    expect = np.full((24, 64), np.nan)
    for e, in_row, out_row, m in good:
        expect[out_row:out_row + m] = xh[in_row:in_row + m].astype(np.float64) @ weights[e].dequantize(np.float64)
    written = ~np.isnan(expect)
    assert np.array_equal(np.isnan(got[1:25]), ~written)
    assert rel_error(got[1:25][written], expect[written]) < 3e-3


def test_a_captured_gemm_batched_replays_with_new_device_dispatches(rng):
    weights, stack = _small_stack(rng)
    xh = random_activations(rng, (16, 128), "float16")
    x = cuda(xh)
    table = cuda(np.array([[0, 0, 0, 16]], np.int64))
    out = torch.empty(16, 64, device="cuda", dtype=torch.float16)
    s = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):  # no warm-up call: nothing to allocate, nothing read on the host
        stack.gemm_batched(x, table, out=out, stream=s)
    for e, m in ((1, 16), (0, 3), (1, 9)):
        table.copy_(cuda(np.array([[e, 0, 0, m]], np.int64)))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        got = out.double().cpu().numpy()
        assert rel_error(got[:m], xh[:m].astype(np.float64) @ weights[e].dequantize(np.float64)) < 3e-3
        assert np.all(np.isnan(got[m:]))


def _routings(rng, m, e=8, top_k=2):
    """New routings for replays: spread, one hot expert, two experts, and ids out of range."""
    spread = np.stack([rng.permutation(e)[:top_k] for _ in range(m)]).astype(np.int32)
    hot = np.full((m, top_k), 3, np.int32)
    hot[:, 1:] = rng.integers(0, e, (m, top_k - 1))
    few = rng.integers(0, 2, (m, top_k)).astype(np.int32)
    invalid = spread.copy()
    invalid[::2, 0] = -1
    invalid[1::3, 1] = e
    return {"spread": spread, "hot expert": hot, "few experts": few, "invalid ids": invalid}


def test_act_order_with_uneven_groups_matches_float64(rng):
    """A g_idx whose groups hold different row counts (GPTQ's act-order keeps
    every group whole: its sorted rows take the uniform path) keeps the
    per-row group table after the sort. Routed on 8- and 32-row tiles and
    the 128-row tiles' few-tile fallback, batched through one expert (x
    copied in its order) and through two (gathered per element in the GEMM);
    K past its last whole slice."""
    e, k, n, groups = 3, 200, 256, 4
    weights = []
    for _ in range(e):
        g_idx = rng.integers(0, groups, k).astype(np.int32)
        weights.append(fm.gptq.quantize(rng.standard_normal((k, n)) / np.sqrt(k), 4, 64, False, g_idx=g_idx,
                                        scale_dtype=np.float16))
    dense = [w.dequantize(np.float64) for w in weights]
    stack = fm.ExpertStack.from_gptq(weights, device="cuda", dtype="float16")
    tol = REL_TOL["float16"]
    for m, block in ((5, 8), (40, 32), (300, 128)):
        x = cuda(random_activations(rng, (m, k), "float32")).to(torch.float16)
        x64 = x.cpu().double().numpy()
        ids = rng.integers(0, e, (m, 2)).astype(np.int32)
        out = torch.full((2 * m, n), float("nan"), device="cuda", dtype=torch.float16)
        stack.gemm_routed(x, fm.moe_align_block_size(cuda(ids), block, e), out=out)
        got = out.cpu().double().numpy()
        for expert in range(e):
            pairs = np.flatnonzero(ids.reshape(-1) == expert)
            assert rel_error(got[pairs], x64[pairs // 2] @ dense[expert]) < tol, (m, expert)
        for table in ([[2, 0, 0, m]], [[1, 0, 0, m // 2], [0, m // 2, m // 2, m - m // 2]]):
            out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float32)
            stack.gemm_batched(x, table, out=out)
            got = out.cpu().double().numpy()
            for expert, row, _, rows in table:
                assert rel_error(got[row:row + rows], x64[row:row + rows] @ dense[expert]) < tol, (m, table)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_act_order_layers_match_float64_at_every_tile_height(rng, dtype):
    """Act-order stacks copy x's columns into each pair's expert order before
    each GEMM (gemm/gather.cuh): one token (pair routing), 40 tokens (32-row
    tiles) and 300 (w13 on 128-row tiles sharing K, w2 on their few-tile
    fallback on an H100), every pair kept or some dropped (ids out of range,
    an expert map sending one expert away); both GEMMs' K past their last
    whole slice, w13's not a multiple of 8 (x's rows unaligned). Each layer
    against float64 on fresh tokens, the output poisoned."""
    e, hidden, inter, top_k = 6, 4036, 200, 2
    w13 = [random_weight(rng, hidden, 2 * inter, group_size=128, act_order=True, dtype=dtype) for _ in range(e)]
    w2 = [random_weight(rng, inter, hidden, group_size=64, act_order=True, sym=False, dtype=dtype)
          for _ in range(e)]
    s13 = fm.ExpertStack.from_gptq(w13, device="cuda", dtype=dtype)
    s2 = fm.ExpertStack.from_gptq(w2, device="cuda", dtype=dtype)
    tdtype = getattr(torch, dtype)
    expert_map = np.array([0, 1, 2, -1, 4, 5], np.int32)
    for m in (1, 40, 300):
        tw = rng.random((m, top_k)).astype(np.float32)
        ids = np.stack([rng.permutation(e)[:top_k] for _ in range(m)]).astype(np.int32)
        for dropped in (False, True):
            x = cuda(random_activations(rng, (m, hidden), "float32")).to(tdtype)
            if dropped:
                ids[1::3, 0] = -1
                ids[::4, 1] = e
                ids[0, 0] = 0  # token 0 keeps a pair (at one token, the other is dropped)
            emap = expert_map if dropped else None
            out = torch.full((m, hidden), float("nan"), device="cuda", dtype=tdtype)
            fm.fused_moe(x, s13, s2, cuda(tw), cuda(ids), out=out, expert_map=None if emap is None else cuda(emap))
            expect = reference_moe(x.cpu().double().numpy(), w13, w2, tw, ids, expert_map=emap)
            assert rel_error(out, expect) < 3 * REL_TOL[dtype], (m, dropped)


@pytest.mark.parametrize("layer_kind, warm, act_order", [
    ("fused_moe", False, False), ("MoE", False, False), ("MoE", True, False), ("MoE", False, True)])
def test_the_moe_layer_captures_in_a_torch_graph(rng, layer_kind, warm, act_order):
    """torch.cuda.graph capture, on the first call of the function or layer, or
    after a warm-up call; replays with new inputs and routings. Act-order
    stacks capture their x copy's stream-ordered allocation too."""
    w13, w2, layer = _layer(rng, act_order=act_order)
    m = 6
    xh, tw, ids = _inputs(rng, m)
    x, twd, idsd = cuda(xh), cuda(tw), cuda(ids)
    out = torch.empty(m, 256, device="cuda", dtype=torch.float16)
    run = (lambda s: fm.fused_moe(x, layer.w13, layer.w2, twd, idsd, out=out, stream=s)) if layer_kind == "fused_moe" \
        else (lambda s: layer(x, twd, idsd, out=out, stream=s))
    graph = captured_graph(run, warm)
    for name, ids2 in _routings(rng, m).items():
        xh2, tw2 = random_activations(rng, (m, 256), "float16"), rng.random((m, 2)).astype(np.float32)
        x.copy_(cuda(xh2)), twd.copy_(cuda(tw2)), idsd.copy_(cuda(ids2))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_error(out, reference_moe(xh2, w13, w2, tw2, ids2)) < 3e-3, name


@pytest.mark.parametrize("layer_kind, warm", [("fused_moe", False), ("MoE", False), ("MoE", True)])
def test_the_moe_layer_captures_in_a_cupy_graph(rng, layer_kind, warm):
    """CuPy stream capture, on the first call or after a warm-up call; replays
    with new inputs and routings."""
    cupy = pytest.importorskip("cupy")
    w13, w2, layer = _layer(rng)
    m = 5
    xh, tw, ids = _inputs(rng, m)
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        x, twd, idsd = cupy.asarray(xh), cupy.asarray(tw), cupy.asarray(ids)
        out = cupy.empty((m, 256), cupy.float16)
        run = (lambda: fm.fused_moe(x, layer.w13, layer.w2, twd, idsd, out=out, stream=s)) \
            if layer_kind == "fused_moe" else (lambda: layer(x, twd, idsd, out=out, stream=s))
        if warm:
            run()
        s.synchronize()
        s.begin_capture()
        run()
        graph = s.end_capture()
        for name, ids2 in _routings(rng, m).items():
            xh2, tw2 = random_activations(rng, (m, 256), "float16"), rng.random((m, 2)).astype(np.float32)
            x[...] = cupy.asarray(xh2)
            twd[...] = cupy.asarray(tw2)
            idsd[...] = cupy.asarray(ids2)
            out.fill(cupy.nan)
            graph.launch(stream=s)
            s.synchronize()
            assert rel_error(cupy.asnumpy(out), reference_moe(xh2, w13, w2, tw2, ids2)) < 3e-3, name


def test_host_routing_with_gpu_activations_is_named(rng):
    _, _, layer = _layer(rng)
    xh, tw, ids = _inputs(rng, 4)
    with pytest.raises(ValueError, match="fused_moe: topk_ids is on cpu; the stacks are on cuda:0: pass topk_ids on cuda:0"):
        fm.fused_moe(cuda(xh), layer.w13, layer.w2, cuda(tw), ids)
    with pytest.raises(ValueError, match="fused_moe: topk_weights is on cpu"):
        fm.fused_moe(cuda(xh), layer.w13, layer.w2, tw, cuda(ids))


def test_two_stacks_on_two_streams_at_once(rng):
    """Each stack on its own stream, both queued before either is waited for:
    a stack's split-K workspace is its own, so the streams do not race."""
    weights = [[random_weight(rng, 4096, 256, group_size=128) for _ in range(2)] for _ in range(2)]
    stacks = [fm.ExpertStack.from_gptq(w, device="cuda", dtype="float16") for w in weights]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    xs = [random_activations(rng, (m, 4096), "float16") for m in (1, 3)]  # decode sizes: split-K
    outs = []
    for _ in range(20):
        for stack, stream, xh in zip(stacks, streams, xs):
            with torch.cuda.stream(stream):
                x = cuda(xh)
                outs.append((stack.gemm_batched(x, [[1, 0, 0, xh.shape[0]]], stream=stream), xh, stack))
    torch.cuda.synchronize()
    for y, xh, stack in outs:
        w = weights[stacks.index(stack)][1]
        assert rel_error(y, xh.astype(np.float64) @ w.dequantize(np.float64)) < 3e-3


def test_one_moe_layer_from_8_threads_on_one_stream_matches_serial_calls(rng):
    """Threads share the stacks but not the layer's buffers (one set per thread
    and stream); on one stream their GEMMs never overlap on the device."""
    import threading

    w13, w2, layer = _layer(rng)
    calls = [_inputs(rng, int(rng.integers(1, 24))) for _ in range(32)]
    serial = [layer(cuda(x), cuda(tw), cuda(ids)).cpu() for x, tw, ids in calls]
    results = [None] * len(calls)
    barrier = threading.Barrier(8)

    def work(i):
        barrier.wait()
        for j in range(i, len(calls), 8):
            x, tw, ids = calls[j]
            results[j] = layer(cuda(x), cuda(tw), cuda(ids)).cpu()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(results, serial))


def test_a_device_expert_map_naming_absent_experts_adds_nothing(rng):
    """The host cannot read a device map without a synchronisation: pairs it
    sends past the stacks' experts are skipped, and the top-k sum adds zero
    for them, never memory no GEMM wrote. fm.MoE checks its map once."""
    w13, w2, layer = _layer(rng)
    expert_map = np.array([0, 1, 2, 3, 4, 5, 6, 7, 9, 30], np.int32)  # globals 8, 9: no such local expert
    xh = random_activations(rng, (6, 256), "float16")
    ids = np.array([[0, 8], [9, 1], [2, 3], [8, 9], [4, 5], [6, 7]], np.int32)
    tw = rng.random((6, 2)).astype(np.float32)
    for _ in range(2):  # the second call would see the first one's buffers
        out = torch.full((6, 256), float("nan"), device="cuda", dtype=torch.float16)
        fm.fused_moe(cuda(xh), layer.w13, layer.w2, cuda(tw), cuda(ids), expert_map=cuda(expert_map), out=out)
        torch.cuda.synchronize()
        dropped = np.where(expert_map[ids] >= 8, -1, ids)
        assert rel_error(out, reference_moe(xh, w13, w2, tw, dropped)) < 3e-3
    with pytest.raises(ValueError, match="MoE: expert_map names local expert 30; the stacks hold 8"):
        fm.MoE(layer.w13, layer.w2, top_k=2, expert_map=cuda(expert_map))


def _cuda_backend(rng):
    return _small_stack(rng)[1]._core.backend


# (width, input column offset, output column offset): whole aligned 16-byte
# packs per row (the vector kernels); an odd width, rows starting one element
# past a pack, and aligned input with an unaligned output (the scalar kernels).
ELEMENTWISE_LAYOUTS = [(1024, 0, 0), (13, 0, 0), (1024, 1, 1), (1024, 0, 1)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, offset, out_offset", ELEMENTWISE_LAYOUTS)
def test_gated_activation_matches_float64(rng, dtype, n, offset, out_offset):
    from ferrum_moe.arrays import import_array

    rows = 5
    wide = torch.from_numpy(rng.standard_normal((rows, 2 * n + offset)) * 4).to("cuda", dtype)
    wide[0, offset:offset + 4] = torch.tensor([-1e4, -100.0, 100.0, float("nan")])  # saturation, NaN kept
    x = wide[:, offset:]
    out_wide = torch.full((rows, n + out_offset), float("nan"), device="cuda", dtype=dtype)
    out = out_wide[:, out_offset:]
    _cuda_backend(rng).gated_activation(import_array(x, "x"), import_array(out, "out"),
                                         torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    g, u = x[:, :n].double().cpu().numpy(), x[:, n:].double().cpu().numpy()
    with np.errstate(all="ignore"):
        ref = g / (1 + np.exp(-g)) * u
    got = out.double().cpu().numpy()
    assert np.array_equal(np.isnan(got), np.isnan(ref))
    ok = np.isfinite(ref)
    rtol = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 1e-6}[dtype]
    assert np.all(np.abs(got[ok] - ref[ok]) <= rtol * np.abs(ref[ok]) + 1e-6)
    if out_offset:
        assert torch.isnan(out_wide[:, :out_offset]).all()  # nothing before the view was written


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden, offset, out_offset", ELEMENTWISE_LAYOUTS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_moe_sum_matches_float64(rng, out_dtype, hidden, offset, out_offset, index_dtype):
    from ferrum_moe.arrays import import_array

    tokens, top_k, e = 7, 3, 6
    ids = rng.integers(0, e, (tokens, top_k))
    ids[1, 2], ids[4, 0] = -1, e  # invalid ids: their rows (NaN here) are skipped
    wide = torch.from_numpy(rng.standard_normal((tokens * top_k, hidden + offset))).to("cuda", torch.float32)
    wide[top_k * 1 + 2] = float("nan")
    wide[top_k * 4 + 0] = float("nan")
    x = wide[:, offset:]
    out_wide = torch.full((tokens, hidden + out_offset), float("nan"), device="cuda", dtype=out_dtype)
    out = out_wide[:, out_offset:]
    ids_t = torch.from_numpy(ids).to("cuda", index_dtype)
    _cuda_backend(rng).moe_sum(import_array(x, "x"), import_array(ids_t, "topk_ids"), e, None,
                               import_array(out, "out"), torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    rows = x.double().cpu().numpy().reshape(tokens, top_k, hidden)
    valid = (ids >= 0) & (ids < e)
    ref = np.where(valid[:, :, None], rows, 0.0).sum(axis=1)
    got = out.double().cpu().numpy()
    rtol = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 1e-6}[out_dtype]
    assert np.all(np.abs(got - ref) <= rtol * np.abs(ref) + 1e-6 * top_k)
    if out_offset:
        assert torch.isnan(out_wide[:, :out_offset]).all()


@pytest.mark.parametrize("offset", [0, 1])  # vector and scalar kernels
def test_elementwise_kernels_loop_past_the_grids_row_limit(rng, offset):
    """140,000 activation rows and 70,000 tokens to sum: more than a grid's
    65,535 along y (the kernels' row loop), and more CTAs than SMs (the launch
    that does not release the next kernel early)."""
    from ferrum_moe.arrays import import_array

    rows, n, top_k = 140_000, 16, 2
    stream = torch.cuda.current_stream().cuda_stream
    backend = _cuda_backend(rng)
    wide = torch.from_numpy(rng.standard_normal((rows, 2 * n + offset))).to("cuda", torch.float16)
    x = wide[:, offset:]
    out = torch.full((rows, n + offset), float("nan"), device="cuda", dtype=torch.float16)[:, offset:]
    backend.gated_activation(import_array(x, "x"), import_array(out, "out"), stream)
    pairs = torch.full((rows, n + offset), float("nan"), device="cuda", dtype=torch.float32)[:, offset:]
    pairs.copy_(out.float())
    ids = torch.zeros((rows // top_k, top_k), device="cuda", dtype=torch.int32)
    summed = torch.full((rows // top_k, n + offset), float("nan"), device="cuda", dtype=torch.float32)[:, offset:]
    backend.moe_sum(import_array(pairs, "x"), import_array(ids, "topk_ids"), 1, None, import_array(summed, "out"),
                    stream)
    torch.cuda.synchronize()
    g, u = x[:, :n].double().cpu().numpy(), x[:, n:].double().cpu().numpy()
    ref = g / (1 + np.exp(-g)) * u
    got = out.double().cpu().numpy()
    assert np.all(np.abs(got - ref) <= 2 ** -10 * np.abs(ref) + 1e-6)
    ref_sum = got.reshape(rows // top_k, top_k, n).sum(axis=1)
    assert np.all(np.abs(summed.double().cpu().numpy() - ref_sum) <= 1e-6 * (1 + np.abs(ref_sum)))
