// deltamem-edge: the C API of include/llama-deltamem.h (all but the state functions, which are in
// llama-dmem-state.cpp, and the file probe, in llama-dmem-loader.cpp), its error text, and the table
// of the contexts an adapter is attached to, which every hook consults.
//
// Part of deltamem-edge (our code, MIT); compiled into libllama by our build.

#include "llama-dmem-impl.h"

#include "llama-context.h"
#include "llama-hparams.h"
#include "llama-impl.h"
#include "llama-model.h"

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <unordered_map>

// llama_context is not ours to extend; a friend declaration (one inserted line in
// llama-context.h) lets us ask for a scheduler re-reserve after attaching, exactly
// as llama_set_adapters_lora does, because the graph grows by our nodes.
struct llama_dmem_access {
    static void request_reserve(llama_context & ctx) { ctx.sched_need_reserve = true; }
};

// ---------------------------------------------------------------------------------------------
// errors
// ---------------------------------------------------------------------------------------------

namespace {

thread_local std::string g_last_error;

} // namespace

namespace dmem_internal {

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

} // namespace dmem_internal

// ---------------------------------------------------------------------------------------------
// the table of attached contexts, and the live adapters
// ---------------------------------------------------------------------------------------------

namespace {

std::atomic<uint64_t> g_gen{1};
std::mutex            g_mu;
std::unordered_map<const llama_context *, std::unique_ptr<llama_dmem_context>> g_ctxs;
std::set<const llama_dmem_adapter *>                                           g_adapters;

} // namespace

namespace dmem_internal {

llama_dmem_context * find_ctx(const llama_context * ctx) {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_ctxs.find(ctx);
    return it == g_ctxs.end() ? nullptr : it->second.get();
}

uint64_t next_gen() {
    return g_gen.fetch_add(1);
}

} // namespace dmem_internal

using namespace dmem_internal;

// the hook of llama_free (llama-context.cpp): the context's δ-state goes with it
void llama_dmem_context_release(llama_context * ctx) {
    std::lock_guard<std::mutex> lock(g_mu);
    g_ctxs.erase(ctx);
}

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

int32_t llama_dmem_adapter_rank(const struct llama_dmem_adapter * a)        { return a ? (int32_t) a->rank : -1; }
int32_t llama_dmem_adapter_state_heads(const struct llama_dmem_adapter * a) { return a ? (int32_t) a->heads : -1; }
int32_t llama_dmem_adapter_n_layers(const struct llama_dmem_adapter * a)    { return a ? (int32_t) a->layers.size() : -1; }
int32_t llama_dmem_adapter_layer(const struct llama_dmem_adapter * a, int32_t i) {
    if (a == nullptr || i < 0 || (size_t) i >= a->layers.size()) {
        return -1;
    }
    return a->layers[i].il;
}

const char * llama_dmem_adapter_layer_device(const struct llama_dmem_adapter * a, int32_t i) {
    if (a == nullptr || a->model == nullptr || i < 0 || (size_t) i >= a->layers.size()) {
        return nullptr;
    }
    return ggml_backend_dev_name(a->model->dev_layer(a->layers[i].il));
}

int32_t llama_dmem_adapter_write_granularity(const struct llama_dmem_adapter * a) {
    return a ? a->granularity : -1;
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
    dc->fused   = adapter->all_cpu;
    dc->gen     = next_gen();
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
        dc->gen   = next_gen();
    }
    return 0;
}

int32_t llama_dmem_set_scan(struct llama_context * ctx, int32_t scan) {
    llama_dmem_context * dc = find_ctx(ctx);
    if (dc == nullptr) {
        return fail("no δ-mem adapter is attached to this context");
    }
    if (scan != LLAMA_DMEM_SCAN_STANDARD && scan != LLAMA_DMEM_SCAN_FUSED) {
        return fail("llama_dmem_set_scan: unknown scan " + std::to_string(scan));
    }
    if (scan == LLAMA_DMEM_SCAN_FUSED && !dc->adapter->all_cpu) {
        return fail("the fused δ-mem scan runs on the CPU only, and some δ-mem layers of this model are on "
                    "another device; use the standard scan");
    }
    const bool fused = scan == LLAMA_DMEM_SCAN_FUSED;
    if (dc->fused != fused) {
        llama_synchronize(ctx);
        dc->fused = fused;
        dc->gen   = next_gen();
    }
    return 0;
}

int32_t llama_dmem_get_scan(const struct llama_context * ctx) {
    const llama_dmem_context * dc = find_ctx(ctx);
    if (dc == nullptr) {
        return -1;
    }
    return dc->fused ? LLAMA_DMEM_SCAN_FUSED : LLAMA_DMEM_SCAN_STANDARD;
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

// the loader's limits (llama-dmem-loader.cpp checks them; deltamem_edge/supported.py must agree)
int32_t llama_dmem_max_rank(void)        { return (int32_t) DMEM_P_MAX; }
int32_t llama_dmem_max_state_heads(void) { return (int32_t) DMEM_MAX_STATE_HEADS; }
int32_t llama_dmem_max_layers(void)      { return (int32_t) LLAMA_MAX_LAYERS; }
