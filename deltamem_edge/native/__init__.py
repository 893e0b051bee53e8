"""Native part of deltamem-edge: our llama.cpp sources, the hook patch and the cached build.

``src/`` and ``include/`` hold our C/C++ files, ``patches/`` the insert-only hunks that call
them from llama.cpp, and ``build.py`` turns the pinned llama-cpp-python sdist plus these into
``libllama`` (see docs/architecture.md).
"""
