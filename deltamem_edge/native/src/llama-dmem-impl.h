// deltamem-edge: what the δ-mem source files share (internal: never installed, never included by
// llama.cpp): the adapter, layer and per-context structs, the schema constants and limits, and the
// few functions one llama-dmem-*.cpp file offers the others (namespace dmem_internal).
//
// Part of deltamem-edge (our code, MIT).  The files, one job each:
//   llama-dmem-graph.cpp    the δ-mem graph: build_qkv/build_out hooks, graph params, batch guard
//   llama-dmem-fused.cpp    the fused CPU scan: one custom op per layer instead of ≈ 25 standard ops
//   llama-dmem-loader.cpp   reading and checking an adapter GGUF, weights onto the layers' devices
//   llama-dmem-state.cpp    the per-context state store and the state C API (get/set/reset)
//   llama-dmem-backend.cpp  what each device runs: scan width, OUT_PROD, the attach-time check
//   llama-dmem-api.cpp      the rest of the C API, the error text, the table of attached contexts
// llama-dmem.h declares the hooks the llama.cpp patch calls; include/llama-deltamem.h is the C API.

#pragma once

#include "llama-dmem.h"
#include "llama-deltamem.h"

#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <cstdint>
#include <string>
#include <vector>

struct llama_model;

namespace dmem_internal {

// ---------------------------------------------------------------------------------------------
// constants shared with deltamem_edge/gguf_schema.py (names) and deltamem_edge/supported.py
// (limits; the library reports the limits through llama_dmem_max_*)
// ---------------------------------------------------------------------------------------------

constexpr uint32_t     DMEM_SCHEMA_VERSION  = 1;
constexpr int64_t      DMEM_P_MAX           = 32;   // largest padded key/value size of a GDN head = max rank
constexpr int64_t      DMEM_MAX_STATE_HEADS = 64;
constexpr const char * DMEM_MARKER          = ".dmem_";
constexpr const char * KP                   = "adapter.deltamem.";

enum class dmem_mode { standard, lambda_outside, no_lambda };

// ---------------------------------------------------------------------------------------------
// errors (llama-dmem-api.cpp)
// ---------------------------------------------------------------------------------------------

// records `msg` for llama_dmem_last_error() (thread-local), logs it, returns -1
int32_t fail(const std::string & msg);
// throws std::runtime_error with a printf-formatted message; the C API catches it and fail()s
[[noreturn]] void raise(const char * fmt, ...);

} // namespace dmem_internal

// ---------------------------------------------------------------------------------------------
// adapter: weights of every δ-mem layer
// ---------------------------------------------------------------------------------------------

struct llama_dmem_layer {
    int il = -1;
    ggml_tensor * w_in     = nullptr; // [n_embd, 4R or 5R]
    ggml_tensor * b_beta   = nullptr; // [R]
    ggml_tensor * b_lambda = nullptr; // [R] (separate λ only)
    ggml_tensor * w_dq     = nullptr; // [R, Q_out]
    ggml_tensor * w_dk     = nullptr; // [R, K_out]
    ggml_tensor * w_dv     = nullptr; // [R, V_out]
    ggml_tensor * w_do     = nullptr; // [R, n_embd]
    ggml_tensor * do_norm  = nullptr; // [n_embd]
    bool          out_t    = false;   // δ output weights stored f32 [out, R], pre-scaled (llama-dmem-graph.cpp)
};

struct llama_dmem_adapter {
    const llama_model * model = nullptr;

    int64_t   rank  = 0;
    int64_t   heads = 0;
    int64_t   P     = dmem_internal::DMEM_P_MAX; // padded key size of one GDN head (16 or 32, see llama-dmem-graph.cpp)
    float     alpha = 0.0f;
    dmem_internal::dmem_mode mode = dmem_internal::dmem_mode::standard;
    bool      couple_lambda = true;
    bool      normalize_qk  = true;
    float     norm_eps      = 1e-6f;
    float     gate_clamp    = 20.0f;
    bool      do_rmsnorm    = false;
    float     do_rmsnorm_eps = 1e-6f;
    int32_t   granularity    = LLAMA_DMEM_WRITE_TOKEN; // enum llama_dmem_write_granularity
    bool      segment_writes = false; // SSW (message_mean / sentence_mean): one write per segment of a call

    std::vector<llama_dmem_layer> layers;     // in increasing base-layer order
    std::vector<int>              slot_of;    // base layer -> index in `layers`, or -1

    std::vector<ggml_context_ptr>        ctxs;
    std::vector<ggml_backend_buffer_ptr> bufs;

    bool all_cpu = false; // every δ-mem layer on the CPU: the fused scan may run

    // the userdata of a fused-scan ggml op (llama-dmem-fused.cpp): this adapter and the write
    // setting, kept here so that the pointer outlives every graph that uses it
    struct fused_op {
        const llama_dmem_adapter * adapter;
        bool                       write;
    };
    const fused_op fused_ops[2] = { { this, false }, { this, true } }; // [read-only, writes on]

    int64_t rows() const { return rank * heads; }
    int64_t row_floats() const { return P * P * rows(); } // one sequence's padded state in one layer
    bool    uses_lambda() const { return mode != dmem_internal::dmem_mode::no_lambda && !couple_lambda; }

    const llama_dmem_layer * find(int il) const {
        if (il < 0 || (size_t) il >= slot_of.size() || slot_of[il] < 0) {
            return nullptr;
        }
        return &layers[slot_of[il]];
    }
};

// ---------------------------------------------------------------------------------------------
// per-context state store (one per llama_context with an attached adapter)
// ---------------------------------------------------------------------------------------------

struct llama_dmem_context {
    llama_context            * lctx    = nullptr;
    const llama_dmem_adapter * adapter = nullptr;
    bool     write = true;
    bool     fused = false;      // the fused CPU scan (llama-dmem-fused.cpp) instead of standard ops
    uint64_t gen   = 0;          // unique per (attach, write, scan) configuration: forces a graph rebuild
    uint32_t n_seq = 0;

    // SSW: segment ids for the next llama_decode (set by the caller), moved to call_ids when it starts
    std::vector<int32_t> next_ids;
    std::vector<int32_t> call_ids;

    std::vector<ggml_tensor *>           store;  // per base layer: F32 [P*P*R, n_seq] or nullptr
    std::vector<ggml_context_ptr>        ctxs;
    std::vector<ggml_backend_buffer_ptr> bufs;
};

namespace dmem_internal {

// ---------------------------------------------------------------------------------------------
// the table of attached contexts (llama-dmem-api.cpp)
// ---------------------------------------------------------------------------------------------

// the δ-mem state of `ctx`, or nullptr while no adapter is attached to it
llama_dmem_context * find_ctx(const llama_context * ctx);
// a fresh graph generation (llama_dmem_context::gen): a graph built for another one is not reused
uint64_t next_gen();

// ---------------------------------------------------------------------------------------------
// graph builders (llama-dmem-graph.cpp), also used by the attach-time backend check
// ---------------------------------------------------------------------------------------------

// memory q, k, v and the GDN gates for T steps of B sequences, from a [4R|5R, T*B] projection
struct dmem_steps {
    ggml_tensor * q;    // [r, H, T, B]
    ggml_tensor * k;    // [r, H, T, B]
    ggml_tensor * v;    // [1, R, T, B]  (v' = write·v·keep/erase)
    ggml_tensor * gate; // [1, R, T, B]  (log keep)
    ggml_tensor * beta; // [1, R, T, B]  (erase / keep)
};

dmem_steps dmem_inputs(ggml_context * ctx, const llama_dmem_adapter & A, const llama_dmem_layer & L,
                       ggml_tensor * proj, int64_t T, int64_t B, bool write);
// the scan: GATED_DELTA_NET with one head per state row; returns its packed output
// (reads [P, R, T+1, B] then the final states [P, P, R, B])
ggml_tensor * dmem_scan(ggml_context * ctx, const llama_dmem_adapter & A, const dmem_steps & st, ggml_tensor * s0);
// final states [P*P*R, B] inside a scan output of T steps
ggml_tensor * scan_states(ggml_context * ctx, ggml_tensor * out, int64_t P, int64_t R, int64_t T, int64_t B);
// the reads of a scan output of T steps as [R, T*B]
ggml_tensor * scan_reads(ggml_context * ctx, ggml_tensor * out, int64_t P, int64_t R, int64_t T, int64_t B);
// the fused CPU scan of n_tokens = T*B tokens of the rows' B sequences: reads [R, n_tokens] (scaled
// as scan_reads), the store's rows updated in place when `write`; `after` (or nullptr) runs first
ggml_tensor * dmem_fused_scan(ggml_context * ctx, const llama_dmem_adapter & A, const llama_dmem_layer & L,
                              ggml_tensor * proj, ggml_tensor * store, ggml_tensor * rows, int64_t n_tokens,
                              bool write, ggml_tensor * after);
// a δ correction [out, n_tokens] from the reads [R, n_tokens]; the weights carry the δ scale
ggml_tensor * dmem_delta(ggml_context * ctx, const llama_dmem_layer & L, ggml_tensor * w, ggml_tensor * reads);

// ---------------------------------------------------------------------------------------------
// loading (llama-dmem-loader.cpp)
// ---------------------------------------------------------------------------------------------

// reads and checks the δ-mem part of `path` against `model`, weights onto the layers' devices; throws
void load_adapter(llama_dmem_adapter & A, llama_model * model, const char * path);

// ---------------------------------------------------------------------------------------------
// what the devices run (llama-dmem-backend.cpp)
// ---------------------------------------------------------------------------------------------

// whether `dev` runs the δ corrections as OUT_PROD (CPU, CUDA, Vulkan; not Metal at this commit)
bool out_prod_ok(ggml_backend_dev_t dev, int64_t R);
// whether `dev` runs the scan with P keys per head (CPU: any size; CUDA/Vulkan: 16..128; Metal: 32k)
bool gdn_ok(ggml_backend_dev_t dev, int64_t P, int64_t H, int64_t R);
// refuses at attach what a backend would abort on mid-decode, warns about nodes a device cannot run
void check_backends(const llama_dmem_adapter & A, const llama_model & model, uint32_t n_ubatch);

// ---------------------------------------------------------------------------------------------
// the state store (llama-dmem-state.cpp)
// ---------------------------------------------------------------------------------------------

// one zeroed F32 [P*P*R, n_seq] tensor per δ-mem layer, on the layer's device; throws
void alloc_store(llama_dmem_context & dc, const llama_model & model);

} // namespace dmem_internal
