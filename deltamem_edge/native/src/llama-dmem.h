// deltamem-edge: internal hooks called from the patched llama.cpp sources.
//
// Part of deltamem-edge (our code, MIT).  Each hook is one inserted line in a
// llama.cpp file (see deltamem_edge/native/patches/); everything else lives in
// the llama-dmem-*.cpp files (llama-dmem-impl.h lists them).  Every hook is a
// cheap no-op while no adapter is attached.

#pragma once

#include "llama.h"

#include <cstdint>
#include <string>

struct ggml_tensor;
struct llama_context;
struct llm_graph_context;
struct llama_dmem_context;

// llama-model-loader.cpp: δ-mem tensors bundled in a model GGUF belong to the δ-mem loader
// (defined in llama-dmem-loader.cpp)
bool llama_dmem_is_tensor_name(const std::string & name);

// llama-context.cpp: graph parameters, sizing and the batch guard (llama-dmem-graph.cpp);
// llama_free's release of the context's δ-state (llama-dmem-api.cpp)
const llama_dmem_context * llama_dmem_for_context(const llama_context * ctx);
uint64_t                   llama_dmem_gen_for_context(const llama_context * ctx);
uint32_t                   llama_dmem_graph_extra_nodes(const llama_context * ctx);
bool                       llama_dmem_batch_ok(llama_context * ctx, const llama_batch & batch);
void                       llama_dmem_context_release(llama_context * ctx);

// llama-graph.cpp: build_qkv (after the q/k/v projections) and build_attn (after wo/wo_b)
// (llama-dmem-graph.cpp)
void          llama_dmem_build_qkv(const llm_graph_context & g, ggml_tensor * cur,
                                   ggml_tensor *& q, ggml_tensor *& k, ggml_tensor *& v, bool reshaped, int il);
ggml_tensor * llama_dmem_build_out(const llm_graph_context & g, ggml_tensor * cur, ggml_tensor * wo, int il);
