// deltamem-edge: what each device can run for δ-mem.  Probes a device's support for the scan width
// and for OUT_PROD (the loader picks P and the δ weight layout from them), and at attach refuses
// what a backend would abort on mid-decode and names the δ-mem nodes a device leaves to the CPU.
//
// Part of deltamem-edge (our code, MIT).  Background: docs/gpu.md.

#include "llama-dmem-impl.h"

#include "llama-impl.h"
#include "llama-model.h"

#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <cstring>
#include <set>
#include <string>

using namespace dmem_internal;

namespace {

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

} // namespace

namespace dmem_internal {

bool out_prod_ok(ggml_backend_dev_t dev, int64_t R) {
    return dev_runs(dev, [R](ggml_context * c) {
        ggml_tensor * w     = ggml_new_tensor_2d(c, GGML_TYPE_F32, 128, R);
        ggml_tensor * reads = ggml_new_tensor_2d(c, GGML_TYPE_F32, R, 2);
        return ggml_out_prod(c, w, ggml_transpose(c, reads));
    });
}

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

} // namespace dmem_internal
