// deltamem-edge: loading a δ-mem adapter.  Reads the δ-mem part of an adapter GGUF (or of a
// bundle: a model GGUF with δ-mem tensors), checks every setting, layer and tensor against the
// model, and puts the weights on the devices of their layers.
//
// Part of deltamem-edge (our code, MIT).  Keys and tensor names: deltamem_edge/gguf_schema.py and
// docs/adapter-gguf.md; limits: deltamem_edge/supported.py.

#include "llama-dmem-impl.h"

#include "llama-model.h"

#include "ggml.h"
#include "ggml-backend.h"
#include "gguf.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

using namespace dmem_internal;

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

// ---------------------------------------------------------------------------------------------
// the steps of load_adapter, in the order it checks the file
// ---------------------------------------------------------------------------------------------

// 1. what the file is (adapter or bundle, schema version, architecture) and the adapter-wide
//    settings: rank, state heads, alpha, update mode, gates, write granularity.  Returns whether
//    the file is a standalone adapter (which may then hold δ-mem tensors only).
bool read_settings(llama_dmem_adapter & A, const gguf_context * g, llama_model * model) {
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
    if (A.heads < 1 || A.heads > DMEM_MAX_STATE_HEADS) {
        raise("state_heads %lld is outside 1..%lld", (long long) A.heads, (long long) DMEM_MAX_STATE_HEADS);
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
    if (gran == "token") {
        A.granularity = LLAMA_DMEM_WRITE_TOKEN;
    } else if (gran == "message_mean") {
        A.granularity = LLAMA_DMEM_WRITE_MESSAGE_MEAN;
    } else if (gran == "sentence_mean") {
        A.granularity = LLAMA_DMEM_WRITE_SENTENCE_MEAN;
    } else {
        raise("unknown write_granularity '%s' (token, message_mean, sentence_mean)", gran.c_str());
    }
    A.segment_writes = A.granularity != LLAMA_DMEM_WRITE_TOKEN;
    const std::string order = get_str(g, std::string(KP) + "row_order", "gdn");
    if (order != "gdn") {
        raise("row_order '%s' is not supported (expected 'gdn')", order.c_str());
    }
    return standalone;
}

// 2. the δ heads (a comma-separated subset of q, k, v, o)
std::set<std::string> read_delta_heads(const gguf_context * g) {
    std::set<std::string> heads;
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
    return heads;
}

// 3. the base-model layers that carry δ-mem: strictly increasing, each a layer of the model, so at
//    most the model's layers (llama.cpp holds at most LLAMA_MAX_LAYERS: llama_dmem_max_layers)
std::vector<int> read_layer_ids(const gguf_context * g, int32_t n_layer) {
    std::vector<int> layer_ids;
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
    return layer_ids;
}

// 4. the δ-mem tensors of the file by name, and which of them the declared layers and heads take
struct file_tensors {
    std::map<std::string, ggml_tensor *> by_name;
    std::set<std::string>                used;

    file_tensors(ggml_context * meta, bool standalone) {
        for (ggml_tensor * t = ggml_get_first_tensor(meta); t; t = ggml_get_next_tensor(meta, t)) {
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
    }

    ggml_tensor * take(int il, const char * suffix, bool required) {
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
    }

    void check_all_used() const {
        for (const auto & [name, t] : by_name) {
            if (!used.count(name)) {
                raise("unexpected δ-mem tensor '%s' (not used by the declared layers/heads)", name.c_str());
            }
        }
    }
};

// 5. P, the padded key size of one GDN head: 16 when rank <= 16 and every δ-mem layer's device
//    runs a 16-wide scan, else 32 (llama-dmem-graph.cpp says why)
int64_t scan_width(const llama_dmem_adapter & A, const llama_model & model, const std::vector<int> & layer_ids) {
    int64_t P = 16;
    for (int il : layer_ids) {
        if (A.rank > 16 || !gdn_ok(model.dev_layer(il), 16, A.heads, A.rows())) {
            P = 32;
        }
    }
    return P;
}

// 6. the file tensors of one layer, type- and shape-checked against the model's widths
llama_dmem_layer read_layer(const llama_dmem_adapter & A, const llama_model & model, file_tensors & ft,
                            const std::set<std::string> & heads, int il) {
    const llama_hparams & hp = model.hparams;
    const int64_t n_embd = hp.n_embd;
    const int64_t R      = A.rows();
    const int64_t n_in   = A.uses_lambda() ? 5 * R : 4 * R;

    const llama_layer & ml = model.layers[il];
    const int64_t q_out = (int64_t) hp.n_embd_head_k(il) * hp.n_head(il);
    const int64_t k_out = hp.n_embd_k_gqa(il);
    const int64_t v_out = hp.n_embd_v_gqa(il);
    if (ml.wo == nullptr || (ml.wq == nullptr && ml.wqkv == nullptr)) {
        raise("layer %d of the model has no standard attention projections", il);
    }

    llama_dmem_layer L;
    L.il     = il;
    L.w_in   = ft.take(il, "in.weight", true);
    L.b_beta = ft.take(il, "beta.bias", true);
    expect_type(L.w_in, true);
    expect_type(L.b_beta, false);
    expect_shape(L.w_in, n_embd, n_in, "the model width and rank*state_heads");
    expect_shape(L.b_beta, R, 0, "rank*state_heads");
    if (A.uses_lambda()) {
        L.b_lambda = ft.take(il, "lambda.bias", true);
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
            ggml_tensor * t = ft.take(il, d.suffix, true);
            expect_type(t, true);
            expect_shape(t, R, d.out, "rank*state_heads and the model's projection width");
            L.*d.dst = t;
        }
    }
    if (A.do_rmsnorm) {
        if (!heads.count("o")) {
            raise("delta_o_rmsnorm is set but 'o' is not a delta head");
        }
        L.do_norm = ft.take(il, "do_norm.weight", true);
        expect_type(L.do_norm, false);
        expect_shape(L.do_norm, n_embd, 0, "the model width");
    }
    return L;
}

// 7. device copies of the weights, on each layer's device (the plain buffer type: never a CPU
//    repack buffer); the δ output weights become f32, [out, R] where the device runs OUT_PROD
struct weight_copy { ggml_tensor * src; ggml_tensor * dst; bool delta_out; bool transposed; };

struct device_weights {
    std::map<ggml_backend_buffer_type_t, ggml_context *> ctx_of;
    std::vector<weight_copy> copies; // file tensor -> device tensor

    // points the layer's tensors at new device tensors (not allocated yet) and records the copies
    void place(llama_dmem_adapter & A, llama_dmem_layer & L, ggml_backend_dev_t dev, size_t n_layers) {
        L.out_t = out_prod_ok(dev, A.rows());
        ggml_backend_buffer_type_t buft = ggml_backend_dev_buffer_type(dev);
        ggml_context * dctx = ctx_of[buft];
        if (dctx == nullptr) {
            ggml_init_params ip = { /*.mem_size =*/ 8 * ggml_tensor_overhead() * n_layers + 1024,
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
    }

    // one backend buffer per buffer type for all the device tensors
    void alloc(llama_dmem_adapter & A) const {
        for (auto & [buft, dctx] : ctx_of) {
            ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(dctx, buft);
            if (buf == nullptr) {
                raise("could not allocate %s memory for the adapter", ggml_backend_buft_name(buft));
            }
            A.bufs.emplace_back(buf);
        }
    }
};

// 8. the data: read, never past the end of the file; the δ output weights to f32, times the δ
//    scale, transposed for OUT_PROD
void read_weights(const char * path, const gguf_context * g, const std::vector<weight_copy> & copies, float delta_scale) {
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

} // namespace

// ---------------------------------------------------------------------------------------------
// load_adapter: the steps above, in order
// ---------------------------------------------------------------------------------------------

namespace dmem_internal {

void load_adapter(llama_dmem_adapter & A, llama_model * model, const char * path) {
    gguf_file gf;
    gguf_init_params params = { /*.no_alloc =*/ true, /*.ctx =*/ &gf.meta };
    gf.gctx = gguf_init_from_file(path, params);
    if (gf.gctx == nullptr) {
        raise("not a readable GGUF file (missing, truncated or malformed)");
    }
    const gguf_context * g = gf.gctx;

    const bool standalone = read_settings(A, g, model);
    const std::set<std::string> heads = read_delta_heads(g);
    const int32_t n_layer = llama_model_n_layer(model);
    const std::vector<int> layer_ids = read_layer_ids(g, n_layer);
    file_tensors ft(gf.meta, standalone);

    A.slot_of.assign(n_layer, -1);
    A.P = scan_width(A, *model, layer_ids);
    const float delta_scale = (A.alpha / (float) A.rank) * sqrtf((float) A.P); // see llama-dmem-graph.cpp

    device_weights dw;
    for (int il : layer_ids) {
        llama_dmem_layer L = read_layer(A, *model, ft, heads, il);
        dw.place(A, L, model->dev_layer(il), layer_ids.size());
        A.slot_of[il] = (int) A.layers.size();
        A.layers.push_back(L);
    }
    ft.check_all_used();
    dw.alloc(A);
    read_weights(path, g, dw.copies, delta_scale);
    A.all_cpu = true;
    for (int il : layer_ids) {
        A.all_cpu = A.all_cpu && ggml_backend_dev_type(model->dev_layer(il)) == GGML_BACKEND_DEVICE_TYPE_CPU;
    }
}

} // namespace dmem_internal

// ---------------------------------------------------------------------------------------------
// the hook used by llama-model-loader.cpp, and the C API's file probe
// ---------------------------------------------------------------------------------------------

bool llama_dmem_is_tensor_name(const std::string & name) {
    return name.find(DMEM_MARKER) != std::string::npos;
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
