/* ferrum-moe backend plugin ABI.
 *
 * A backend is a C function table (FmBackendApi). The host (ferrum_moe._core)
 * finds it through the Python entry-point group `ferrum_moe.backends`: each
 * entry point returns a PyCapsule named "ferrum_moe.backend_api" holding a
 * `const FmBackendApi*`, which must stay valid for the life of the process
 * (static storage: the host keeps the pointer, not the capsule). A plugin
 * shipped as a plain shared library exports `fm_backend_get_api` and lets
 * `ferrum_moe.plugin.capsule_from_library` build that capsule, so the plugin
 * itself never links against Python.
 *
 * Versioning rules
 *  - `abi_major` must equal the host's FM_ABI_MAJOR, or the host refuses the
 *    plugin with an error naming both versions.
 *  - `abi_minor` only grows; a minor release may only append function pointers
 *    to FmBackendApi and fields to the args structs. Nothing is reordered or
 *    removed within a major version.
 *  - Every struct starts with `struct_size`, set by whoever fills it to the
 *    sizeof() it was compiled with. A reader uses FM_STRUCT_HAS(ptr, field) to
 *    check that an appended field is present before it reads it.
 *
 * Conventions for every function
 *  - Returns NULL on success, or an FmError* created with
 *    FmHostServices.error_new. The host takes ownership of the error.
 *  - No C++ exception, STL type or Python object crosses this boundary.
 *  - Tensors are DLTensor*. The host has validated every tensor it passes
 *    (dtype, device, rank, shape, in-bounds host-side indices) before the
 *    call; the plugin may rely on what each field's comment promises. Every
 *    tensor is under 2^48 bytes, so products of its dimensions, strides and
 *    element size fit in int64; an output never shares memory with an input
 *    of the same call (moe_layer's out excepted: see there). Host-side means
 *    host-readable: kDLCPU or kDLCUDAHost.
 *    Device-resident index arrays are NOT validated by the host: kernels must
 *    skip out-of-range entries rather than access memory out of bounds.
 *  - `stream` is a backend-specific stream handle (cudaStream_t for CUDA;
 *    ignored by the CPU backend). NULL means the legacy default stream.
 *  - Calls on one FmStack may come from several threads at once; a plugin
 *    serialises whatever mutable state it keeps. Work queued on two streams
 *    at once may race on state a stack keeps on the device (a split-K
 *    workspace): the plugin documents whether its stacks allow that.
 *
 * docs/plugins.md is the manual built on this header.
 */
#ifndef FERRUM_MOE_PLUGIN_H_
#define FERRUM_MOE_PLUGIN_H_

#include <stddef.h>
#include <stdint.h>

#include "ferrum_moe/dlpack.h"

#define FM_ABI_MAJOR 1
#define FM_ABI_MINOR 4

/* Capsule name an entry point's object must carry. */
#define FM_BACKEND_CAPSULE_NAME "ferrum_moe.backend_api"
/* Symbol a shared-library plugin exports: `const FmBackendApi* fm_backend_get_api(void)`. */
#define FM_BACKEND_ENTRY_SYMBOL "fm_backend_get_api"

#if defined(_WIN32)
#define FM_EXPORT __declspec(dllexport)
#else
#define FM_EXPORT __attribute__((visibility("default")))
#endif

/* True when the struct `ptr` points to, as filled by the other side, is large
 * enough to hold `field` (appended fields of newer minor versions). */
#define FM_STRUCT_HAS(ptr, field) \
  ((ptr)->struct_size >= offsetof(__typeof__(*(ptr)), field) + sizeof((ptr)->field))

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  FM_ERROR_INVALID_ARGUMENT = 1, /* raised in Python as ValueError */
  FM_ERROR_TYPE = 2,             /* TypeError */
  FM_ERROR_UNSUPPORTED = 3,      /* NotImplementedError */
  FM_ERROR_OUT_OF_MEMORY = 4,    /* MemoryError */
  FM_ERROR_DEVICE = 5,           /* RuntimeError: a driver or kernel failure */
  FM_ERROR_INTERNAL = 6,         /* RuntimeError */
} FmErrorCode;

/* Opaque error, owned by the host once returned. */
typedef struct FmError FmError;
/* Opaque plugin objects. */
typedef struct FmBackend FmBackend;
typedef struct FmStack FmStack;

/* Services the host lends the plugin; valid from initialize until destroy. */
typedef struct FmHostServices {
  size_t struct_size;
  /* Creates an error; `message` is copied (UTF-8, NUL-terminated). */
  FmError* (*error_new)(FmErrorCode code, const char* message);
  /* Host memory aligned to `alignment` (a power of two, >= sizeof(void*));
   * NULL when out of memory. Release with host_free. */
  void* (*host_alloc)(size_t bytes, size_t alignment);
  void (*host_free)(void* ptr);
} FmHostServices;

typedef struct FmInitArgs {
  size_t struct_size;
  const FmHostServices* services;
  FmBackend* backend; /* out */
} FmInitArgs;

typedef struct FmBackendInfo {
  size_t struct_size;
  /* Strings and arrays stay valid until destroy. */
  const char* description;     /* one line: what runs where ("AVX2+FMA, 16 threads") */
  const int32_t* device_types; /* DLDeviceType values whose tensors this backend computes on */
  int32_t num_device_types;
  int32_t device_count;        /* devices of device_types[0]; 0 if none is usable */
} FmBackendInfo;

/* Flags of FmTensorAllocArgs (ABI 1.1). */
typedef enum {
  /* The caller drops the tensor before the call that asked for it returns,
   * after its last use on `stream` (an operation's intermediate buffers). A
   * backend may allocate it stream-ordered on `stream` (CUDA: cudaMallocAsync,
   * freed by cudaFreeAsync on the same stream), which stream capture records
   * as graph memory nodes. Without the flag the tensor may live arbitrarily
   * long and be used on any stream. */
  FM_ALLOC_TEMPORARY = 1,
  /* Every byte reads as zero once `stream` reaches this point. */
  FM_ALLOC_ZEROED = 2,
} FmAllocFlags;

/* A new tensor owned by the caller: it calls result->deleter exactly once.
 * The result must have exactly the requested device, dtype and shape and be
 * compact (the host checks, and refuses a mismatch as FM_ERROR_INTERNAL). A
 * plugin of ABI 1.0 never sees FM_ALLOC_ZEROED honoured by itself: the host
 * zeroes host memory for it and refuses zeroed device results. */
typedef struct FmTensorAllocArgs {
  size_t struct_size;
  FmBackend* backend;
  DLDevice device;
  DLDataType dtype;
  int32_t ndim;
  const int64_t* shape;
  void* stream;                        /* memory is ready for use on this stream */
  DLManagedTensorVersioned* result;    /* out: compact row-major, strides may be NULL */
  /* ABI 1.1 */
  uint32_t flags;                      /* FmAllocFlags; read only if FM_STRUCT_HAS(args, flags) */
} FmTensorAllocArgs;

/* An expert stack: E experts of one matmul role, y = x @ W_e with W_e [K, N].
 * The quantized tensors are in GPTQ orientation and may live on the host or on
 * the stack's device; the plugin copies or repacks them into its own layout and
 * keeps no reference to them after the call returns. */
typedef struct FmStackCreateArgs {
  size_t struct_size;
  FmBackend* backend;
  DLDevice device;         /* where the stack lives */
  DLDataType dtype;        /* activation dtype of every call on this stack */
  int64_t num_experts;     /* E >= 1 */
  int64_t k;               /* K >= 1 */
  int64_t n_per_expert;    /* N >= 1 */
  int32_t bits;            /* 4 or 8 */
  int32_t group_size;      /* G: -1 (one group over K) or >= 1; num_groups = ceil(K / G) */
  /* int32 [E, ceil(K / (32 / bits)), N]: value k of column n sits in word
   * k / (32 / bits) at bit offset bits * (k % (32 / bits)); unsigned codes. */
  const DLTensor* qweight;
  /* [E, num_groups, N], dtype == `dtype` */
  const DLTensor* scales;
  /* uint8 [E, num_groups, N] true zero points, or NULL: symmetric, zero = 2^(bits-1) */
  const DLTensor* zeros;
  /* int32 [E, K] group of each input row (act-order), values in [0, num_groups),
   * or NULL: row k is in group k / G */
  const DLTensor* g_idx;
  void* stream;
  FmStack* stack;          /* out */
} FmStackCreateArgs;

typedef struct FmStackProperties {
  size_t struct_size;
  int64_t column_alignment; /* expert_linear offsets and widths must be multiples */
  int64_t resident_bytes;   /* device or host memory the stack holds */
  int64_t workspace_bytes;
} FmStackProperties;

/* For each dispatch row (e, in_row, out_row, m):
 *   out[out_row + i, j] = sum_k x[in_row + i, k] * W_e[k, col_begin + j] (+ bias[j])
 * for i < m, j < n.
 *
 * `dispatches` is compact [D, 4], in one of two places:
 *  - on the host (kDLCPU or kDLCUDAHost): int64, every row checked by the
 *    host (expert in [0, E), m >= 0, rows inside x and out, m = 0 rows too);
 *  - on the stack's device (ABI 1.1; the host passes these only to plugins of
 *    minor version >= 1): int32 or int64, NOT checked and not readable by the
 *    host without a synchronisation. The kernels read the rows and skip every
 *    row whose expert, rows or m are out of range, never reading or writing
 *    outside x and out. The host never reads them when the caller gives `out`,
 *    so a captured call replays with new table contents. */
typedef struct FmGemmBatchedArgs {
  size_t struct_size;
  FmStack* stack;
  const DLTensor* x;          /* [rows_in, K], stack dtype, row stride 1 in the last dim */
  const DLTensor* dispatches; /* [D, 4]: see above */
  int64_t col_begin;          /* column window inside each expert: [col_begin, col_begin + n) */
  int64_t n;
  const DLTensor* bias;       /* [n] stack dtype, or NULL */
  DLTensor* out;              /* [rows_out, >= n], stack dtype or float32 */
  void* stream;
} FmGemmBatchedArgs;

typedef enum {
  FM_ACTIVATION_SILU = 0, /* silu(gate) * up */
} FmActivation;

/* vLLM's fused-MoE contract over moe_align_block_size output. For each padded
 * position p < *num_tokens_post_padded with id = sorted_token_ids[p] < num_tokens * top_k
 * and e = expert_ids[p / block_size] in [0, E):
 *   out[id, :] = x[id / top_k, :] @ W_e (* topk_weights.flat[id] when given).
 * With pairs = num_tokens * top_k, only the first
 *   min(pairs, ceil(pairs / block_size) + min(E, pairs))
 * blocks are read: moe_align_block_size fills ceil(n_e / block_size) blocks per
 * expert holding n_e pairs, at most one of them partial, so no more can hold
 * work (this lets a backend size its grid by the token count, not by every
 * expert's worst-case padding). Rows of `out` no valid id names are left untouched.
 *
 * Pair routing (ABI 1.2; the host passes it only to plugins of minor version
 * >= 2): sorted_token_ids, expert_ids and num_tokens_post_padded are NULL and
 * block_size is 1; every pair p = t * top_k + j (t < num_tokens, j < top_k) is
 * its own block, with e the stack's local expert of g = topk_ids[t, j]:
 * expert_map[g] when a map is given, else g, for g in [0, num_experts):
 *   out[p, :] = x[t, :] @ W_e (* topk_weights.flat[p] when given).
 * Pairs whose g or e is out of range ([0, num_experts), [0, E)) are skipped:
 * topk_ids and a device-resident expert_map are NOT checked by the host. The
 * layer uses it where align would only put each pair in a block of its own
 * (one token): the GEMMs read topk_ids themselves, and no align runs.
 *
 * The gated epilogue (ABI 1.3; the host passes it only to plugins of minor
 * version >= 3): with `gated_out` given, N is even and the stack's columns
 * are [gate | up]. The plugin may write
 *   gated_out[p, j] = act(y[p, j]) * y[p, N/2 + j]   for j < N/2
 * for the y[p, :] that `out` would receive above (the router weight already
 * applied), and set gated_written to 1; `out`'s contents are then unspecified
 * (it may serve as scratch). Or it leaves gated_out alone, computes y into
 * `out` as without the field and sets gated_written to 0; the host then runs
 * the activation. `out` may be NULL when gated_out is given: a plugin that
 * does not write gated_out then queues nothing (the host calls again with an
 * `out`). Rows of gated_out no valid pair names are left untouched. A plugin
 * of minor version >= 3 must therefore at least handle a NULL `out` (answer
 * gated_written = 0 and queue nothing), and declines an `activation` it does
 * not know the same way (plugin.hpp's helpers do both). */
/* The routing blocks gemm_routed reads (see above), one definition for every
 * backend; the arguments are non-negative and block_size >= 1. */
static inline int64_t fm_routed_blocks_read(int64_t num_blocks, int64_t num_pairs, int64_t block_size,
                                            int64_t num_experts) {
  const int64_t experts_with_pairs = num_experts < num_pairs ? num_experts : num_pairs;
  int64_t bound = (num_pairs + block_size - 1) / block_size + experts_with_pairs;
  if (bound > num_pairs) bound = num_pairs;
  return bound < num_blocks ? bound : num_blocks;
}

typedef struct FmGemmRoutedArgs {
  size_t struct_size;
  FmStack* stack;
  const DLTensor* x;                      /* [num_tokens, K] */
  const DLTensor* sorted_token_ids;       /* int32 [P], same device as x */
  const DLTensor* expert_ids;             /* int32 [P / block_size] (local ids; -1 = skip) */
  const DLTensor* num_tokens_post_padded; /* int32 [1] */
  int64_t block_size;                     /* in [1, 65536] */
  int64_t top_k;                          /* num_tokens * top_k <= 2^31 - 1 */
  const DLTensor* topk_weights;           /* float32 [num_tokens, top_k], or NULL */
  DLTensor* out;                          /* [num_tokens * top_k, N], stack dtype or float32;
                                           * may be NULL with gated_out (ABI 1.3) */
  void* stream;
  /* ABI 1.2, pair routing (above); NULL / 0 otherwise. */
  const DLTensor* topk_ids;               /* int32 or int64 [num_tokens, top_k], same device as x */
  int64_t num_experts;                    /* bound of the global ids in topk_ids */
  const DLTensor* expert_map;             /* int32 [num_experts] global -> local id or -1, or NULL */
  /* ABI 1.3, the gated epilogue (above); NULL otherwise. */
  DLTensor* gated_out;                    /* [num_tokens * top_k, N / 2], stack dtype, or NULL */
  FmActivation activation;                /* act, when gated_out is given */
  int32_t gated_written;                  /* out: nonzero when the plugin wrote gated_out, else 0 */
} FmGemmRoutedArgs;

/* vLLM's moe_align_block_size with invalid and non-local experts dropped.
 * num_tokens * top_k + num_local_experts * (block_size - 1) <= 2^31 - 1, so
 * every position and pair index fits the int32 outputs; block_size <= 65536.
 * A host-side expert_map has entries >= -1 and num_local_experts is its
 * maximum + 1; a device-resident map is unchecked (num_local_experts is then
 * num_experts) and entries outside [0, num_local_experts) must be dropped. */
typedef struct FmAlignArgs {
  size_t struct_size;
  FmBackend* backend;
  const DLTensor* topk_ids;         /* int32 or int64 [num_tokens, top_k] */
  int64_t num_experts;              /* global expert count */
  int64_t block_size;
  const DLTensor* expert_map;       /* int32 [num_experts] global -> local id or -1; or NULL */
  int64_t num_local_experts;        /* local id bound (== num_experts without a map) */
  DLTensor* sorted_token_ids;       /* int32 [num_tokens*top_k + num_local_experts*(block_size-1)] */
  DLTensor* expert_ids;             /* int32 [len(sorted_token_ids) / block_size] */
  DLTensor* num_tokens_post_padded; /* int32 [1] */
  void* stream;
} FmAlignArgs;

/* out[r, j] = act(in[r, j]) * in[r, n + j] for j < n. */
typedef struct FmGatedActivationArgs {
  size_t struct_size;
  FmBackend* backend;
  FmActivation activation;
  const DLTensor* input; /* [R, 2n] */
  DLTensor* out;         /* [R, n] */
  void* stream;
} FmGatedActivationArgs;

/* out[t, :] = sum over j < top_k whose expert is valid and local of
 * input[t * top_k + j, :], accumulated in float32. */
typedef struct FmMoeSumArgs {
  size_t struct_size;
  FmBackend* backend;
  const DLTensor* input;      /* [num_tokens * top_k, H], float32 or the out dtype */
  const DLTensor* topk_ids;   /* int32 or int64 [num_tokens, top_k] */
  int64_t num_experts;
  const DLTensor* expert_map; /* int32 [num_experts], or NULL */
  DLTensor* out;              /* [num_tokens, H] */
  void* stream;
} FmMoeSumArgs;

/* The whole MoE layer in one call (ABI 1.4; optional: the host asks only a
 * plugin of minor version >= 4 whose table holds a non-NULL moe_layer). With
 * pairs = num_tokens * top_k, pair p = t * top_k + j routed as gemm_routed's
 * pair routing routes it (its local expert e from topk_ids through
 * expert_map; pairs whose id or local id is out of range are skipped and
 * add nothing), w_p = topk_weights[t, j], and `act` the activation:
 *   act_in[p, :] = act(g) * u, [g | u] = x[t, :] @ W13_e (* w_p if weights_on_input)
 *   out[t, :]    = sum over valid j of act_in[p, :] @ W2_e (* w_p unless weights_on_input)
 * that is, what the layer's steps compute (w13's routed GEMM with the gated
 * epilogue, w2's routed GEMM over the pairs, moe_sum), with the same
 * roundings: act_in in the stacks' dtype, the second GEMM's rows and their
 * sum in float32. `act` and `down` are the steps' intermediate buffers, lent
 * as scratch: their contents afterwards are unspecified. The plugin either
 * queues the whole layer and sets written = 1, or queues nothing and sets
 * written = 0 (a layer it has no fused path for: the host then runs the
 * steps). An error is an error, never a decline. The host has checked every
 * argument as the steps would check them, and offers the call only where (both
 * stacks of this backend on one device, of one expert count, w2's K == w13's
 * N / 2) topk_ids and topk_weights are [num_tokens, top_k], act [pairs, N13 / 2]
 * in the stacks' dtype, down float32 [pairs, hidden], out [num_tokens, hidden]
 * float32, float16 or bfloat16; act and down share no memory with x, topk_ids,
 * topk_weights, expert_map, each other or out, and out none with topk_ids or
 * expert_map. out may share memory with x or topk_weights (the steps write it
 * last, after every read of them: a layer may write its result over its
 * input), so a plugin writes out only after its last read of those. topk_ids
 * and a device-resident expert_map are NOT checked, as in pair routing. */
typedef struct FmMoeLayerArgs {
  size_t struct_size;
  FmBackend* backend;
  FmStack* w13;                 /* [E, hidden, 2 * inter]: columns [gate | up] */
  FmStack* w2;                  /* [E, inter, hidden] */
  const DLTensor* x;            /* [num_tokens, hidden] */
  const DLTensor* topk_ids;     /* int32 or int64 [num_tokens, top_k], compact */
  const DLTensor* topk_weights; /* float32 [num_tokens, top_k], compact */
  int32_t weights_on_input;     /* nonzero: w_p scales the first GEMM's rows, not the second's */
  int64_t num_experts;          /* bound of the global ids in topk_ids */
  const DLTensor* expert_map;   /* int32 [num_experts] global -> local id or -1, or NULL */
  FmActivation activation;
  DLTensor* act;                /* scratch [pairs, inter], the stacks' dtype */
  DLTensor* down;               /* scratch [pairs, hidden], float32 */
  DLTensor* out;                /* [num_tokens, hidden] */
  void* stream;
  int32_t written;              /* out: 1 when the plugin queued the layer, else 0 */
} FmMoeLayerArgs;

typedef struct FmBackendApi {
  size_t struct_size;
  uint32_t abi_major;
  uint32_t abi_minor;
  const char* name;    /* the backend's name, e.g. "cpu"; static storage */
  const char* version; /* the plugin's version; static storage */

  /* Creates the backend object. An error here marks the backend unavailable,
   * with this error's message as the reason. Called at most once per process. */
  FmError* (*initialize)(FmInitArgs* args);
  void (*destroy)(FmBackend* backend);
  FmError* (*get_info)(FmBackend* backend, FmBackendInfo* info);

  FmError* (*tensor_alloc)(FmTensorAllocArgs* args);

  FmError* (*stack_create)(FmStackCreateArgs* args);
  void (*stack_destroy)(FmStack* stack);
  FmError* (*stack_get_properties)(FmStack* stack, FmStackProperties* props);
  FmError* (*stack_gemm_batched)(FmGemmBatchedArgs* args);
  FmError* (*stack_gemm_routed)(FmGemmRoutedArgs* args);
  /* Resets whatever cross-CTA state the stack keeps between GEMMs. */
  FmError* (*stack_zero_workspace)(FmStack* stack, void* stream);

  FmError* (*moe_align_block_size)(FmAlignArgs* args);
  FmError* (*gated_activation)(FmGatedActivationArgs* args);
  FmError* (*moe_sum)(FmMoeSumArgs* args);

  /* Makes later work on `consumer` wait for all work queued so far on
   * `producer` (an event record + wait on CUDA). Used when a tensor this
   * backend produced is exported through DLPack to another stream. */
  FmError* (*stream_order)(FmBackend* backend, DLDevice device, void* producer, void* consumer);

  /* ABI 1.4: the whole layer in one call (FmMoeLayerArgs), or NULL. */
  FmError* (*moe_layer)(FmMoeLayerArgs* args);
} FmBackendApi;

typedef const FmBackendApi* (*FmBackendGetApiFn)(void);

#ifdef __cplusplus
}
#endif

#endif /* FERRUM_MOE_PLUGIN_H_ */
