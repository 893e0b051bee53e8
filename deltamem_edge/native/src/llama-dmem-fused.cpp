// deltamem-edge: the fused CPU scan.  One ggml custom op per δ-mem layer that takes the memory
// projection [4R|5R, T*B], reads every token's r-vector from the state before the token, updates
// the state rows in the store in place, and returns the reads [R, T*B].
//
// Part of deltamem-edge (our code, MIT); compiled into libllama by our build.
//
// Why: the standard-op path (llama-dmem-graph.cpp) spends ≈ 25 ggml nodes per layer (tanh,
// l2_norm, the gate chain, five pads, GATED_DELTA_NET on a P×P padded state, get_rows, cont,
// set_rows).  Each CPU node ends with a barrier of all threads and pays graph build, naming and
// scheduling; on a 135M model that is ≈ 15 % of a decode step although the arithmetic is tiny
// (rank 8: a few hundred flops per row and token).  Here the whole scan is one node and works on
// the r×r state directly (not the P×P GDN block), reading and writing the same store rows, in the
// same layout, as the standard path: a state written by one path continues bit-compatibly on the
// other (the store rows are GDN heads: row i of state head h is GDN head i*H+h, its r floats
// first, the rest of the P×P block zero — llama-dmem-state.cpp).
//
// Only for contexts whose δ-mem layers all run on the CPU: a custom op cannot run on CUDA, Metal,
// Vulkan or over RPC, and it writes the store through its data pointer.  The math is deltamem-
// math.md §1.3–1.5 in fp32, as deltamem_edge/reference.py writes it:
//   q, k = l2n(tanh(q̃)), l2n(tanh(k̃)) per state head;  β = σ(clamp(z_β + b_β));  λ by mode
//   read_t[i] = Σ_j S[i,j] q_t[j]                     (the state before token t)
//   S[i,j]   ← keep_i·S[i,j] + (write_i·v_i − erase_i·Σ_j' S[i,j'] k_t[j'])·k_t[j]

#include "llama-dmem-impl.h"

#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstring>

using namespace dmem_internal;

namespace {

// the sources of the op, in ggml_custom_4d's argument order
enum fused_src { SRC_PROJ = 0, SRC_STORE, SRC_ROWS, SRC_B_BETA, SRC_B_LAMBDA, SRC_AFTER };

float sigmoid(float z) {
    return 1.0f / (1.0f + std::exp(-z));
}

// tanh then l2-normalise an r-vector in place (torch F.normalize: u / max(‖u‖, eps))
void tanh_l2n(float * u, int64_t r, bool normalize, float eps) {
    if (!normalize) {
        return;
    }
    float ss = 0.0f;
    for (int64_t j = 0; j < r; ++j) {
        u[j] = std::tanh(u[j]);
        ss += u[j] * u[j];
    }
    const float inv = 1.0f / std::max(std::sqrt(ss), eps);
    for (int64_t j = 0; j < r; ++j) {
        u[j] *= inv;
    }
}

// keep, erase, write of one state row from its clamped gate pre-activations
void row_gates(const llama_dmem_adapter & A, float zb, float zl, float & keep, float & erase, float & write) {
    const float beta = sigmoid(zb);
    float lam = 1.0f;
    if (A.mode != dmem_mode::no_lambda) {
        lam = A.couple_lambda ? 1.0f - beta : sigmoid(zl);
    }
    switch (A.mode) {
        case dmem_mode::standard:       keep = lam;  erase = beta;       write = beta; break;
        case dmem_mode::lambda_outside: keep = lam;  erase = lam * beta; write = beta; break;
        case dmem_mode::no_lambda:      keep = 1.0f; erase = beta;       write = beta; break;
    }
}

// ggml custom op: work unit = (sequence b, state head h), split over the threads
void fused_scan(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const auto & op = *static_cast<const llama_dmem_adapter::fused_op *>(userdata);
    const llama_dmem_adapter & A = *op.adapter;
    const ggml_tensor * proj  = dst->src[SRC_PROJ];
    ggml_tensor *       store = dst->src[SRC_STORE];
    const ggml_tensor * rows  = dst->src[SRC_ROWS];
    const float * b_beta   = (const float *) dst->src[SRC_B_BETA]->data;
    const float * b_lambda = A.uses_lambda() ? (const float *) dst->src[SRC_B_LAMBDA]->data : nullptr;

    const int64_t r = A.rank, H = A.heads, R = r * H, P = A.P;
    const int64_t B = rows->ne[0];
    const int64_t T = dst->ne[1] / B;
    const int32_t * ids = (const int32_t *) rows->data;
    const float c = A.gate_clamp;
    // the reads carry GATED_DELTA_NET's 1/sqrt(P) as on the standard path: the δ output weights
    // have sqrt(P) folded in at load (llama-dmem-loader.cpp), so both paths share them
    const float read_scale = 1.0f / std::sqrt((float) P);

    float q[DMEM_P_MAX], k[DMEM_P_MAX];
    for (int64_t unit = ith; unit < B * H; unit += nth) {
        const int64_t b = unit / H, h = unit % H;
        float * S = (float *) ((char *) store->data + (size_t) ids[b] * store->nb[1]); // this sequence's row
        for (int64_t t = 0; t < T; ++t) {
            const int64_t n = b * T + t; // token column of proj and dst
            const float * x = (const float *) ((const char *) proj->data + n * proj->nb[1]);
            float * out = (float *) ((char *) dst->data + n * dst->nb[1]);
            std::memcpy(q, x + h * r, r * sizeof(float));
            std::memcpy(k, x + R + h * r, r * sizeof(float));
            tanh_l2n(q, r, A.normalize_qk, A.norm_eps);
            tanh_l2n(k, r, A.normalize_qk, A.norm_eps);
            for (int64_t i = 0; i < r; ++i) {
                const int64_t g = i * H + h;   // GDN order of rows in proj, store and reads
                float * s = S + g * P * P;     // S[row, 0..r-1]
                float read = 0.0f, pred = 0.0f;
                for (int64_t j = 0; j < r; ++j) {
                    read += s[j] * q[j];
                    pred += s[j] * k[j];
                }
                out[g] = read * read_scale;
                if (!op.write) {
                    continue;
                }
                const float zb = std::clamp(x[3 * R + g] + b_beta[g], -c, c);
                const float zl = b_lambda ? std::clamp(x[4 * R + g] + b_lambda[g], -c, c) : 0.0f;
                float keep, erase, write;
                row_gates(A, zb, zl, keep, erase, write);
                const float add = write * x[2 * R + g] - erase * pred;
                for (int64_t j = 0; j < r; ++j) {
                    s[j] = keep * s[j] + add * k[j];
                }
            }
        }
    }
}

} // namespace

namespace dmem_internal {

ggml_tensor * dmem_fused_scan(ggml_context * ctx, const llama_dmem_adapter & A, const llama_dmem_layer & L,
                              ggml_tensor * proj, ggml_tensor * store, ggml_tensor * rows, int64_t n_tokens,
                              bool write, ggml_tensor * after) {
    GGML_ASSERT(proj->type == GGML_TYPE_F32 && ggml_is_contiguous(proj));
    GGML_ASSERT(rows->type == GGML_TYPE_I32 && n_tokens % rows->ne[0] == 0);
    GGML_ASSERT(L.b_beta->type == GGML_TYPE_F32 && (!L.b_lambda || L.b_lambda->type == GGML_TYPE_F32));
    GGML_ASSERT(A.uses_lambda() == (L.b_lambda != nullptr));
    // no null sources (b_beta stands in for an absent b_lambda; the adapter says whether λ is used)
    ggml_tensor * args[] = { proj, store, rows, L.b_beta, L.b_lambda ? L.b_lambda : L.b_beta, after };
    const int n_args = after ? 6 : 5;
    // userdata must outlive the graph: it lives in the adapter, which outlives its contexts' graphs
    void * op = const_cast<llama_dmem_adapter::fused_op *>(&A.fused_ops[write ? 1 : 0]);
    ggml_tensor * out = ggml_custom_4d(ctx, GGML_TYPE_F32, A.rows(), n_tokens, 1, 1, args, n_args, fused_scan,
                                       GGML_N_TASKS_MAX, op);
    ggml_set_name(out, "dmem_fused_scan");
    return out;
}

} // namespace dmem_internal
