// deltamem-edge: δ-mem online memory for llama.cpp — public C API.
//
// Part of deltamem-edge (our code, MIT).  Added to the llama.cpp tree at build
// time; it only adds functions, it changes no public llama.h struct, so the
// stock llama-cpp-python 0.3.36 ctypes bindings keep working on this library.
//
// Model:   an adapter (δ-mem weights, loaded from an adapter GGUF or from the
//          δ-mem tensors bundled in a model GGUF) belongs to one llama_model.
// Context: attaching an adapter to a llama_context allocates one state per
//          sequence (n_seq_max of them) next to the layer weights.  The state is
//          independent of the KV cache: seq_rm, clear and context shifts never
//          touch it; only the functions below do.
// Batches: while an adapter is attached, every llama_decode batch must hold the
//          tokens of ONE sequence, unless the context was made with
//          kv_unified = false (then tokens of several sequences may be mixed,
//          each token in exactly one sequence).  Other batches are refused
//          (llama_decode returns -1 and logs why).
// Errors:  functions returning int32_t give 0 on success and a negative value
//          on error; llama_dmem_last_error() then describes the error
//          (thread-local, valid until the next call on the same thread).

#pragma once

#include "llama.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Bumped whenever a function below changes; the Python bindings check it.
#define LLAMA_DMEM_API_VERSION 5

struct llama_dmem_adapter;

LLAMA_API int32_t      llama_dmem_api_version(void);
LLAMA_API const char * llama_dmem_last_error(void);

// Loads the δ-mem weights from `path` (an adapter GGUF with adapter.type = "deltamem",
// or a model GGUF that bundles δ-mem tensors) and validates them against `model`:
// architecture, layer indices, widths of every projection.  NULL on error.
LLAMA_API struct llama_dmem_adapter * llama_dmem_adapter_init(struct llama_model * model, const char * path);
LLAMA_API void llama_dmem_adapter_free(struct llama_dmem_adapter * adapter);

// 1 if `path` carries δ-mem metadata (adapter or bundle), 0 if not, negative if unreadable.
LLAMA_API int32_t llama_dmem_file_has_adapter(const char * path);

LLAMA_API int32_t llama_dmem_adapter_rank       (const struct llama_dmem_adapter * adapter);
LLAMA_API int32_t llama_dmem_adapter_state_heads(const struct llama_dmem_adapter * adapter);
LLAMA_API int32_t llama_dmem_adapter_n_layers   (const struct llama_dmem_adapter * adapter);
// base-model layer index of the i-th δ-mem layer (0 <= i < n_layers), -1 if out of range
LLAMA_API int32_t llama_dmem_adapter_layer      (const struct llama_dmem_adapter * adapter, int32_t i);
// name of the device that runs the i-th δ-mem layer and holds its state ("CPU", "CUDA0", "RPC1", …),
// NULL if out of range; valid while the adapter lives
LLAMA_API const char * llama_dmem_adapter_layer_device(const struct llama_dmem_adapter * adapter, int32_t i);

// Attach `adapter` to `ctx` (NULL detaches and gives back the vanilla model).  Every
// sequence starts with a zero state.  Writes are enabled after attaching.
LLAMA_API int32_t llama_dmem_attach(struct llama_context * ctx, struct llama_dmem_adapter * adapter);
LLAMA_API bool    llama_dmem_is_attached(const struct llama_context * ctx);

// Writes on (default) or off.  Off = read-only: every token reads the frozen state.
LLAMA_API int32_t llama_dmem_set_write(struct llama_context * ctx, bool write);
LLAMA_API bool    llama_dmem_get_write(const struct llama_context * ctx);

// How the δ-mem scan runs.  FUSED: one CPU op per δ-mem layer (fewer graph nodes, the r×r state
// worked on directly); possible only when every δ-mem layer runs on the CPU, and then the default
// after attaching.  STANDARD: standard ggml ops (GATED_DELTA_NET on a padded state), on every
// backend.  Both read and write the same state; switching keeps it.
enum llama_dmem_scan {
    LLAMA_DMEM_SCAN_STANDARD = 0,
    LLAMA_DMEM_SCAN_FUSED    = 1,
};
// Refuses FUSED when a δ-mem layer runs on another device than the CPU.
LLAMA_API int32_t llama_dmem_set_scan(struct llama_context * ctx, int32_t scan);
// LLAMA_DMEM_SCAN_*, or -1 when no adapter is attached
LLAMA_API int32_t llama_dmem_get_scan(const struct llama_context * ctx);

// Segment ids for the NEXT llama_decode (SSW adapters: write_granularity message_mean or
// sentence_mean): one id per token of that batch, -1 = not written.  Every token reads the
// state as it was when the call started; then each id (ascending) writes once, from the mean
// attention input of its tokens.  No id >= 0 (or none set): the call writes per token, as
// upstream falls back.  The call must fit one ubatch.  Ignored by token-granularity adapters.
LLAMA_API int32_t llama_dmem_set_message_ids(struct llama_context * ctx, const int32_t * ids, int32_t n_ids);

// Compact state of one sequence: float32 [n_layers, state_heads*rank, rank], row h*rank+i
// of each layer is component i of state head h (upstream's layout).  n_floats of it.
LLAMA_API int64_t llama_dmem_state_n_floats(const struct llama_context * ctx);
LLAMA_API int32_t llama_dmem_state_get  (struct llama_context * ctx, llama_seq_id seq, float * dst, size_t n_floats);
// Refuses non-finite values; on any error the state is unchanged.
LLAMA_API int32_t llama_dmem_state_set  (struct llama_context * ctx, llama_seq_id seq, const float * src, size_t n_floats);
// seq < 0 resets every sequence
LLAMA_API int32_t llama_dmem_state_reset(struct llama_context * ctx, llama_seq_id seq);

// What the loader parsed, so that callers need not read the adapter file a second time.
// Write granularity (adapter.deltamem.write_granularity), in the order of
// deltamem_edge/gguf_schema.py's WRITE_GRANULARITIES; -1 for NULL.
enum llama_dmem_write_granularity {
    LLAMA_DMEM_WRITE_TOKEN         = 0, // one write per token
    LLAMA_DMEM_WRITE_MESSAGE_MEAN  = 1, // SSW: one write per segment id, a segment = a message
    LLAMA_DMEM_WRITE_SENTENCE_MEAN = 2, // SSW: the same, a segment = a sentence (the caller's ids)
};
LLAMA_API int32_t llama_dmem_adapter_write_granularity(const struct llama_dmem_adapter * adapter);

// The loader's limits: llama_dmem_adapter_init refuses a rank outside 1..max_rank, state heads
// outside 1..max_state_heads, and more δ-mem layers than the model has (a llama.cpp model has at
// most max_layers = LLAMA_MAX_LAYERS).
LLAMA_API int32_t llama_dmem_max_rank       (void);
LLAMA_API int32_t llama_dmem_max_state_heads(void);
LLAMA_API int32_t llama_dmem_max_layers     (void);

#ifdef __cplusplus
}
#endif
