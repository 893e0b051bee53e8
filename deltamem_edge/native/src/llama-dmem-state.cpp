// deltamem-edge: the δ-state of a context.  One F32 store per δ-mem layer on the layer's device,
// one padded row per sequence, and the C API that reads, writes and zeroes a sequence's state in
// upstream's compact layout [n_layers, H*r, r].
//
// Part of deltamem-edge (our code, MIT).  Rows are in GDN order (docs/adapter-gguf.md).

#include "llama-dmem-impl.h"

#include "llama-model.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <cmath>
#include <cstring>
#include <map>
#include <stdexcept>
#include <vector>

using namespace dmem_internal;

namespace dmem_internal {

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

} // namespace dmem_internal

namespace {

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

// Floats of one layer's compact state (rows x rank); the caller's buffer must hold exactly every
// layer's, as llama_dmem_state_n_floats says.
int64_t checked_block(const llama_dmem_adapter & A, const void * buf, size_t n_floats) {
    const int64_t block = A.rows() * A.rank;
    if (buf == nullptr || n_floats != (size_t) (block * (int64_t) A.layers.size())) {
        raise("state buffer has %zu floats, expected %lld", n_floats, (long long) (block * A.layers.size()));
    }
    return block;
}

} // namespace

// ---------------------------------------------------------------------------------------------
// C API: the state of one sequence
// ---------------------------------------------------------------------------------------------

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
        const int64_t block = checked_block(A, dst, n_floats);
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
        const int64_t block = checked_block(A, src, n_floats);
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
