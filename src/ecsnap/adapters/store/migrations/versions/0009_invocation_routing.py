"""invocation routing: in cluster mode a Cloud Assistant command is carried to the agent
of its instance's host the way tasks are (service/commands.py): invocations.host_id (the
host that must run it), owner and owner_epoch (the agent that claimed it, under which
epoch; "" / 0 until claimed). Existing rows were written by the single-host server: no
host, never claimed.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 19:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("invocations") as batch:
        batch.add_column(sa.Column("host_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("owner", sa.String(length=64), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("owner_epoch", sa.Integer(), nullable=False,
                                   server_default="0"))
        batch.create_index("ix_invocations_host", ["host_id", "status"])


def downgrade() -> None:
    with op.batch_alter_table("invocations") as batch:
        batch.drop_index("ix_invocations_host")
        batch.drop_column("owner_epoch")
        batch.drop_column("owner")
        batch.drop_column("host_id")
