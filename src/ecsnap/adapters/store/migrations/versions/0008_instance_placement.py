"""instance placement on hosts: instances.host_id, the host an instance's compute is (or
was last) claimed on (service/placement.py). The instances that exist already were made by
the single-host server: they are on its implicit host "local" (a former single-host
machine joins a cluster as the agent `ecsnap agent --host-id local`, so that its instances
with local qcow2 disks stay pinned to it).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 18:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("host_id", sa.String(length=64), nullable=True))
        batch.create_index("ix_instances_host", ["host_id"])
    op.execute("UPDATE instances SET host_id = 'local'")


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_index("ix_instances_host")
        batch.drop_column("host_id")
