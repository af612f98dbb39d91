"""ClientToken idempotence: the same token and parameters replay the first outcome."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import IdempotencyKey, IdempotencyRecord
from ecsnap.service.context import ServiceContext

_PROCESSING = "__processing__"


def _digest(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


def once(ctx: ServiceContext, account_id: str, action: str, token: str | None,
         params: dict[str, Any], run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `run()` unless this token ran already; return the (first) response."""
    if not token:
        return run()
    if len(token) > 64 or not token.isascii():
        raise EcsError("InvalidClientToken.ValueNotSupported",
                       "The ClientToken must be ASCII and at most 64 characters.", 400)
    digest = _digest(params)
    key = IdempotencyKey(account_id, action, token)
    with ctx.uow() as uow:
        record = uow.idempotency.get(key)
        if record is None:
            uow.idempotency.add(IdempotencyRecord(account_id, action, token, digest,
                                                  response={_PROCESSING: True}))
            uow.commit()
        elif record.params_digest != digest:
            raise EcsError("IdempotentParameterMismatch",
                           "The ClientToken was used before with other parameters.", 400)
        elif record.response.get(_PROCESSING):
            raise EcsError("LastTokenProcessing",
                           "The first request with this ClientToken is still being processed.",
                           403)
        else:
            return dict(record.response)
    try:
        response = run()
    except BaseException:
        with ctx.uow() as uow:
            record = uow.idempotency.get(key)
            if record is not None:
                uow.idempotency.delete(record)
            uow.commit()
        raise
    with ctx.uow() as uow:
        record = uow.idempotency.get(key)
        if record is not None:
            record.response = dict(response)
        uow.commit()
    return response
