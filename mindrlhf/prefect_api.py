"""The Prefect API a run talks to: reachable, and never waited on without bound.

``mindrlhf run`` checks the server at ``PREFECT_API_URL`` answers its health endpoint before a
flow starts (an address that accepts connections and never answers would otherwise hang the run
in silence), and bounds what the Prefect client may wait per request; without ``PREFECT_API_URL``
Prefect runs its own ephemeral server and there is nothing to check.
"""

from __future__ import annotations

import os

HEALTH_TIMEOUT_S = 10.0
# what a run's Prefect client may wait: per request, and how often it retries one
CLIENT_LIMITS = {"PREFECT_API_REQUEST_TIMEOUT": "20", "PREFECT_CLIENT_MAX_RETRIES": "2"}


class PrefectUnavailable(RuntimeError):
    pass


class PrefectLost(PrefectUnavailable):
    """The API went away during a run (not at the check before it): what Prefect still holds to
    send can no longer be delivered."""


def bound_client() -> None:
    """Defaults for the limits the user has not set (before Prefect reads its settings)."""
    for k, v in CLIENT_LIMITS.items():
        os.environ.setdefault(k, v)


def check_api(timeout: float = HEALTH_TIMEOUT_S) -> None:
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return
    import httpx

    try:
        r = httpx.get(url.rstrip("/") + "/health", timeout=timeout)
        r.raise_for_status()
    except httpx.TimeoutException:
        raise PrefectUnavailable(
            f"the Prefect API at {url} did not answer within {timeout:.0f} s "
            "(PREFECT_API_URL); is the server up and is that its address?"
        ) from None
    except httpx.HTTPError as e:
        raise PrefectUnavailable(
            f"the Prefect API at {url} is not reachable (PREFECT_API_URL): {e}"
        ) from None
