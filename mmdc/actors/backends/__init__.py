"""Engine backends behind one protocol (``protocol.py``): one module per backend.

    hf.py            our Serve deployment over transformers generate (CPU/GPU), @serve.batch
    vllm.py          vLLM through ray.serve.llm (GPU; optional extra), a thin adapter in front
    openai.py        an external OpenAI-compatible endpoint over HTTP, nothing deployed
    serve_client.py  how a stage reaches a Serve engine (hf, vllm): per batch or per row
    protocol.py      request/response shapes, the client interface, retries with backoff

``mmdc.actors.engines`` is the public face: ``build_engine_app`` and ``make_client``.
"""
