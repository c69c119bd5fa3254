"""Engines: the Serve model servers that answer the roles' chat requests, and the Ray Data processors that ask them.

protocol.py      request/response shapes, the client interface, retries with backoff
hf.py            our Serve deployment over transformers generate (CPU/GPU)
vllm.py          vLLM through ray.serve.llm (GPU; optional extra), a thin adapter in front
openai.py        an external OpenAI-compatible endpoint over HTTP, nothing deployed
serve_client.py  how a processor reaches a Serve engine (hf, vllm): per batch or per row
attention.py     the attention kernel an hf engine runs (SDPA, xformers)
backends.py      the public face: ``build_engine_app`` and ``make_client``, each a table lookup
processors.py    Ray Data processors per role, and ``run_processors`` for a whole phase
"""
