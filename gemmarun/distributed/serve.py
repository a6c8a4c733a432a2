"""Ray Serve: N replicas, each one engine behind gemmarun's own OpenAI app (the same routes, errors
and streaming, through Serve's ASGI ingress), answering one endpoint on every node of the cluster.

    from ray import serve
    from gemmarun.distributed.serve import build_app

    serve.run(build_app({"source": "path/to/model"}, replicas=2), route_prefix="/")

Each replica asks the cluster for `threads` CPUs and runs torch on that many threads. When a
replica dies, Serve starts another; requests on the others go on, and requests on the dead one end
with an error (a 500, or a stream cut short) rather than a hang.

Each replica keeps its own prefix cache (`prefix_cache_mb`). Prefix affinity (routing requests
that share a first block of tokens to one replica) is not built: Serve's custom request router
(ray.serve.request_router, alpha in 2.60) chooses a replica from the request's arguments, and for an
HTTP ingress those are the ASGI scope, with the body still unread in the proxy, so a router cannot
hash the prompt's tokens without a second, parsing deployment in front (see the README).
"""

from __future__ import annotations

from . import import_ray, init_ray

import_ray()

from ray import serve  # noqa: E402

DEPLOYMENT = "gemmarun"


class GemmarunReplica:
    """One engine and its Server; Serve's ingress serves the Server's FastAPI app."""

    def __init__(self, load_kwargs: dict, threads: int, max_batch: int, max_waiting: int, model_id: str | None,
                 api_key: str | None, context: int | None, prefix_cache_mb: float = 0, metrics_key: str | None = None):  # fmt: skip
        import torch

        from ..generation.engine import Engine
        from ..lm import load
        from ..server.app import SERVE_CONTEXT, Server

        torch.set_num_threads(threads)
        lm = load(**load_kwargs)
        context = context or min(lm.context, SERVE_CONTEXT)
        self.engine = Engine(lm, max_batch=max_batch, max_waiting=max_waiting, context=context, prefix_cache_mb=prefix_cache_mb).start()
        self.server = Server(lm, self.engine, model_id, api_key, metrics_key, data_dir=False)  # no Batch API per replica

    def __serve_build_asgi_app__(self):
        return self.server.app

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine thread died is replaced."""
        if not self.engine.healthy:
            raise RuntimeError(f"the engine stopped: {self.engine.error}")


def build_app(load_kwargs: dict, replicas: int = 1, threads: int = 1, max_batch: int = 8, max_waiting: int = 64,
              model_id: str | None = None, api_key: str | None = None, context: int | None = None, prefix_cache_mb: float = 0,
              metrics_key: str | None = None):  # fmt: skip
    """The Serve application: `load_kwargs` are gemmarun.load()'s (source, dtype, quantize, ...)."""
    deployment = serve.deployment(
        serve.ingress()(GemmarunReplica),
        name=DEPLOYMENT,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": threads},
        # Serve queues past this; the engine's own queue answers 503 beyond max_waiting.
        max_ongoing_requests=max_batch + max_waiting,
        health_check_period_s=2,
        health_check_timeout_s=30,
    )
    return deployment.bind(load_kwargs, threads, max_batch, max_waiting, model_id, api_key, context, prefix_cache_mb, metrics_key)


def serve_on_ray(load_kwargs: dict, replicas: int, threads: int, address: str | None, host: str, port: int,
                 **app_kwargs) -> None:  # fmt: skip
    """`gemmarun serve --ray`: start (or join) the cluster, deploy, and block until interrupted."""
    import time

    from ..errors import GemmarunError

    if replicas < 1:
        raise GemmarunError(f"--replicas must be >= 1, got {replicas}")
    init_ray(address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(load_kwargs, replicas=replicas, threads=threads, **app_kwargs), name=DEPLOYMENT, route_prefix="/")
    print(f"serving {replicas} replica(s) on http://{host}:{port} (Ray Serve); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
