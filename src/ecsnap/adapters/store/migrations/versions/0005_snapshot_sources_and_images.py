"""disks from snapshots and custom images: an index on disks.source_snapshot_id (the column
exists since 0001), for the questions asked of it by snapshot: which disks a snapshot
created (DeleteSnapshot's SnapshotCreatedDisk, automatic snapshots' retention); and
images.source_snapshot_id, the system-disk snapshot a custom image was made from
(CreateImage; DescribeImages' DiskDeviceMappings and SnapshotId filter; DeleteSnapshot's
SnapshotCreatedImage), indexed for those questions.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 18:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_disks_source_snapshot_id", "disks", ["source_snapshot_id"])
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("source_snapshot_id", sa.String(length=64), nullable=False,
                                   server_default=""))
        batch.create_index("ix_images_source_snapshot_id", ["source_snapshot_id"])


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_index("ix_images_source_snapshot_id")
        batch.drop_column("source_snapshot_id")
    op.drop_index("ix_disks_source_snapshot_id", table_name="disks")
