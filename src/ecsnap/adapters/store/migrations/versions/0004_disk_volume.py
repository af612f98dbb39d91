"""disk volume: the storage volume holding a disk's current content ("" is the volume
named by the disk ID, as for every disk before); a rollback by clone and swap (Ceph RBD)
moves a disk to a new volume.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 10:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("disks") as batch:
        batch.add_column(sa.Column("volume", sa.String(length=200), nullable=False,
                                   server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("disks") as batch:
        batch.drop_column("volume")
