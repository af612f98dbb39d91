"""ClientToken idempotence: the same token and parameters replay the first outcome.

The record of a request that journals a task is written in the task's own transaction
(`TaskRunner.journal` calls `journaled`; a service that knows its response then calls
`respond`), so that a request that died (kill -9 of its API process) left either both or
neither: a retry replays the first outcome, or runs as the first call. The record's key is
the table's primary key: of two processes running one token at once, one commit fails,
and that request answers as a retry.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
from collections.abc import Callable
from typing import Any

from ecsnap.adapters.store.base import UnitOfWork
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import IdempotencyKey, IdempotencyRecord
from ecsnap.service.context import ServiceContext

_PROCESSING = "__processing__"
# the record of the ClientToken request this thread runs, until a transaction wrote it
# ([the record to write], then the one written in the transaction under way)
_PENDING: contextvars.ContextVar[list[IdempotencyRecord] | None] = \
    contextvars.ContextVar("ecsnap_client_token", default=None)


def journaled(uow: UnitOfWork, task_id: str) -> None:
    """In a task's journaling transaction: write the pending request's record (still
    processing) with it."""
    _write(uow, {_PROCESSING: True, "TaskId": task_id})


def respond(uow: UnitOfWork, response: dict[str, Any]) -> None:
    """In the transaction that makes the request's outcome: write its record with the
    response a retry replays."""
    _write(uow, dict(response))


def _write(uow: UnitOfWork, response: dict[str, Any]) -> None:
    pending = _PENDING.get()
    if not pending:
        return
    template = pending[0]
    found = uow.idempotency.get(template.key)
    if found is None:
        record = IdempotencyRecord(template.account_id, template.action, template.token,
                                   template.params_digest, response=response)
        uow.idempotency.add(record)
        pending[1:] = [record]
    elif pending[1:] == [found]:  # this request's, written earlier in this transaction
        found.response = response
    else:  # another request with this token committed first: this one rolls back
        raise _in_flight()


def _in_flight() -> EcsError:
    return EcsError("LastTokenProcessing",
                    "The first request with this ClientToken is still being processed.", 403)


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
    replay = _replay(ctx, key, digest)
    if replay is not None:
        return replay
    pending = [IdempotencyRecord(account_id, action, token, digest)]
    reset = _PENDING.set(pending)
    try:
        response = run()
    except Exception:
        # another process's commit of this token won (the key is unique): answer as a retry
        replay = _replay(ctx, key, digest)
        if replay is not None:
            return replay
        raise
    finally:
        _PENDING.reset(reset)
    with ctx.uow() as uow:
        record = uow.idempotency.get(key)
        if record is None:
            uow.idempotency.add(IdempotencyRecord(account_id, action, token, digest,
                                                  response=dict(response)))
        elif record.response != response:
            record.response = dict(response)
        uow.commit()
    return response


def _replay(ctx: ServiceContext, key: IdempotencyKey, digest: str) -> dict[str, Any] | None:
    """The first outcome of this token, None if there is none; an error while the first
    request is still on its way or when the parameters differ."""
    with ctx.uow() as uow:  # (a read-only one reads single-column keys only)
        record = uow.idempotency.get(key)
    if record is None:
        return None
    if record.params_digest != digest:
        raise EcsError("IdempotentParameterMismatch",
                       "The ClientToken was used before with other parameters.", 400)
    if record.response.get(_PROCESSING):
        raise _in_flight()
    return dict(record.response)
