"""Checks of the store contract that both the SQL store and the in-memory fake must pass
(tests/store/test_store.py runs them on SQLite and PostgreSQL, tests/fast on the fake)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from ecsnap.domain.model import AccessKey, Account, utcnow


def check_nonces(uow_factory: Callable[..., Any]) -> None:
    """spend_nonce stores a nonce until it expires, only while its key and the key's account
    are enabled; a read-only unit of work's is committed at once, a writing one's with it."""
    now = utcnow()
    soon, later = now + timedelta(minutes=15), now + timedelta(minutes=16)
    with uow_factory() as uow:
        uow.accounts.add(Account(id="acc-on", name="on"))
        uow.accounts.add(Account(id="acc-off", name="off", enabled=False))
        for key_id, account_id, enabled in (("k", "acc-on", True), ("k2", "acc-on", True),
                                            ("k-off", "acc-on", False),
                                            ("k-of-off", "acc-off", True)):
            uow.access_keys.add(AccessKey(id=key_id, secret="sealed", account_id=account_id,
                                          enabled=enabled))
        uow.commit()
    with uow_factory(readonly=True) as uow:
        assert uow.spend_nonce("k", "n1", soon, now)
        assert not uow.spend_nonce("k", "n1", soon, now)  # a replay
        assert uow.spend_nonce("k2", "n1", soon, now)  # nonces are per key
        for unusable in ("k-off", "k-of-off", "k-missing"):
            assert not uow.spend_nonce(unusable, "n2", soon, now), unusable
    with uow_factory(readonly=True) as uow:  # committed at once: kept after that one ended
        assert not uow.spend_nonce("k", "n1", soon, now)
        assert uow.spend_nonce("k", "n1", later + timedelta(minutes=15), later)  # expired
        assert uow.spend_nonce("k-off", "n2", soon, now) is False
    with uow_factory() as uow:  # a writing unit of work: not committed, forgotten
        assert uow.spend_nonce("k", "n3", soon, now)
    with uow_factory() as uow:
        assert uow.spend_nonce("k", "n3", soon, now)
        uow.commit()
    with uow_factory(readonly=True) as uow:
        assert not uow.spend_nonce("k", "n3", soon, now)
