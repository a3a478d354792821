"""The Python client of α-UMi on queues: submit tasks to the gateway, follow them, get answers.

Usage::

    from umi_client import UmiClient

    with UmiClient() as umi:  # UMI_GATEWAY_URL and UMI_API_KEY from the environment
        accepted = umi.submit({"query": "Is test@example.com a valid address?", "tools": tools})
        for event in umi.events(accepted.id):
            print(event)        # a StepEvent per step as it is stored, then the final TaskPublic
        print(umi.get(accepted.id).answer)

:class:`AsyncUmiClient` offers the same calls for asyncio. See ``docs/client.md``.
"""

from shared.schemas import StepEvent, TaskAccepted, TaskCreate, TaskPage, TaskPublic
from umi_client._core import DEFAULT_TIMEOUT, TaskEvent
from umi_client.client import AsyncUmiClient, UmiClient
from umi_client.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    RateLimited,
    ServiceUnavailable,
    UmiConnectionError,
    UmiError,
    UmiHTTPError,
    UmiProtocolError,
    UmiTimeout,
    Unauthorized,
)

__all__ = [
    "AsyncUmiClient",
    "Conflict",
    "DEFAULT_TIMEOUT",
    "InvalidRequest",
    "NotFound",
    "RateLimited",
    "ServiceUnavailable",
    "StepEvent",
    "TaskAccepted",
    "TaskCreate",
    "TaskEvent",
    "TaskPage",
    "TaskPublic",
    "Unauthorized",
    "UmiClient",
    "UmiConnectionError",
    "UmiError",
    "UmiHTTPError",
    "UmiProtocolError",
    "UmiTimeout",
]
