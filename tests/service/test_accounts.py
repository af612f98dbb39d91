"""Accounts and AccessKeys: the password policy, secrets encrypted at rest (and still good
for both signature schemes), and the AccessKey life cycle (disable, rotate, delete)."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from starlette.testclient import TestClient

from ecsnap import bootstrap, config
from ecsnap.domain.errors import EcsError
from ecsnap.entrypoints.api.app import create_app
from ecsnap.entrypoints.api.signature import acs3_request_headers, rpc_v1_request_params
from ecsnap.service import accounts, setup
from ecsnap.service.context import ServiceContext
from tests.conftest import REGION
from tests.doubles import FileBackedCompute

PASSWORD = "correct horse battery"


def stored_secrets(ctx: ServiceContext) -> dict[str, str]:
    """What a reader of the database alone gets: the access_keys rows."""
    with ctx.extras["engine"].connect() as conn:
        return dict(conn.execute(text("SELECT id, secret FROM access_keys")).all())


# ------------------------------------------------------------------ password policy


@pytest.mark.parametrize(("password", "rule"), [
    ("short pw 1", "at least 12"),
    ("alice-1234567890", "account name"),
    ("xxALICExx-secret", "account name"),
    ("z" * 20, "repeated"),
    ("p" * 2000, "at most"),
])
def test_the_password_policy_refuses(ctx: ServiceContext, password: str, rule: str) -> None:
    with pytest.raises(EcsError) as refused:
        accounts.create_account(ctx, "alice", password)
    assert refused.value.code == "InvalidPassword.Malformed" and rule in refused.value.message
    assert accounts.get_account(ctx, "alice") is None
    accounts.create_account(ctx, "alice", PASSWORD)
    with pytest.raises(EcsError, match=rule):
        accounts.change_password(ctx, "alice", password)
    assert accounts.authenticate_password(ctx, "alice", PASSWORD) is not None


def test_change_password_checks_the_current_one(ctx: ServiceContext) -> None:
    accounts.create_account(ctx, "alice", PASSWORD)
    with pytest.raises(EcsError) as refused:
        accounts.change_password(ctx, "alice", "another long one", current_password="nope")
    assert refused.value.code == "InvalidPassword.Mismatch"
    accounts.change_password(ctx, "alice", "another long one", current_password=PASSWORD)
    assert accounts.authenticate_password(ctx, "alice", PASSWORD) is None
    assert accounts.authenticate_password(ctx, "alice", "another long one") is not None
    accounts.set_password(ctx, "alice", "an admin reset value")  # no current password
    assert accounts.authenticate_password(ctx, "alice", "an admin reset value") is not None
    with pytest.raises(EcsError, match="No account nobody"):
        accounts.change_password(ctx, "nobody", "another long one")


def test_a_disabled_account_cannot_log_on_or_sign(ctx: ServiceContext) -> None:
    accounts.create_account(ctx, "alice", PASSWORD)
    key = accounts.create_access_key(ctx, "alice")
    accounts.disable_account(ctx, "alice")
    assert accounts.authenticate_password(ctx, "alice", PASSWORD) is None
    found = accounts.find_access_key(ctx, key.id)
    assert found is not None and not found.enabled
    accounts.enable_account(ctx, "alice")
    assert accounts.authenticate_password(ctx, "alice", PASSWORD) is not None


# ------------------------------------------------------------------ secrets at rest


def test_access_key_secrets_are_encrypted_at_rest(ctx: ServiceContext) -> None:
    accounts.create_account(ctx, "alice")
    key = accounts.create_access_key(ctx, "alice")
    stored = stored_secrets(ctx)[key.id]
    assert key.secret not in stored and stored.startswith("aesgcm1:")
    assert len(stored) <= 128  # the column's width (PostgreSQL enforces it)
    key_file = ctx.settings.data_dir / accounts.SECRET_KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    found = accounts.find_access_key(ctx, key.id)
    assert found is not None and found.secret == key.secret and found.enabled
    assert accounts.authenticate_access_key(ctx, key.id, key.secret) is not None
    assert accounts.authenticate_access_key(ctx, key.id, stored) is None
    # the ciphertext is bound to its key ID: moved to another row, it does not decrypt
    other = accounts.create_access_key(ctx, "alice")
    with ctx.extras["engine"].begin() as conn:
        conn.execute(text("UPDATE access_keys SET secret = :s WHERE id = :i"),
                     {"s": stored, "i": other.id})
    assert accounts.find_access_key(ctx, other.id) is None


def test_the_database_alone_hands_out_no_secret(ctx: ServiceContext, tmp_path: Path,
                                                compute: FileBackedCompute) -> None:
    accounts.create_account(ctx, "alice")
    key = accounts.create_access_key(ctx, "alice")
    # the same database, but another data directory: without the secret.key of ours
    thief = bootstrap.build(config.load(tmp_path / "elsewhere",
                                        database_url=ctx.settings.database_url,
                                        background_tasks=False), compute=compute,
                            background=False)
    assert key.secret not in str(stored_secrets(thief))
    assert accounts.find_access_key(thief, key.id) is None
    assert accounts.authenticate_access_key(thief, key.id, key.secret) is None
    found = accounts.find_access_key(ctx, key.id)  # ours still decrypts
    assert found is not None and found.secret == key.secret


def test_plain_secrets_are_encrypted_at_start_up(ctx: ServiceContext) -> None:
    accounts.create_account(ctx, "alice")
    account = accounts.get_account(ctx, "alice")
    assert account is not None
    with ctx.extras["engine"].begin() as conn:  # a row as the previous version wrote it
        conn.execute(text("INSERT INTO access_keys (id, secret, account_id, enabled, created) "
                          "VALUES ('LTAIold', 'plain-old-secret', :a, 1, CURRENT_TIMESTAMP)"),
                     {"a": account.id})
    old = accounts.find_access_key(ctx, "LTAIold")
    assert old is not None and old.secret == "plain-old-secret"  # still usable before
    assert accounts.seal_stored_secrets(ctx) == 1
    assert stored_secrets(ctx)["LTAIold"].startswith("aesgcm1:")
    assert "plain-old-secret" not in stored_secrets(ctx)["LTAIold"]
    again = accounts.find_access_key(ctx, "LTAIold")
    assert again is not None and again.secret == "plain-old-secret"
    assert accounts.seal_stored_secrets(ctx) == 0


@pytest.fixture
def api(ctx: ServiceContext) -> Iterator[TestClient]:
    with TestClient(create_app(ctx), base_url="http://127.0.0.1") as c:
        yield c


def test_both_signature_schemes_verify_with_an_encrypted_secret(ctx: ServiceContext,
                                                                 api: TestClient) -> None:
    accounts.create_account(ctx, "alice")
    key = accounts.create_access_key(ctx, "alice")
    assert stored_secrets(ctx)[key.id] != key.secret
    query = rpc_v1_request_params("DescribeRegions", {"RegionId": REGION}, key.id, key.secret)
    response = api.post("/", params=query)
    assert response.status_code == 200, response.text
    headers = acs3_request_headers("DescribeRegions", [("RegionId", REGION)], "127.0.0.1",
                                   key.id, key.secret)
    response = api.post("/?RegionId=" + REGION, headers=headers)
    assert response.status_code == 200, response.text
    wrong = rpc_v1_request_params("DescribeRegions", {"RegionId": REGION}, key.id,
                                  stored_secrets(ctx)[key.id])
    response = api.post("/", params=wrong)  # the stored form is no usable secret
    assert response.status_code == 400 and response.json()["Code"] in (
        "SignatureDoesNotMatch", "InvalidAccessKeySecret")


# ------------------------------------------------------------------ AccessKey life cycle


def test_disable_enable_rotate_and_delete_access_keys(ctx: ServiceContext) -> None:
    accounts.create_account(ctx, "alice")
    key = accounts.create_access_key(ctx, "alice")
    accounts.disable_access_key(ctx, key.id)
    assert accounts.authenticate_access_key(ctx, key.id, key.secret) is None
    accounts.enable_access_key(ctx, key.id)
    assert accounts.authenticate_access_key(ctx, key.id, key.secret) is not None

    new = accounts.rotate_access_key(ctx, key.id)
    assert new.id != key.id and new.secret != key.secret and new.enabled
    assert accounts.authenticate_access_key(ctx, new.id, new.secret) is not None
    assert accounts.authenticate_access_key(ctx, key.id, key.secret) is None  # disabled
    listed = {k.id: k for k in accounts.list_access_keys(ctx, "alice")}
    assert set(listed) == {key.id, new.id}
    assert not listed[key.id].enabled and listed[new.id].enabled
    assert listed[new.id].account_name == "alice"
    assert not hasattr(listed[new.id], "secret")

    newer = accounts.rotate_access_key(ctx, new.id, delete_old=True)
    assert {k.id for k in accounts.list_access_keys(ctx)} == {key.id, newer.id}
    assert accounts.find_access_key(ctx, new.id) is None
    accounts.delete_access_key(ctx, key.id)
    assert [k.id for k in accounts.list_access_keys(ctx, "alice")] == [newer.id]
    for call in (accounts.delete_access_key, accounts.disable_access_key,
                 accounts.rotate_access_key):
        with pytest.raises(EcsError) as refused:
            call(ctx, key.id)
        assert refused.value.code == "InvalidAccessKeyId.NotFound"


def test_init_again_hands_out_the_plain_secret_of_the_enabled_key(ctx: ServiceContext) -> None:
    first = setup.initialise(ctx, REGION)
    assert stored_secrets(ctx)[first.access_key.id] != first.access_key.secret  # sealed
    again = setup.initialise(ctx, REGION)
    assert (again.access_key.id, again.access_key.secret) == \
        (first.access_key.id, first.access_key.secret)
    rotated = accounts.rotate_access_key(ctx, first.access_key.id)
    after = setup.initialise(ctx, REGION)
    assert (after.access_key.id, after.access_key.secret) == (rotated.id, rotated.secret)


def test_a_server_start_seals_secrets_stored_plain(tmp_path: Path) -> None:
    settings = config.load(tmp_path / "data", background_tasks=False)
    ctx = bootstrap.build(settings, compute=FileBackedCompute(), background=False)
    key = accounts.create_access_key(ctx, accounts.create_account(
        ctx, "dora", PASSWORD).name)
    with ctx.extras["engine"].begin() as conn:  # as an older release stored it
        conn.execute(text("UPDATE access_keys SET secret = :s WHERE id = :i"),
                     {"s": key.secret, "i": key.id})
    bootstrap.build(settings, compute=FileBackedCompute(), background=False, recover=True)
    assert stored_secrets(ctx)[key.id] != key.secret
    found = accounts.find_access_key(ctx, key.id)
    assert found is not None and found.secret == key.secret
