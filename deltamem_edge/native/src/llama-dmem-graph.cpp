// deltamem-edge: the δ-mem graph.  Builds each δ-mem layer's nodes inside llama.cpp's graph (the
// build_qkv / build_attn hooks) and the graph input that picks each sequence's state row, and
// answers llama-context.cpp's questions about those graphs: parameters, node budget, batch guard.
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

#include "llama-dmem-impl.h"

#include "llama-batch.h"
#include "llama-context.h"
#include "llama-graph.h"

#include "ggml.h"

#include <map>
#include <memory>
#include <string>
#include <vector>

using namespace dmem_internal;

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

// ---------------------------------------------------------------------------------------------
// the δ-mem nodes of one layer: inputs, scan, reads, corrections
// ---------------------------------------------------------------------------------------------

namespace dmem_internal {

// a δ correction [out, n_tokens] from the reads [R, n_tokens]; the weights carry the δ scale
ggml_tensor * dmem_delta(ggml_context * ctx, const llama_dmem_layer & L, ggml_tensor * w, ggml_tensor * reads) {
    return L.out_t ? ggml_out_prod(ctx, w, ggml_transpose(ctx, reads)) // w: [out, R]
                   : ggml_mul_mat(ctx, w, reads);                       // w: [R, out]
}

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

} // namespace dmem_internal

// ---------------------------------------------------------------------------------------------
// hooks used by llama-graph.cpp
// ---------------------------------------------------------------------------------------------

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
    ggml_tensor * proj = ggml_mul_mat(ctx, L->w_in, cur); // [4R|5R, n_tokens]
    const bool token_writes = dc->write && !segments;
    // SSW: one step per message: the mean attention input of its tokens in this call, ids ascending
    auto segment_proj = [&]() {
        ggml_tensor * means = ggml_mul_mat(ctx, ggml_cont(ctx, ggml_transpose(ctx, cur)), inp->avg); // [n_embd, S]
        return ggml_mul_mat(ctx, L->w_in, means);
    };

    ggml_tensor * reads = nullptr; // [R, n_tokens], scaled by the scan's 1/sqrt(P): W_d* carry the rest
    if (dc->fused) {
        // one node: the tokens' reads, and per token their writes into the store rows
        reads = dmem_fused_scan(ctx, A, *L, proj, store, inp->rows, n_tokens, token_writes, nullptr);
        ggml_build_forward_expand(g.gf, reads); // its writes matter even if no δ head read it
        if (segments) {
            // the messages' writes, after the tokens have read the call-start state
            ggml_build_forward_expand(g.gf, dmem_fused_scan(ctx, A, *L, segment_proj(), store, inp->rows,
                                                            inp->n_slots, true, reads));
        }
    } else {
        ggml_tensor * s0 = ggml_reshape_4d(ctx, ggml_get_rows(ctx, store, inp->rows), P, P, R, B); // [P, P, R, B]
        ggml_tensor * out = dmem_scan(ctx, A, dmem_inputs(ctx, A, *L, proj, T, B, token_writes), s0);
        reads = scan_reads(ctx, out, P, R, T, B);
        if (token_writes) {
            ggml_build_forward_expand(g.gf, ggml_set_rows(ctx, store, scan_states(ctx, out, P, R, T, B), inp->rows));
        } else if (segments) {
            const int64_t S = inp->n_slots;
            ggml_tensor * sout = dmem_scan(ctx, A, dmem_inputs(ctx, A, *L, segment_proj(), S, 1, true), s0);
            ggml_build_forward_expand(g.gf, ggml_set_rows(ctx, store, scan_states(ctx, sout, P, R, S, 1), inp->rows));
        }
    }
    ggml_set_name(reads, "dmem_reads");
    inp->reads[il] = reads;

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
// hooks used by llama-context.cpp: graph parameters, node budget, batch guard
// ---------------------------------------------------------------------------------------------

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
        dc->gen = next_gen(); // a segment graph is built for its own call only
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
