"""hosts, epochs and task leases: the cluster's agents (one row per hypervisor host, its
epoch fencing late writes) and, on tasks, where their steps run and which agent holds them
until when (service/cluster.py).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 18:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("id", sa.String(length=64), primary_key=True),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.Column("vcpus", sa.Integer(), nullable=False),
        sa.Column("memory_mib", sa.Integer(), nullable=False),
        sa.Column("address", sa.String(length=256), nullable=False, server_default=""),
        sa.Column("ceph_addrs", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
    )
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("host_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("owner", sa.String(length=64), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("owner_epoch", sa.Integer(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("lease_until", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("lease_until")
        batch.drop_column("owner_epoch")
        batch.drop_column("owner")
        batch.drop_column("host_id")
    op.drop_table("hosts")
