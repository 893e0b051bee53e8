"""Rebuild models/smollm2-135m-instruct.placeholder.dmem.gguf (deterministic; see models/README.md).

    .venv/bin/python models/make_placeholder_adapter.py
"""

from deltamem_edge.defaults import PLACEHOLDER_NAME, REPO_MODELS, default_model_path, make_placeholder_adapter

if __name__ == "__main__":
    print(make_placeholder_adapter(default_model_path(), REPO_MODELS / PLACEHOLDER_NAME))
