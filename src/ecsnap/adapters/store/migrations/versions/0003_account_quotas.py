"""account quotas: what each account may hold (instances, vCPUs, memory, disks, disk GiB,
snapshots), set by the admin; absent keys take the defaults of the settings.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 15:40:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("quotas", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("quotas")
