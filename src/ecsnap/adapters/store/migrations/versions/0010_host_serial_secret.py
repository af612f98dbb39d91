"""host serial secret: the key of the short-lived tokens with which an API process of a
cluster opens an instance's serial console on its host's agent (HMAC-SHA256 over the
instance and an expiry; service/console_access.py). A host's agent gets one when it first
registers; the hosts registered before this revision get a random one here (an empty
secret is never accepted).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 10:00:00.000000
"""

import secrets

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("serial_secret", sa.String(length=64), nullable=False,
                                   server_default=""))
    hosts = sa.table("hosts", sa.column("id", sa.String), sa.column("serial_secret", sa.String))
    connection = op.get_bind()
    for (host_id,) in connection.execute(sa.select(hosts.c.id)).all():
        connection.execute(hosts.update().where(hosts.c.id == host_id)
                           .values(serial_secret=secrets.token_hex(32)))


def downgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("serial_secret")
