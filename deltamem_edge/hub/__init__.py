"""Models from the Hugging Face Hub: pull (download, verify, convert), the registry of installed models, and
the name resolution chat and serve share.  Only ``pull``/``fetch`` need the ``hub`` extra (huggingface_hub);
``registry`` and ``resolve`` are plain files and JSON, so installed models run with no network and no extra."""
