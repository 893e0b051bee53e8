"""One-time converters from upstream δ-mem checkpoints to our GGUF files.

Why a separate package: conversion reads untrusted upstream files (pickled
PyTorch zips, safetensors) and runs once per adapter, so it lives apart from the
runtime and never imports torch.  ``adapter`` is the entry point
(its steps: ``adapter_tensors``, ``base_model``, ``adapter_writer``);
``torch_zip`` and ``safetensors_reader`` are the safe readers it uses.
"""
