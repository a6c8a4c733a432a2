"""gemmarun on a Ray cluster (the `ray` extra): serve.py, Ray Serve replicas each holding one engine
behind gemmarun's own OpenAI app; data.py, `gemmarun batch --ray` through a Ray Data actor pool;
eval.py, `gemmarun eval --ray` with items sharded over scoring actors. Ray is imported only here,
and only when one of these is used."""

from __future__ import annotations

from ..errors import GemmarunError


class RayNotInstalledError(GemmarunError):
    """The `ray` extra is missing."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise RayNotInstalledError("--ray needs Ray: pip install 'gemmarun[ray]'") from None
    return ray


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` ('auto': the one this machine belongs to), or start a local one;
    a no-op when this process is already connected."""
    ray = import_ray()
    if ray.is_initialized():
        return
    if address is None:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
