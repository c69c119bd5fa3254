"""``python -m mmdc.endpoint``: a checkpoint as an OpenAI-compatible chat endpoint on Ray Serve.

Why: a student checkpoint (``runs/<run>/checkpoints/student/iter_3``) is an HF LLaVA model, and
the tools people compare with (lmms-eval, VLMEvalKit, a GPT-style judge script) speak OpenAI's
chat-completions API. This deploys the same ``hf`` engine the run uses, with an HTTP route, so
``POST <url>/chat/completions`` reaches it; mmdc's own ``openai`` backend can then use it too
(``engines.<name>.backend: openai``, ``base_url`` the printed URL).

    python -m mmdc.endpoint --model runs/tiny-.../checkpoints/student/iter_2 --port 8000
    curl http://127.0.0.1:8000/mmdc/v1/chat/completions -d '{"model": "student", "messages": [...]}'

Requests take ``messages`` (images as ``image_url`` data URLs), ``temperature``, ``max_tokens`` and
``seed`` (the same seed gives the same reply, as in a run). One choice, no streaming.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from mmdc.config import EngineConfig, validate_engine


def serve_endpoint(
    model_path: str, engine: EngineConfig, name: str = "mmdc", host: str = "127.0.0.1", port: int = 8000
) -> str:
    """Deploy ``model_path`` behind ``http://host:port/<name>/v1`` on the connected Ray cluster; return that URL.

    Serve's HTTP options are cluster-wide and fixed when Serve first starts: on a cluster where Serve
    already runs without a proxy, shut it down first (``serve.shutdown()``).
    """
    from ray import serve

    from mmdc.engines.backends import build_engine_app, deploy_app

    if engine.backend != "hf":
        raise ValueError(f"only the hf backend is served over HTTP here, not {engine.backend!r}")
    validate_engine("endpoint", engine)
    serve.start(http_options={"host": host, "port": port})
    deploy_app(build_engine_app(engine, model_path, engine_name=name), name, route_prefix=f"/{name}/v1")
    return f"http://{host}:{port}/{name}/v1"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmdc.endpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF LLaVA checkpoint folder (or hub id)")
    parser.add_argument("--name", default="mmdc", help="app name; the URL is http://HOST:PORT/NAME/v1")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "auto"])
    parser.add_argument("--max-batch-size", type=int, default=16, help="rows Serve batches per forward pass")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: a new local one)")
    args = parser.parse_args(argv)

    import ray

    ray.init(address=args.address or "local")
    engine = EngineConfig(
        backend="hf",
        replicas=args.replicas,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
        request_mode="row",
    )
    url = serve_endpoint(args.model, engine, args.name, args.host, args.port)
    print(f"mmdc: serving {args.model} at {url}/chat/completions (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
