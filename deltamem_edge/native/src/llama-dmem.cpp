// deltamem-edge: δ-mem online memory inside the llama.cpp graph.
//
// Part of deltamem-edge (our code, MIT); compiled into libllama by our build.
//
// What happens per δ-mem layer (math: docs/architecture.md, deltamem-math.md §1):
//   x = attn_norm(h)                       (the `cur` handed to build_qkv)
//   [q̃ k̃ ṽ z_β (z_λ)] = W_in · x           one matmul, rows as in gguf_schema.py
//   q, k = l2n(tanh(q̃)), l2n(tanh(k̃))      per state head
//   gates from the clamped z's             (per state row, update mode table)
//   reads, S_new = scan(S_old, …)          ggml_gated_delta_net, one GDN head per state row
//   Q += s·W_dq·reads, K/V likewise         before q/k-norm and RoPE
//   out += s·W_do·reads (optional RMSNorm)  after wo
//
// The scan reuses the existing GATED_DELTA_NET op so that CPU, CUDA and Metal
// need no new kernels.  Mapping (design note llama-engine.md §3.3):
//   * state row i of head h -> GDN head i*H+h (value slot 0, keys 0..r-1), padded to P keys:
//     P = 16 when rank <= 16 and every device of the adapter's layers runs a 16-wide scan
//     (CPU, CUDA, Vulkan), else 32 (Metal's kernel is 32-wide at least); the scan's work and the
//     state traffic grow with P^2, so 16 is 4x less of both for the usual rank 8;
//   * keep/erase/write coefficients -> log-decay g, β' = erase/keep, v' = write·v·keep/erase;
//   * a no-op step is prepended to k/v/g/β and a zero step appended to q, so token t reads
//     the state BEFORE its own update (δ-mem is read-before-write, GDN is write-then-read);
//   * the kernel's 1/sqrt(P) output scale is undone together with the δ scale alpha/rank, both
//     folded into the δ output weights when the adapter is loaded (one node less per layer).
//
// δ output weights (W_dq/W_dk/W_dv/W_do, [R, out] in the file) are kept as f32 [out, R] on
// devices that run OUT_PROD (the CPU always): a rank-8 read times W as a matmul is `out` dot
// products of length 8, dominated by per-dot overhead; as an outer product it is 8 long axpys.

#include "llama-dmem.h"
#include "llama-deltamem.h"

#include "llama-impl.h"
#include "llama-model.h"
#include "llama-context.h"
#include "llama-graph.h"
#include "llama-batch.h"

#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-cpp.h"
#include "gguf.h"

#include <atomic>
#include <cstdarg>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

// ---------------------------------------------------------------------------------------------
// constants shared with deltamem_edge/gguf_schema.py
// ---------------------------------------------------------------------------------------------

namespace {

constexpr uint32_t    DMEM_SCHEMA_VERSION = 1;
constexpr int64_t     DMEM_P_MAX          = 32;   // largest padded key/value size of a GDN head = max rank
constexpr const char * DMEM_MARKER        = ".dmem_";
constexpr const char * KP                 = "adapter.deltamem.";

enum class dmem_mode { standard, lambda_outside, no_lambda };

thread_local std::string g_last_error;

int32_t fail(const std::string & msg) {
    g_last_error = msg;
    LLAMA_LOG_ERROR("deltamem: %s\n", msg.c_str());
    return -1;
}

[[noreturn]] void raise(const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char buf[1024];
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    throw std::runtime_error(buf);
}

} // namespace

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
    bool          out_t    = false;   // δ output weights stored f32 [out, R], pre-scaled (see top)
};

struct llama_dmem_adapter {
    const llama_model * model = nullptr;

    int64_t   rank  = 0;
    int64_t   heads = 0;
    int64_t   P     = DMEM_P_MAX; // padded key size of one GDN head (16 or 32, see the top of the file)
    float     alpha = 0.0f;
    dmem_mode mode  = dmem_mode::standard;
    bool      couple_lambda = true;
    bool      normalize_qk  = true;
    float     norm_eps      = 1e-6f;
    float     gate_clamp    = 20.0f;
    bool      do_rmsnorm    = false;
    float     do_rmsnorm_eps = 1e-6f;
    bool      segment_writes = false; // SSW (message_mean / sentence_mean): one write per segment of a call

    std::vector<llama_dmem_layer> layers;     // in increasing base-layer order
    std::vector<int>              slot_of;    // base layer -> index in `layers`, or -1

    std::vector<ggml_context_ptr>        ctxs;
    std::vector<ggml_backend_buffer_ptr> bufs;

    int64_t rows() const { return rank * heads; }
    int64_t row_floats() const { return P * P * rows(); } // one sequence's padded state in one layer
    bool    uses_lambda() const { return mode != dmem_mode::no_lambda && !couple_lambda; }

    const llama_dmem_layer * find(int il) const {
        if (il < 0 || (size_t) il >= slot_of.size() || slot_of[il] < 0) {
            return nullptr;
        }
        return &layers[slot_of[il]];
    }
};

// ---------------------------------------------------------------------------------------------
// per-context state store and the side table that links it to its llama_context
// ---------------------------------------------------------------------------------------------

struct llama_dmem_context {
    llama_context            * lctx    = nullptr;
    const llama_dmem_adapter * adapter = nullptr;
    bool     write = true;
    uint64_t gen   = 0;          // unique per (attach, write) configuration: forces a graph rebuild
    uint32_t n_seq = 0;

    // SSW: segment ids for the next llama_decode (set by the caller), moved to call_ids when it starts
    std::vector<int32_t> next_ids;
    std::vector<int32_t> call_ids;

    std::vector<ggml_tensor *>           store;  // per base layer: F32 [P*P*R, n_seq] or nullptr
    std::vector<ggml_context_ptr>        ctxs;
    std::vector<ggml_backend_buffer_ptr> bufs;
};

// llama_context is not ours to extend; a friend declaration (one inserted line in
// llama-context.h) lets us ask for a scheduler re-reserve after attaching, exactly
// as llama_set_adapters_lora does, because the graph grows by our nodes.
struct llama_dmem_access {
    static void request_reserve(llama_context & ctx) { ctx.sched_need_reserve = true; }
};

namespace {

std::atomic<uint64_t> g_gen{1};
std::mutex            g_mu;
std::unordered_map<const llama_context *, std::unique_ptr<llama_dmem_context>> g_ctxs;
std::set<const llama_dmem_adapter *>                                           g_adapters;

llama_dmem_context * find_ctx(const llama_context * ctx) {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_ctxs.find(ctx);
    return it == g_ctxs.end() ? nullptr : it->second.get();
}

} // namespace

// ---------------------------------------------------------------------------------------------
// graph input: which state row (= sequence id) each sequence of the ubatch uses, plus the
// per-layer reads handed from build_qkv to build_attn within one graph
// ---------------------------------------------------------------------------------------------

namespace {

// tokens per sequence and sequences in this ubatch, as the scan sees them
void ubatch_layout(const llama_ubatch & ub, int64_t & T, int64_t & B) {
    if (ub.equal_seqs()) {
        T = ub.n_seq_tokens;
        B = ub.n_seqs;
    } else {
        T = ub.n_tokens; // one sequence (llama_dmem_batch_ok refuses mixed batches here)
        B = 1;
    }
}

class llm_graph_input_dmem : public llm_graph_input_i {
public:
    llm_graph_input_dmem(const llama_dmem_context * dc, int64_t B, int64_t n_layer)
        : dc(dc), gen(dc->gen), B(B), reads(n_layer, nullptr) {}

    void set_input(const llama_ubatch * ub) override {
        std::vector<int32_t> ids(B, 0);
        if (ub->seq_id) {
            const int64_t step = ub->equal_seqs() ? ub->n_seq_tokens : 0;
            for (int64_t s = 0; s < B; ++s) {
                ids[s] = ub->seq_id[s * step][0];
            }
        }
        ggml_backend_tensor_set(rows, ids.data(), 0, B * sizeof(int32_t));
        if (avg) {
            ggml_backend_tensor_set(avg, avg_data.data(), 0, avg_data.size() * sizeof(float));
        }
    }

    bool can_reuse(const llm_graph_params & params) override {
        int64_t T, b;
        ubatch_layout(params.ubatch, T, b);
        // a segment-write graph depends on this call's message ids: never reused
        return params.dmem == dc && params.dmem_gen == gen && b == B && avg == nullptr;
    }

    const llama_dmem_context * dc;
    const uint64_t             gen;
    const int64_t              B;

    ggml_tensor *              rows = nullptr; // I32 [B]
    std::vector<ggml_tensor *> reads;          // per layer: scaled reads [R, n_tokens]

    // SSW: averaging matrix of this call, F32 [n_tokens, n_slots]: column m averages message m
    ggml_tensor *      avg = nullptr;
    std::vector<float> avg_data;
    int64_t            n_slots = 0;
};

llm_graph_input_dmem * find_input(const llm_graph_context & g) {
    for (auto & inp : g.res->inputs) {
        if (auto * d = dynamic_cast<llm_graph_input_dmem *>(inp.get())) {
            return d;
        }
    }
    return nullptr;
}

// rows [off, off+n) of a [nrows, n] projection, made contiguous (already so for one token)
ggml_tensor * proj_rows(ggml_context * ctx, ggml_tensor * proj, int64_t off, int64_t n) {
    ggml_tensor * v = ggml_view_2d(ctx, proj, n, proj->ne[1], proj->nb[1], off * ggml_element_size(proj));
    return ggml_is_contiguous(v) ? v : ggml_cont(ctx, v);
}

// rows [off, off+R) of a [nrows, T*B] projection as a strided [1, R, T, B] view (no copy: the
// element-wise ops and pads that read it take strides on every backend)
ggml_tensor * proj_gates(ggml_context * ctx, ggml_tensor * proj, int64_t off, int64_t R, int64_t T, int64_t B) {
    const size_t f = ggml_element_size(proj);
    return ggml_view_4d(ctx, proj, 1, R, T, B, f, proj->nb[1], proj->nb[1] * T, off * f);
}

// a δ correction [out, n_tokens] from the reads [R, n_tokens]; the weights carry the δ scale
ggml_tensor * dmem_delta(ggml_context * ctx, const llama_dmem_layer & L, ggml_tensor * w, ggml_tensor * reads) {
    return L.out_t ? ggml_out_prod(ctx, w, ggml_transpose(ctx, reads)) // w: [out, R]
                   : ggml_mul_mat(ctx, w, reads);                       // w: [R, out]
}

// memory q, k, v and the GDN gates for T steps of B sequences, from a [4R|5R, T*B] projection
struct dmem_steps {
    ggml_tensor * q;    // [r, H, T, B]
    ggml_tensor * k;    // [r, H, T, B]
    ggml_tensor * v;    // [1, R, T, B]  (v' = write·v·keep/erase)
    ggml_tensor * gate; // [1, R, T, B]  (log keep)
    ggml_tensor * beta; // [1, R, T, B]  (erase / keep)
};

dmem_steps dmem_inputs(ggml_context * ctx, const llama_dmem_adapter & A, const llama_dmem_layer & L,
                       ggml_tensor * proj, int64_t T, int64_t B, bool write) {
    const int64_t r = A.rank, H = A.heads, R = A.rows();
    dmem_steps st;
    // q and k side by side: [r, 2H, T, B] (q heads first), normalised together, then two views
    ggml_tensor * qk = ggml_reshape_4d(ctx, proj_rows(ctx, proj, 0, 2 * R), r, 2 * H, T, B);
    if (A.normalize_qk) {
        qk = ggml_l2_norm(ctx, ggml_tanh(ctx, qk), A.norm_eps);
    }
    const size_t f = ggml_element_size(qk);
    st.q = ggml_view_4d(ctx, qk, r, H, T, B, qk->nb[1], qk->nb[2], qk->nb[3], 0);
    st.k = ggml_view_4d(ctx, qk, r, H, T, B, qk->nb[1], qk->nb[2], qk->nb[3], R * f);
    ggml_tensor * v  = proj_gates(ctx, proj, 2 * R, R, T, B);
    ggml_tensor * zb = proj_gates(ctx, proj, 3 * R, R, T, B);

    // gate pre-activations, clamped: exp/softplus of |z| > ~88 would give inf and then NaN
    // in the state, which would poison a saved memory forever; σ(±20) is 1/0 in fp32 anyway
    zb = ggml_add(ctx, zb, ggml_reshape_4d(ctx, L.b_beta, 1, R, 1, 1));
    zb = ggml_clamp(ctx, zb, -A.gate_clamp, A.gate_clamp);
    ggml_tensor * zl = nullptr;
    if (A.uses_lambda()) {
        zl = proj_gates(ctx, proj, 4 * R, R, T, B);
        zl = ggml_add(ctx, zl, ggml_reshape_4d(ctx, L.b_lambda, 1, R, 1, 1));
        zl = ggml_clamp(ctx, zl, -A.gate_clamp, A.gate_clamp);
    }

    if (!write) {
        // read-only: no decay, no erase, nothing written; the state stays bit-identical
        ggml_tensor * zero = ggml_scale(ctx, zb, 0.0f);
        st.gate = st.beta = st.v = zero;
        return st;
    }
    // per-row keep/erase/write -> GDN (g = log keep, β' = erase/keep, v' = write·v·keep/erase);
    // log σ(-z) = -softplus(z),  log σ(z) = -softplus(-z)
    ggml_tensor * log_keep = nullptr;
    if (A.mode != dmem_mode::no_lambda) {
        log_keep = A.couple_lambda ? ggml_neg(ctx, ggml_softplus(ctx, zb))               // λ = 1-β
                                   : ggml_neg(ctx, ggml_softplus(ctx, ggml_neg(ctx, zl))); // λ = σ(z_λ)
    }
    switch (A.mode) {
        case dmem_mode::standard:      // keep λ, erase β, write β
            st.gate = log_keep;
            st.beta = A.couple_lambda
                ? ggml_exp(ctx, zb)    // β/(1-β)
                : ggml_exp(ctx, ggml_sub(ctx, ggml_neg(ctx, ggml_softplus(ctx, ggml_neg(ctx, zb))), log_keep)); // σ(z)/λ
            st.v = ggml_mul(ctx, v, ggml_exp(ctx, log_keep));
            break;
        case dmem_mode::lambda_outside: // keep λ, erase λβ, write β
            st.gate = log_keep;
            st.beta = ggml_sigmoid(ctx, zb);
            st.v    = v;
            break;
        case dmem_mode::no_lambda:      // keep 1, erase β, write β
            st.gate = ggml_scale(ctx, zb, 0.0f);
            st.beta = ggml_sigmoid(ctx, zb);
            st.v    = v;
            break;
    }
    return st;
}

// the scan: GATED_DELTA_NET with one head per state row; returns its packed output
// (reads [P, R, T+1, B] then the final states [P, P, R, B])
ggml_tensor * dmem_scan(ggml_context * ctx, const llama_dmem_adapter & A, const dmem_steps & st, ggml_tensor * s0) {
    const int64_t P = A.P, r = A.rank;
    // read-before-write: no-op step in front of k/v/g/β, zero step after q
    ggml_tensor * qp = ggml_pad_ext(ctx, st.q,    0, P - r, 0, 0, 0, 1, 0, 0); // [P, H, T+1, B]
    ggml_tensor * kp = ggml_pad_ext(ctx, st.k,    0, P - r, 0, 0, 1, 0, 0, 0); // [P, H, T+1, B]
    ggml_tensor * vp = ggml_pad_ext(ctx, st.v,    0, P - 1, 0, 0, 1, 0, 0, 0); // [P, R, T+1, B]
    ggml_tensor * gp = ggml_pad_ext(ctx, st.gate, 0, 0,     0, 0, 1, 0, 0, 0); // [1, R, T+1, B]
    ggml_tensor * bp = ggml_pad_ext(ctx, st.beta, 0, 0,     0, 0, 1, 0, 0, 0); // [1, R, T+1, B]
    ggml_tensor * out = ggml_gated_delta_net(ctx, qp, kp, vp, gp, bp, s0, 1);
    ggml_set_name(out, "dmem_scan");
    return out;
}

// final states [P*P*R, B] inside a scan output of T steps
ggml_tensor * scan_states(ggml_context * ctx, ggml_tensor * out, int64_t P, int64_t R, int64_t T, int64_t B) {
    const size_t f = sizeof(float);
    return ggml_view_2d(ctx, out, P * P * R, B, P * P * R * f, P * R * (T + 1) * B * f);
}

// the reads of a scan output of T steps as [R, T*B] (value slot 0 of every head, without the
// appended zero step)
ggml_tensor * scan_reads(ggml_context * ctx, ggml_tensor * out, int64_t P, int64_t R, int64_t T, int64_t B) {
    const size_t f = sizeof(float);
    ggml_tensor * reads = ggml_view_4d(ctx, out, 1, R, T, B, P * f, P * R * f, P * R * (T + 1) * f, 0);
    return ggml_reshape_2d(ctx, ggml_cont(ctx, reads), R, T * B);
}

// SSW: the averaging matrix for this call's message ids (ascending ids = slot order), or
// nothing when no token has an id >= 0 (then the call writes per token, as upstream does)
void segment_matrix(const std::vector<int32_t> & ids, std::vector<float> & out, int64_t & n_slots) {
    std::map<int32_t, std::vector<int64_t>> members;
    for (size_t t = 0; t < ids.size(); ++t) {
        if (ids[t] >= 0) {
            members[ids[t]].push_back((int64_t) t);
        }
    }
    n_slots = (int64_t) members.size();
    out.assign(ids.size() * members.size(), 0.0f);
    int64_t m = 0;
    for (const auto & [id, toks] : members) {
        for (int64_t t : toks) {
            out[m * ids.size() + t] = 1.0f / (float) toks.size(); // column m of [n_tokens, n_slots]
        }
        ++m;
    }
}

} // namespace

void llama_dmem_build_qkv(const llm_graph_context & g, ggml_tensor * cur,
                          ggml_tensor *& q_out, ggml_tensor *& k_out, ggml_tensor *& v_out, bool reshaped, int il) {
    const llama_dmem_context * dc = g.dmem;
    if (dc == nullptr) {
        return;
    }
    const llama_dmem_adapter & A = *dc->adapter;
    const llama_dmem_layer * L = A.find(il);
    if (L == nullptr) {
        return;
    }

    ggml_context * ctx = g.ctx0;
    const int64_t P = A.P;
    const int64_t R = A.rows();
    const int64_t n_tokens = cur->ne[1];

    int64_t T, B;
    ubatch_layout(g.ubatch, T, B);
    GGML_ASSERT(T * B == n_tokens);

    llm_graph_input_dmem * inp = find_input(g);
    if (inp == nullptr) {
        auto p = std::make_unique<llm_graph_input_dmem>(dc, B, (int64_t) dc->store.size());
        p->rows = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, B);
        ggml_set_input(p->rows);
        ggml_set_name(p->rows, "dmem_rows");
        if (dc->write && A.segment_writes && B == 1 && (int64_t) dc->call_ids.size() == n_tokens) {
            segment_matrix(dc->call_ids, p->avg_data, p->n_slots);
            if (p->n_slots > 0) {
                p->avg = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_tokens, p->n_slots);
                ggml_set_input(p->avg);
                ggml_set_name(p->avg, "dmem_segments");
            }
        }
        inp = static_cast<llm_graph_input_dmem *>(g.res->add_input(std::move(p)));
    }
    const bool segments = inp->avg != nullptr; // SSW: reads from the call-start state, one write per message

    ggml_tensor * store = dc->store[il];
    ggml_tensor * s0 = ggml_reshape_4d(ctx, ggml_get_rows(ctx, store, inp->rows), P, P, R, B); // [P, P, R, B]

    // the tokens: their reads (and, per token, their writes)
    ggml_tensor * proj = ggml_mul_mat(ctx, L->w_in, cur); // [4R|5R, n_tokens]
    const bool token_writes = dc->write && !segments;
    ggml_tensor * out = dmem_scan(ctx, A, dmem_inputs(ctx, A, *L, proj, T, B, token_writes), s0);

    ggml_tensor * reads = scan_reads(ctx, out, P, R, T, B); // unscaled: W_d* carry the scale
    ggml_set_name(reads, "dmem_reads");
    inp->reads[il] = reads;

    if (token_writes) {
        ggml_build_forward_expand(g.gf, ggml_set_rows(ctx, store, scan_states(ctx, out, P, R, T, B), inp->rows));
    } else if (segments) {
        // one step per message: the mean attention input of its tokens in this call, ids ascending
        const int64_t S = inp->n_slots;
        ggml_tensor * means = ggml_mul_mat(ctx, ggml_cont(ctx, ggml_transpose(ctx, cur)), inp->avg); // [n_embd, S]
        ggml_tensor * sproj = ggml_mul_mat(ctx, L->w_in, means);
        ggml_tensor * sout  = dmem_scan(ctx, A, dmem_inputs(ctx, A, *L, sproj, S, 1, true), s0);
        ggml_build_forward_expand(g.gf, ggml_set_rows(ctx, store, scan_states(ctx, sout, P, R, S, 1), inp->rows));
    }

    auto add_delta = [&](ggml_tensor *& dst, ggml_tensor * w) {
        if (w == nullptr) {
            return;
        }
        ggml_tensor * d = dmem_delta(ctx, *L, w, reads); // [out, n_tokens]
        if (reshaped) {
            d = ggml_reshape_3d(ctx, d, dst->ne[0], dst->ne[1], dst->ne[2]);
        }
        dst = ggml_add(ctx, dst, d);
    };
    add_delta(q_out, L->w_dq);
    add_delta(k_out, L->w_dk);
    add_delta(v_out, L->w_dv);
}

ggml_tensor * llama_dmem_build_out(const llm_graph_context & g, ggml_tensor * cur, ggml_tensor * wo, int il) {
    if (g.dmem == nullptr || wo == nullptr) {
        return cur;
    }
    const llama_dmem_layer * L = g.dmem->adapter->find(il);
    if (L == nullptr || L->w_do == nullptr) {
        return cur;
    }
    llm_graph_input_dmem * inp = find_input(g);
    if (inp == nullptr || inp->reads[il] == nullptr) {
        return cur; // build_qkv was not used for this layer (refused at attach for such archs)
    }
    ggml_context * ctx = g.ctx0;
    ggml_tensor * d = dmem_delta(ctx, *L, L->w_do, inp->reads[il]);
    if (L->do_norm) {
        d = ggml_mul(ctx, ggml_rms_norm(ctx, d, g.dmem->adapter->do_rmsnorm_eps), L->do_norm);
    }
    return ggml_add(ctx, cur, d);
}

// ---------------------------------------------------------------------------------------------
// hooks used by llama-context.cpp and llama-model-loader.cpp
// ---------------------------------------------------------------------------------------------

bool llama_dmem_is_tensor_name(const std::string & name) {
    return name.find(DMEM_MARKER) != std::string::npos;
}

const llama_dmem_context * llama_dmem_for_context(const llama_context * ctx) {
    return find_ctx(ctx);
}

uint64_t llama_dmem_gen_for_context(const llama_context * ctx) {
    const llama_dmem_context * dc = find_ctx(ctx);
    return dc ? dc->gen : 0;
}

uint32_t llama_dmem_graph_extra_nodes(const llama_context * ctx) {
    const llama_dmem_context * dc = find_ctx(ctx);
    // about 45 nodes per δ-mem layer; leave headroom
    return dc ? (uint32_t) (64 * dc->adapter->layers.size() + 16) : 0;
}

bool llama_dmem_batch_ok(llama_context * ctx, const llama_batch & batch) {
    llama_dmem_context * dc = find_ctx(ctx);
    if (dc == nullptr) {
        return true;
    }
    // SSW segment ids belong to exactly one call: this one
    const bool had_ids = !dc->call_ids.empty();
    dc->call_ids.swap(dc->next_ids);
    dc->next_ids.clear();
    if (had_ids || !dc->call_ids.empty()) {
        dc->gen = g_gen.fetch_add(1); // a segment graph is built for its own call only
    }
    if (!dc->call_ids.empty()) {
        if ((int32_t) dc->call_ids.size() != batch.n_tokens) {
            fail("δ-mem message ids: " + std::to_string(dc->call_ids.size()) + " ids for a batch of " +
                 std::to_string(batch.n_tokens) + " tokens");
            dc->call_ids.clear();
            return false;
        }
        if ((uint32_t) batch.n_tokens > ctx->get_cparams().n_ubatch) {
            fail("a call with message ids must fit one ubatch (" + std::to_string(batch.n_tokens) + " tokens > n_ubatch " +
                 std::to_string(ctx->get_cparams().n_ubatch) + "): segment writes average over the whole call");
            dc->call_ids.clear();
            return false;
        }
    }
    if (batch.seq_id == nullptr || batch.n_tokens <= 0) {
        return true;
    }
    const bool unified = ctx->get_cparams().kv_unified || !dc->call_ids.empty();
    llama_seq_id first = -1;
    for (int32_t i = 0; i < batch.n_tokens; ++i) {
        const int n_ids = batch.n_seq_id ? batch.n_seq_id[i] : 1;
        if (n_ids != 1) {
            fail("a token in several sequences at once cannot be written into δ-mem states; "
                 "feed each sequence's tokens separately");
            return false;
        }
        const llama_seq_id s = batch.seq_id[i][0];
        if (first < 0) {
            first = s;
        } else if (s != first && unified) {
            fail("with a δ-mem adapter attached, a batch must hold one sequence "
                 "(or create the context with kv_unified = false; calls with message ids: always one)");
            return false;
        }
    }
    return true;
}

void llama_dmem_context_release(llama_context * ctx) {
    std::lock_guard<std::mutex> lock(g_mu);
    g_ctxs.erase(ctx);
}

// ---------------------------------------------------------------------------------------------
// loading an adapter
// ---------------------------------------------------------------------------------------------

namespace {

struct gguf_file {
    gguf_context * gctx = nullptr;
    ggml_context * meta = nullptr;
    ~gguf_file() {
        if (gctx) gguf_free(gctx);
        if (meta) ggml_free(meta);
    }
};

int64_t find_key(const gguf_context * g, const std::string & key, enum gguf_type type, bool required) {
    const int64_t id = gguf_find_key(g, key.c_str());
    if (id < 0) {
        if (required) {
            raise("missing metadata key '%s'", key.c_str());
        }
        return -1;
    }
    if (gguf_get_kv_type(g, id) != type) {
        raise("metadata key '%s' has type %s, expected %s", key.c_str(),
              gguf_type_name(gguf_get_kv_type(g, id)), gguf_type_name(type));
    }
    return id;
}

uint32_t get_u32(const gguf_context * g, const std::string & key) {
    return gguf_get_val_u32(g, find_key(g, key, GGUF_TYPE_UINT32, true));
}
float get_f32(const gguf_context * g, const std::string & key, float def, bool required = false) {
    const int64_t id = find_key(g, key, GGUF_TYPE_FLOAT32, required);
    return id < 0 ? def : gguf_get_val_f32(g, id);
}
bool get_bool(const gguf_context * g, const std::string & key, bool def) {
    const int64_t id = find_key(g, key, GGUF_TYPE_BOOL, false);
    return id < 0 ? def : gguf_get_val_bool(g, id);
}
std::string get_str(const gguf_context * g, const std::string & key, const std::string & def, bool required = false) {
    const int64_t id = find_key(g, key, GGUF_TYPE_STRING, required);
    return id < 0 ? def : std::string(gguf_get_val_str(g, id));
}

std::string model_arch(const llama_model * model) {
    char buf[128] = {0};
    if (llama_model_meta_val_str(model, "general.architecture", buf, sizeof(buf)) < 0) {
        return "";
    }
    return buf;
}

bool arch_supported(const std::string & arch) {
    // archs whose attention goes through build_qkv + build_attn(kv) with wo applied there
    return arch == "llama" || arch == "qwen2" || arch == "qwen3" || arch == "smollm3";
}

std::string shape_str(const ggml_tensor * t) {
    std::string s = "[";
    for (int i = 0; i < ggml_n_dims(t); ++i) {
        s += (i ? ", " : "") + std::to_string(t->ne[i]);
    }
    return s + "]";
}

void expect_shape(const ggml_tensor * t, int64_t ne0, int64_t ne1, const char * what) {
    const bool ok = ne1 == 0 ? (ggml_n_dims(t) == 1 && t->ne[0] == ne0)
                             : (ggml_n_dims(t) == 2 && t->ne[0] == ne0 && t->ne[1] == ne1);
    if (!ok) {
        const std::string want = ne1 == 0 ? "[" + std::to_string(ne0) + "]"
                                          : "[" + std::to_string(ne0) + ", " + std::to_string(ne1) + "]";
        raise("tensor '%s' has shape %s but %s needs %s", t->name, shape_str(t).c_str(), what, want.c_str());
    }
}

void expect_type(const ggml_tensor * t, bool matrix) {
    const bool ok = t->type == GGML_TYPE_F32 || (matrix && (t->type == GGML_TYPE_F16 || t->type == GGML_TYPE_BF16));
    if (!ok) {
        raise("tensor '%s' has type %s; δ-mem %s must be %s", t->name, ggml_type_name(t->type),
              matrix ? "weights" : "vectors", matrix ? "F32, F16 or BF16" : "F32");
    }
}

// whether `dev` runs the op that `build` makes in a scratch context (the CPU runs every op we build)
template <typename F>
bool dev_runs(ggml_backend_dev_t dev, F build) {
    if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU) {
        return true;
    }
    ggml_init_params ip = { /*.mem_size =*/ 8 * ggml_tensor_overhead(), /*.mem_buffer =*/ nullptr, /*.no_alloc =*/ true };
    ggml_context_ptr ctx(ggml_init(ip));
    return ggml_backend_dev_supports_op(dev, build(ctx.get()));
}

// whether `dev` runs the δ corrections as OUT_PROD (CPU, CUDA, Vulkan; not Metal at this commit)
bool out_prod_ok(ggml_backend_dev_t dev, int64_t R) {
    return dev_runs(dev, [R](ggml_context * c) {
        ggml_tensor * w     = ggml_new_tensor_2d(c, GGML_TYPE_F32, 128, R);
        ggml_tensor * reads = ggml_new_tensor_2d(c, GGML_TYPE_F32, R, 2);
        return ggml_out_prod(c, w, ggml_transpose(c, reads));
    });
}

// whether `dev` runs the scan with P keys per head (CPU: any size; CUDA/Vulkan: 16..128; Metal: 32k)
bool gdn_ok(ggml_backend_dev_t dev, int64_t P, int64_t H, int64_t R) {
    return dev_runs(dev, [P, H, R](ggml_context * c) {
        ggml_tensor * q  = ggml_new_tensor_4d(c, GGML_TYPE_F32, P, H, 2, 1);
        ggml_tensor * k  = ggml_new_tensor_4d(c, GGML_TYPE_F32, P, H, 2, 1);
        ggml_tensor * v  = ggml_new_tensor_4d(c, GGML_TYPE_F32, P, R, 2, 1);
        ggml_tensor * g  = ggml_new_tensor_4d(c, GGML_TYPE_F32, 1, R, 2, 1);
        ggml_tensor * b  = ggml_new_tensor_4d(c, GGML_TYPE_F32, 1, R, 2, 1);
        ggml_tensor * s0 = ggml_new_tensor_4d(c, GGML_TYPE_F32, P, P, R, 1);
        return ggml_gated_delta_net(c, q, k, v, g, b, s0, 1);
    });
}

void load_adapter(llama_dmem_adapter & A, llama_model * model, const char * path) {
    gguf_file gf;
    gguf_init_params params = { /*.no_alloc =*/ true, /*.ctx =*/ &gf.meta };
    gf.gctx = gguf_init_from_file(path, params);
    if (gf.gctx == nullptr) {
        raise("not a readable GGUF file (missing, truncated or malformed)");
    }
    const gguf_context * g = gf.gctx;

    const std::string gtype = get_str(g, "general.type", "");
    const std::string atype = get_str(g, "adapter.type", "");
    const bool has_dmem = gguf_find_key(g, (std::string(KP) + "version").c_str()) >= 0;
    if (gtype == "adapter" && atype != "deltamem") {
        raise("this is a '%s' adapter, not a δ-mem adapter (adapter.type must be 'deltamem')",
              atype.empty() ? "unknown" : atype.c_str());
    }
    if (!has_dmem) {
        raise("no δ-mem metadata (%sversion) in this file: it is neither a δ-mem adapter nor a bundle", KP);
    }
    const bool standalone = gtype == "adapter";

    const uint32_t version = get_u32(g, std::string(KP) + "version");
    if (version != DMEM_SCHEMA_VERSION) {
        raise("δ-mem schema version %u is not supported by this build (it reads version %u)",
              version, DMEM_SCHEMA_VERSION);
    }

    const std::string arch  = get_str(g, "general.architecture", "", true);
    const std::string march = model_arch(model);
    if (arch != march) {
        raise("adapter is for architecture '%s' but the model is '%s'", arch.c_str(), march.c_str());
    }
    if (!arch_supported(arch)) {
        raise("architecture '%s' is not supported by δ-mem (supported: llama, qwen2, qwen3, smollm3)", arch.c_str());
    }

    A.model = model;
    A.rank  = get_u32(g, std::string(KP) + "rank");
    A.heads = get_u32(g, std::string(KP) + "state_heads");
    if (A.rank < 1 || A.rank > DMEM_P_MAX) {
        raise("rank %lld is outside 1..%lld", (long long) A.rank, (long long) DMEM_P_MAX);
    }
    if (A.heads < 1 || A.heads > 64) {
        raise("state_heads %lld is outside 1..64", (long long) A.heads);
    }
    A.alpha = get_f32(g, std::string(KP) + "alpha", 0.0f, true);
    if (!(A.alpha > 0.0f) || !std::isfinite(A.alpha)) {
        raise("alpha must be a positive number, got %g", A.alpha);
    }
    const std::string mode = get_str(g, std::string(KP) + "update_mode", "standard");
    if (mode == "standard") {
        A.mode = dmem_mode::standard;
    } else if (mode == "lambda_outside") {
        A.mode = dmem_mode::lambda_outside;
    } else if (mode == "no_lambda") {
        A.mode = dmem_mode::no_lambda;
    } else {
        raise("unknown update_mode '%s' (standard, lambda_outside, no_lambda)", mode.c_str());
    }
    A.couple_lambda  = get_bool(g, std::string(KP) + "couple_lambda", true);
    A.normalize_qk   = get_bool(g, std::string(KP) + "normalize_qk", true);
    A.norm_eps       = get_f32(g, std::string(KP) + "norm_eps", 1e-6f);
    A.gate_clamp     = get_f32(g, std::string(KP) + "gate_clamp", 20.0f);
    A.do_rmsnorm     = get_bool(g, std::string(KP) + "delta_o_rmsnorm", false);
    A.do_rmsnorm_eps = get_f32(g, std::string(KP) + "delta_o_rmsnorm_eps", 1e-6f);
    if (!(A.norm_eps >= 0.0f) || !(A.gate_clamp > 0.0f && A.gate_clamp <= 40.0f) || !(A.do_rmsnorm_eps > 0.0f)) {
        raise("norm_eps, gate_clamp (0 < c <= 40) or delta_o_rmsnorm_eps out of range");
    }
    const std::string gran = get_str(g, std::string(KP) + "write_granularity", "token");
    if (gran != "token" && gran != "message_mean" && gran != "sentence_mean") {
        raise("unknown write_granularity '%s' (token, message_mean, sentence_mean)", gran.c_str());
    }
    A.segment_writes = gran != "token";
    const std::string order = get_str(g, std::string(KP) + "row_order", "gdn");
    if (order != "gdn") {
        raise("row_order '%s' is not supported (expected 'gdn')", order.c_str());
    }

    std::set<std::string> heads;
    {
        const std::string s = get_str(g, std::string(KP) + "delta_heads", "", true);
        size_t pos = 0;
        while (pos <= s.size()) {
            const size_t comma = s.find(',', pos);
            const std::string h = s.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
            if (!h.empty()) {
                if (h != "q" && h != "k" && h != "v" && h != "o") {
                    raise("unknown delta head '%s' (q, k, v, o)", h.c_str());
                }
                heads.insert(h);
            }
            if (comma == std::string::npos) break;
            pos = comma + 1;
        }
    }

    const int32_t n_layer = llama_model_n_layer(model);
    std::vector<int> layer_ids;
    {
        const int64_t id = gguf_find_key(g, (std::string(KP) + "layers").c_str());
        if (id < 0 || gguf_get_kv_type(g, id) != GGUF_TYPE_ARRAY) {
            raise("missing or malformed metadata key '%slayers' (array of layer indices)", KP);
        }
        const gguf_type et = gguf_get_arr_type(g, id);
        const size_t    n  = gguf_get_arr_n(g, id);
        if ((et != GGUF_TYPE_UINT32 && et != GGUF_TYPE_INT32) || n == 0 || n > (size_t) n_layer) {
            raise("'%slayers' must be a non-empty u32 array of at most %d layers", KP, n_layer);
        }
        const int32_t * data = (const int32_t *) gguf_get_arr_data(g, id);
        for (size_t i = 0; i < n; ++i) {
            if (data[i] < 0 || data[i] >= n_layer) {
                raise("adapter has layer %d but the model has %d layers (0..%d)", data[i], n_layer, n_layer - 1);
            }
            if (!layer_ids.empty() && data[i] <= layer_ids.back()) {
                raise("'%slayers' must be strictly increasing", KP);
            }
            layer_ids.push_back(data[i]);
        }
    }

    const llama_hparams & hp = model->hparams;
    const int64_t n_embd = hp.n_embd;
    const int64_t R      = A.rows();
    const int64_t n_in   = A.uses_lambda() ? 5 * R : 4 * R;

    // collect the δ-mem tensors of the file by name
    std::map<std::string, ggml_tensor *> by_name;
    for (ggml_tensor * t = ggml_get_first_tensor(gf.meta); t; t = ggml_get_next_tensor(gf.meta, t)) {
        const std::string name = t->name;
        if (llama_dmem_is_tensor_name(name)) {
            by_name[name] = t;
        } else if (standalone) {
            raise("unexpected tensor '%s' in a δ-mem adapter", name.c_str());
        }
    }
    if (by_name.empty() && !standalone) {
        // llama.cpp's quantizer (like any tool that rewrites a model through the stock loader)
        // copies every key but only the tensors it knows: the δ-mem settings survive, the tensors not
        raise("this bundle has δ-mem settings but no δ-mem tensors: a tool that rewrote it (llama.cpp's "
              "quantizer does) dropped them; quantize the plain base model, then bundle it again");
    }

    std::set<std::string> used;
    auto take = [&](int il, const char * suffix, bool required) -> ggml_tensor * {
        const std::string name = "blk." + std::to_string(il) + ".dmem_" + suffix;
        auto it = by_name.find(name);
        if (it == by_name.end()) {
            if (required) {
                raise("missing tensor '%s'", name.c_str());
            }
            return nullptr;
        }
        used.insert(name);
        return it->second;
    };

    A.slot_of.assign(n_layer, -1);
    std::map<ggml_backend_buffer_type_t, ggml_context *> ctx_of;
    struct copy { ggml_tensor * src; ggml_tensor * dst; bool delta_out; bool transposed; };
    std::vector<copy> copies; // file tensor -> device tensor
    A.P = 16;
    for (int il : layer_ids) {
        if (A.rank > 16 || !gdn_ok(model->dev_layer(il), 16, A.heads, A.rows())) {
            A.P = 32;
        }
    }
    const float delta_scale = (A.alpha / (float) A.rank) * sqrtf((float) A.P); // see the top of the file

    for (int il : layer_ids) {
        const llama_layer & ml = model->layers[il];
        const int64_t q_out = (int64_t) hp.n_embd_head_k(il) * hp.n_head(il);
        const int64_t k_out = hp.n_embd_k_gqa(il);
        const int64_t v_out = hp.n_embd_v_gqa(il);
        if (ml.wo == nullptr || (ml.wq == nullptr && ml.wqkv == nullptr)) {
            raise("layer %d of the model has no standard attention projections", il);
        }

        llama_dmem_layer L;
        L.il     = il;
        L.w_in   = take(il, "in.weight", true);
        L.b_beta = take(il, "beta.bias", true);
        expect_type(L.w_in, true);
        expect_type(L.b_beta, false);
        expect_shape(L.w_in, n_embd, n_in, "the model width and rank*state_heads");
        expect_shape(L.b_beta, R, 0, "rank*state_heads");
        if (A.uses_lambda()) {
            L.b_lambda = take(il, "lambda.bias", true);
            expect_type(L.b_lambda, false);
            expect_shape(L.b_lambda, R, 0, "rank*state_heads");
        }
        struct { const char * h; const char * suffix; int64_t out; ggml_tensor * llama_dmem_layer::*dst; } dh[] = {
            {"q", "dq.weight", q_out,  &llama_dmem_layer::w_dq},
            {"k", "dk.weight", k_out,  &llama_dmem_layer::w_dk},
            {"v", "dv.weight", v_out,  &llama_dmem_layer::w_dv},
            {"o", "do.weight", n_embd, &llama_dmem_layer::w_do},
        };
        for (auto & d : dh) {
            if (heads.count(d.h)) {
                ggml_tensor * t = take(il, d.suffix, true);
                expect_type(t, true);
                expect_shape(t, R, d.out, "rank*state_heads and the model's projection width");
                L.*d.dst = t;
            }
        }
        if (A.do_rmsnorm) {
            if (!heads.count("o")) {
                raise("delta_o_rmsnorm is set but 'o' is not a delta head");
            }
            L.do_norm = take(il, "do_norm.weight", true);
            expect_type(L.do_norm, false);
            expect_shape(L.do_norm, n_embd, 0, "the model width");
        }

        // device copies on the layer's device (the plain buffer type: never a CPU repack buffer)
        ggml_backend_dev_t dev = model->dev_layer(il);
        L.out_t = out_prod_ok(dev, R);
        ggml_backend_buffer_type_t buft = ggml_backend_dev_buffer_type(dev);
        ggml_context * dctx = ctx_of[buft];
        if (dctx == nullptr) {
            ggml_init_params ip = { /*.mem_size =*/ 8 * ggml_tensor_overhead() * layer_ids.size() + 1024,
                                    /*.mem_buffer =*/ nullptr, /*.no_alloc =*/ true };
            dctx = ggml_init(ip);
            if (dctx == nullptr) {
                raise("out of memory creating the adapter context");
            }
            ctx_of[buft] = dctx;
            A.ctxs.emplace_back(dctx);
        }
        for (ggml_tensor * llama_dmem_layer::*m : {&llama_dmem_layer::w_in, &llama_dmem_layer::b_beta,
                                                   &llama_dmem_layer::b_lambda, &llama_dmem_layer::w_dq,
                                                   &llama_dmem_layer::w_dk, &llama_dmem_layer::w_dv,
                                                   &llama_dmem_layer::w_do, &llama_dmem_layer::do_norm}) {
            if (L.*m) {
                ggml_tensor * src = L.*m;
                const bool delta_out = m == &llama_dmem_layer::w_dq || m == &llama_dmem_layer::w_dk ||
                                       m == &llama_dmem_layer::w_dv || m == &llama_dmem_layer::w_do;
                ggml_tensor * dt = !delta_out ? ggml_dup_tensor(dctx, src)
                                 : L.out_t    ? ggml_new_tensor_2d(dctx, GGML_TYPE_F32, src->ne[1], src->ne[0])
                                              : ggml_new_tensor_2d(dctx, GGML_TYPE_F32, src->ne[0], src->ne[1]);
                ggml_set_name(dt, src->name);
                copies.push_back({ src, dt, delta_out, delta_out && L.out_t });
                L.*m = dt;
            }
        }
        A.slot_of[il] = (int) A.layers.size();
        A.layers.push_back(L);
    }

    for (const auto & [name, t] : by_name) {
        if (!used.count(name)) {
            raise("unexpected δ-mem tensor '%s' (not used by the declared layers/heads)", name.c_str());
        }
    }

    for (auto & [buft, dctx] : ctx_of) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(dctx, buft);
        if (buf == nullptr) {
            raise("could not allocate %s memory for the adapter", ggml_backend_buft_name(buft));
        }
        A.bufs.emplace_back(buf);
    }

    // read the data, never past the end of the file
    FILE * fp = std::fopen(path, "rb");
    if (fp == nullptr) {
        raise("cannot open the file for reading");
    }
    std::unique_ptr<FILE, int (*)(FILE *)> fguard(fp, std::fclose);
    if (std::fseek(fp, 0, SEEK_END) != 0) {
        raise("cannot seek in the file");
    }
    const long fsize = std::ftell(fp);
    const size_t data_off = gguf_get_data_offset(g);
    std::vector<uint8_t> buf;
    std::vector<float>   f32, out;
    for (const auto & [src, dst, delta_out, transposed] : copies) {
        const int64_t tid = gguf_find_tensor(g, src->name);
        const size_t off  = data_off + gguf_get_tensor_offset(g, tid);
        const size_t n    = ggml_nbytes(src);
        if (fsize < 0 || off > (size_t) fsize || n > (size_t) fsize - off) {
            raise("file is truncated: tensor '%s' needs bytes %zu..%zu but the file has %ld", src->name, off, off + n, fsize);
        }
        buf.resize(n);
        if (std::fseek(fp, (long) off, SEEK_SET) != 0 || std::fread(buf.data(), 1, n, fp) != n) {
            raise("could not read tensor '%s'", src->name);
        }
        if (!delta_out) {
            ggml_backend_tensor_set(dst, buf.data(), 0, n);
            continue;
        }
        // δ output weights: to f32, times the δ scale, transposed for OUT_PROD
        const int64_t R = src->ne[0], n_out = src->ne[1], ne = R * n_out;
        f32.resize(ne);
        if (src->type == GGML_TYPE_F32) {
            std::memcpy(f32.data(), buf.data(), ne * sizeof(float));
        } else {
            ggml_get_type_traits(src->type)->to_float(buf.data(), f32.data(), ne);
        }
        out.resize(ne);
        for (int64_t o = 0; o < n_out; ++o) {
            for (int64_t i = 0; i < R; ++i) {
                out[transposed ? i * n_out + o : o * R + i] = f32[o * R + i] * delta_scale;
            }
        }
        ggml_backend_tensor_set(dst, out.data(), 0, ne * sizeof(float));
    }
}

void alloc_store(llama_dmem_context & dc, const llama_model & model) {
    const llama_dmem_adapter & A = *dc.adapter;
    dc.store.assign(model.hparams.n_layer(), nullptr);
    std::map<ggml_backend_buffer_type_t, ggml_context *> ctx_of;
    for (const auto & L : A.layers) {
        ggml_backend_buffer_type_t buft = ggml_backend_dev_buffer_type(model.dev_layer(L.il));
        ggml_context * sctx = ctx_of[buft];
        if (sctx == nullptr) {
            ggml_init_params ip = { /*.mem_size =*/ ggml_tensor_overhead() * (A.layers.size() + 1),
                                    /*.mem_buffer =*/ nullptr, /*.no_alloc =*/ true };
            sctx = ggml_init(ip);
            if (sctx == nullptr) {
                raise("out of memory creating the state context");
            }
            ctx_of[buft] = sctx;
            dc.ctxs.emplace_back(sctx);
        }
        ggml_tensor * t = ggml_new_tensor_2d(sctx, GGML_TYPE_F32, A.row_floats(), dc.n_seq);
        ggml_format_name(t, "dmem_state-%d", L.il);
        dc.store[L.il] = t;
    }
    for (auto & [buft, sctx] : ctx_of) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(sctx, buft);
        if (buf == nullptr) {
            raise("could not allocate %s memory for the δ-mem states", ggml_backend_buft_name(buft));
        }
        ggml_backend_buffer_clear(buf, 0);
        dc.bufs.emplace_back(buf);
    }
}

// padded per-layer row <-> compact [R, r] block, upstream row order h*r+i
void compact_row(const llama_dmem_adapter & A, const float * padded, float * compact) {
    const int64_t P = A.P, r = A.rank, H = A.heads;
    for (int64_t h = 0; h < H; ++h) {
        for (int64_t i = 0; i < r; ++i) {
            const float * src = padded + (i * H + h) * P * P; // GDN head i*H+h, value slot 0
            std::memcpy(compact + (h * r + i) * r, src, r * sizeof(float));
        }
    }
}

void expand_row(const llama_dmem_adapter & A, const float * compact, float * padded) {
    const int64_t P = A.P, r = A.rank, H = A.heads;
    std::memset(padded, 0, A.row_floats() * sizeof(float));
    for (int64_t h = 0; h < H; ++h) {
        for (int64_t i = 0; i < r; ++i) {
            std::memcpy(padded + (i * H + h) * P * P, compact + (h * r + i) * r, r * sizeof(float));
        }
    }
}

// Refuse at attach what a backend would abort on in the middle of a decode, and say which δ-mem
// nodes a device cannot run (the scheduler then runs them on the CPU: correct, but a copy to the
// host and back per δ-mem layer).  Checks the layer's real sub-graph for a 2-token call, B = 1.
void check_backends(const llama_dmem_adapter & A, const llama_model & model, uint32_t n_ubatch) {
    // CUDA/HIP/MUSA/Vulkan run GATED_DELTA_NET only for head sizes 16/32/64/128 (CUDA's supports_op
    // says yes to any size and then aborts inside the kernel): P is 16 or 32, so this always holds
    const int64_t P = A.P, r = A.rank, H = A.heads, R = A.rows();
    if (P != 16 && P != 32) {
        raise("internal: padded scan size %lld is not 16 or 32", (long long) P);
    }
    std::set<ggml_backend_dev_t> seen;
    for (const auto & L : A.layers) {
        ggml_backend_dev_t dev = model.dev_layer(L.il);
        if (!seen.insert(dev).second || ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU) {
            continue;
        }
        // the real δ-mem sub-graph of this layer (same builders as llama_dmem_build_qkv), for a
        // 2-token call (strided views as in prefill) with writes on, plus the read-only gates
        const size_t n_max = 256;
        ggml_init_params ip = { /*.mem_size =*/ n_max * ggml_tensor_overhead() + ggml_graph_overhead_custom(n_max, false),
                                /*.mem_buffer =*/ nullptr, /*.no_alloc =*/ true };
        ggml_context_ptr ctx_ptr(ggml_init(ip));
        ggml_context * ctx = ctx_ptr.get();
        const int64_t T = 2;
        ggml_tensor * x     = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, L.w_in->ne[0], T);
        ggml_tensor * store = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, A.row_floats(), 4);
        ggml_tensor * ids   = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, 1);
        ggml_tensor * proj  = ggml_mul_mat(ctx, L.w_in, x);
        ggml_tensor * s0    = ggml_reshape_4d(ctx, ggml_get_rows(ctx, store, ids), P, P, R, 1);
        ggml_tensor * out   = dmem_scan(ctx, A, dmem_inputs(ctx, A, L, proj, T, 1, true), s0);
        ggml_tensor * reads = scan_reads(ctx, out, P, R, T, 1);
        ggml_cgraph * gf = ggml_new_graph_custom(ctx, n_max, false);
        ggml_build_forward_expand(gf, ggml_set_rows(ctx, store, scan_states(ctx, out, P, R, T, 1), ids));
        ggml_build_forward_expand(gf, dmem_inputs(ctx, A, L, proj, T, 1, false).gate);
        for (ggml_tensor * w : { L.w_dq, L.w_dk, L.w_dv, L.w_do }) {
            if (w) {
                ggml_build_forward_expand(gf, dmem_delta(ctx, L, w, reads));
            }
        }
        if (L.do_norm) {
            ggml_build_forward_expand(gf, ggml_rms_norm(ctx, reads, A.do_rmsnorm_eps));
        }
        std::set<std::string> missing;
        for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
            ggml_tensor * n = ggml_graph_node(gf, i);
            const bool is_view = n->op == GGML_OP_NONE || n->op == GGML_OP_VIEW || n->op == GGML_OP_RESHAPE ||
                                 n->op == GGML_OP_PERMUTE || n->op == GGML_OP_TRANSPOSE;
            if (!is_view && !ggml_backend_dev_supports_op(dev, n)) {
                missing.insert(ggml_op_desc(n));
            }
        }
        if (!missing.empty()) {
            std::string list;
            for (const auto & m : missing) {
                list += (list.empty() ? "" : ", ") + m;
            }
            LLAMA_LOG_WARN("deltamem: %s cannot run %s for this adapter (rank %lld, %lld state heads); "
                           "those δ-mem nodes run on the CPU\n", ggml_backend_dev_name(dev), list.c_str(),
                           (long long) r, (long long) H);
        }
        // ggml-metal's scan loops over tokens with a 16-bit counter: n_ubatch + 1 must fit
        if (strcmp(ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev)), "MTL") == 0 && n_ubatch >= 32767) {
            raise("n_ubatch %u is too large for the Metal δ-mem scan (at most 32766)", n_ubatch);
        }
    }
}

llama_dmem_context * checked_ctx(const llama_context * ctx, llama_seq_id seq, bool any_seq_ok) {
    llama_dmem_context * dc = find_ctx(ctx);
    if (dc == nullptr) {
        raise("no δ-mem adapter is attached to this context");
    }
    if (!(any_seq_ok && seq < 0) && (seq < 0 || (uint32_t) seq >= dc->n_seq)) {
        raise("sequence %d is outside 0..%u", seq, dc->n_seq - 1);
    }
    return dc;
}

} // namespace

// ---------------------------------------------------------------------------------------------
// C API
// ---------------------------------------------------------------------------------------------

int32_t llama_dmem_api_version(void) {
    return LLAMA_DMEM_API_VERSION;
}

const char * llama_dmem_last_error(void) {
    return g_last_error.c_str();
}

struct llama_dmem_adapter * llama_dmem_adapter_init(struct llama_model * model, const char * path) {
    g_last_error.clear();
    if (model == nullptr || path == nullptr) {
        fail("llama_dmem_adapter_init: model and path are required");
        return nullptr;
    }
    auto A = std::make_unique<llama_dmem_adapter>();
    try {
        load_adapter(*A, model, path);
    } catch (const std::exception & e) {
        fail(std::string(path) + ": " + e.what());
        return nullptr;
    }
    std::lock_guard<std::mutex> lock(g_mu);
    g_adapters.insert(A.get());
    return A.release();
}

void llama_dmem_adapter_free(struct llama_dmem_adapter * adapter) {
    if (adapter == nullptr) {
        return;
    }
    std::unique_ptr<llama_dmem_adapter> owned(adapter);
    std::lock_guard<std::mutex> lock(g_mu);
    // detach it from every context that still uses it, so no graph points at freed weights
    for (auto it = g_ctxs.begin(); it != g_ctxs.end();) {
        if (it->second->adapter == adapter) {
            llama_dmem_access::request_reserve(*it->second->lctx);
            it = g_ctxs.erase(it);
        } else {
            ++it;
        }
    }
    g_adapters.erase(adapter);
}

int32_t llama_dmem_file_has_adapter(const char * path) {
    gguf_file gf;
    gguf_init_params params = { /*.no_alloc =*/ true, /*.ctx =*/ nullptr };
    gf.gctx = gguf_init_from_file(path, params);
    if (gf.gctx == nullptr) {
        return fail(std::string(path) + ": not a readable GGUF file");
    }
    return gguf_find_key(gf.gctx, (std::string(KP) + "version").c_str()) >= 0 ? 1 : 0;
}

int32_t llama_dmem_adapter_rank(const struct llama_dmem_adapter * a)        { return a ? (int32_t) a->rank : -1; }
int32_t llama_dmem_adapter_state_heads(const struct llama_dmem_adapter * a) { return a ? (int32_t) a->heads : -1; }
int32_t llama_dmem_adapter_n_layers(const struct llama_dmem_adapter * a)    { return a ? (int32_t) a->layers.size() : -1; }
int32_t llama_dmem_adapter_layer(const struct llama_dmem_adapter * a, int32_t i) {
    if (a == nullptr || i < 0 || (size_t) i >= a->layers.size()) {
        return -1;
    }
    return a->layers[i].il;
}

int32_t llama_dmem_attach(struct llama_context * ctx, struct llama_dmem_adapter * adapter) {
    g_last_error.clear();
    if (ctx == nullptr) {
        return fail("llama_dmem_attach: context is required");
    }
    llama_synchronize(ctx);
    if (adapter == nullptr) {
        std::lock_guard<std::mutex> lock(g_mu);
        if (g_ctxs.erase(ctx)) {
            llama_dmem_access::request_reserve(*ctx);
        }
        return 0;
    }
    const llama_model & model = ctx->get_model();
    if (adapter->model != &model) {
        return fail("the adapter was loaded for another model than this context's");
    }
    auto dc = std::make_unique<llama_dmem_context>();
    dc->lctx    = ctx;
    dc->adapter = adapter;
    dc->write   = true;
    dc->gen     = g_gen.fetch_add(1);
    dc->n_seq   = std::max<uint32_t>(1, ctx->get_cparams().n_seq_max);
    try {
        check_backends(*adapter, model, ctx->get_cparams().n_ubatch);
        alloc_store(*dc, model);
    } catch (const std::exception & e) {
        return fail(e.what());
    }
    std::lock_guard<std::mutex> lock(g_mu);
    g_ctxs[ctx] = std::move(dc);
    llama_dmem_access::request_reserve(*ctx);
    return 0;
}

bool llama_dmem_is_attached(const struct llama_context * ctx) {
    return find_ctx(ctx) != nullptr;
}

int32_t llama_dmem_set_write(struct llama_context * ctx, bool write) {
    llama_dmem_context * dc = find_ctx(ctx);
    if (dc == nullptr) {
        return fail("no δ-mem adapter is attached to this context");
    }
    if (dc->write != write) {
        llama_synchronize(ctx);
        dc->write = write;
        dc->gen   = g_gen.fetch_add(1);
    }
    return 0;
}

int32_t llama_dmem_set_message_ids(struct llama_context * ctx, const int32_t * ids, int32_t n_ids) {
    llama_dmem_context * dc = find_ctx(ctx);
    if (dc == nullptr) {
        return fail("no δ-mem adapter is attached to this context");
    }
    if (n_ids < 0 || (n_ids > 0 && ids == nullptr)) {
        return fail("llama_dmem_set_message_ids: invalid arguments");
    }
    dc->next_ids.assign(ids, ids + n_ids);
    return 0;
}

bool llama_dmem_get_write(const struct llama_context * ctx) {
    const llama_dmem_context * dc = find_ctx(ctx);
    return dc != nullptr && dc->write;
}

int64_t llama_dmem_state_n_floats(const struct llama_context * ctx) {
    const llama_dmem_context * dc = find_ctx(ctx);
    if (dc == nullptr) {
        return 0;
    }
    const llama_dmem_adapter & A = *dc->adapter;
    return (int64_t) A.layers.size() * A.rows() * A.rank;
}

int32_t llama_dmem_state_get(struct llama_context * ctx, llama_seq_id seq, float * dst, size_t n_floats) {
    try {
        llama_dmem_context * dc = checked_ctx(ctx, seq, false);
        const llama_dmem_adapter & A = *dc->adapter;
        const int64_t block = A.rows() * A.rank;
        if (dst == nullptr || n_floats != (size_t) (block * (int64_t) A.layers.size())) {
            raise("state buffer has %zu floats, expected %lld", n_floats, (long long) (block * A.layers.size()));
        }
        llama_synchronize(ctx);
        const size_t row_bytes = A.row_floats() * sizeof(float);
        std::vector<float> padded(A.row_floats());
        for (size_t l = 0; l < A.layers.size(); ++l) {
            ggml_backend_tensor_get(dc->store[A.layers[l].il], padded.data(), (size_t) seq * row_bytes, row_bytes);
            compact_row(A, padded.data(), dst + l * block);
        }
    } catch (const std::exception & e) {
        return fail(e.what());
    }
    return 0;
}

int32_t llama_dmem_state_set(struct llama_context * ctx, llama_seq_id seq, const float * src, size_t n_floats) {
    try {
        llama_dmem_context * dc = checked_ctx(ctx, seq, false);
        const llama_dmem_adapter & A = *dc->adapter;
        const int64_t block = A.rows() * A.rank;
        if (src == nullptr || n_floats != (size_t) (block * (int64_t) A.layers.size())) {
            raise("state buffer has %zu floats, expected %lld", n_floats, (long long) (block * A.layers.size()));
        }
        for (size_t i = 0; i < n_floats; ++i) {
            if (!std::isfinite(src[i])) {
                raise("state value %zu is not finite; the state was left unchanged", i);
            }
        }
        llama_synchronize(ctx);
        const size_t row_bytes = A.row_floats() * sizeof(float);
        std::vector<float> padded(A.row_floats());
        for (size_t l = 0; l < A.layers.size(); ++l) {
            expand_row(A, src + l * block, padded.data());
            ggml_backend_tensor_set(dc->store[A.layers[l].il], padded.data(), (size_t) seq * row_bytes, row_bytes);
        }
    } catch (const std::exception & e) {
        return fail(e.what());
    }
    return 0;
}

int32_t llama_dmem_state_reset(struct llama_context * ctx, llama_seq_id seq) {
    try {
        llama_dmem_context * dc = checked_ctx(ctx, seq, true);
        const llama_dmem_adapter & A = *dc->adapter;
        llama_synchronize(ctx);
        const size_t row_bytes = A.row_floats() * sizeof(float);
        std::vector<float> zeros(A.row_floats(), 0.0f);
        for (const auto & L : A.layers) {
            for (uint32_t s = 0; s < dc->n_seq; ++s) {
                if (seq < 0 || (uint32_t) seq == s) {
                    ggml_backend_tensor_set(dc->store[L.il], zeros.data(), (size_t) s * row_bytes, row_bytes);
                }
            }
        }
    } catch (const std::exception & e) {
        return fail(e.what());
    }
    return 0;
}
