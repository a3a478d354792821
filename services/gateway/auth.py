"""Who is asking: the tenant behind ``Authorization: Bearer <key>``, and its request rate.

Every route that touches tasks depends on :func:`current_tenant`. With ``UMI_AUTH=off``
every request is the ``default`` tenant's (``umi up`` on a laptop); otherwise a missing,
unknown or revoked key is a ``401``. Each authenticated request counts against the
tenant's rate (``shared/admission.py``); over it, a ``429`` with ``Retry-After``.
"""

from __future__ import annotations

import math
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from shared import admission, tenants
from shared.db import session_scope
from shared.models import DEFAULT_TENANT_ID, Tenant
from shared.settings import Settings

__all__ = ["CurrentTenant", "current_tenant", "too_many_requests"]

_bearer = HTTPBearer(auto_error=False, description="An API key from `umi keys create --tenant <name>`.")


def too_many_requests(refusal: admission.Refusal) -> HTTPException:
    """The ``429`` for ``refusal``, with ``Retry-After`` in whole seconds (at least 1)."""
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        f"too many requests: {refusal.reason}",
        headers={"Retry-After": str(max(1, math.ceil(refusal.retry_after_s)))},
    )


def current_tenant(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Tenant:
    """The requesting tenant (``401`` without a live key, ``429`` over its request rate)."""
    settings: Settings = request.app.state.settings
    with session_scope(request.app.state.engine) as session:
        if not settings.auth:
            tenant = session.get(Tenant, DEFAULT_TENANT_ID)
            if tenant is None:  # migrations create it; a database emptied by hand gets it back
                tenant = tenants.get_or_create_tenant(session=session, name=tenants.DEFAULT_TENANT_NAME)
        else:
            tenant = None if credentials is None else tenants.authenticate(session=session, key=credentials.credentials)
            if tenant is None:
                raise HTTPException(
                    status.HTTP_401_UNAUTHORIZED,
                    "a valid API key is required: Authorization: Bearer <key>",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        refusal = admission.take_request(session=session, tenant=tenant, settings=settings)
        session.expunge(tenant)
    if refusal is not None:
        raise too_many_requests(refusal)
    return tenant


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]
