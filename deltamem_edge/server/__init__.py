"""``deltamem-edge serve``: a local OpenAI-compatible server with one persistent memory per user.

One job per module: ``protocol`` (the wire format: validation, error and response shapes),
``memories`` (memory id -> file, the pool of conversations in the context's sequences),
``completion`` (one completion: what is written into memory, stop sequences),
``layer_stats`` (per-layer state norms, and each memory's change in its last turn), ``page``
(the chat page at ``/``: static files under a strict CSP), ``app`` (HTTP routes, API key,
CORS, streaming).  docs/server.md is the user's guide.

Needs the ``server`` extra (starlette, uvicorn): ``pip install 'deltamem-edge[server]'``.
"""
