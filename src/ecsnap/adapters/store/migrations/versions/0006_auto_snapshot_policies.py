"""automatic snapshot policies: the policies, the policy applied to each disk, the type
(user or auto) and policy of each snapshot, and the last time point each policy took of each
disk (service/policies.py).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 18:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "auto_snapshot_policies",
        sa.Column("id", sa.String(length=64), primary_key=True),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("region_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("time_points", sa.JSON(), nullable=False),
        sa.Column("repeat_weekdays", sa.JSON(), nullable=False),
        sa.Column("retention_days", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_auto_snapshot_policies_owner", "auto_snapshot_policies",
                    ["account_id", "region_id", "created", "id"])
    op.create_table(
        "policy_runs",
        sa.Column("id", sa.String(length=200), primary_key=True),
        sa.Column("policy_id", sa.String(length=64), nullable=False),
        sa.Column("disk_id", sa.String(length=64), nullable=False),
        sa.Column("last_due", sa.DateTime(), nullable=False),
        sa.Column("snapshot_id", sa.String(length=64), nullable=False),
    )
    op.create_index("ix_policy_runs_policy_id", "policy_runs", ["policy_id"])
    with op.batch_alter_table("disks") as batch:
        batch.add_column(sa.Column("auto_snapshot_policy_id", sa.String(length=64),
                                   nullable=False, server_default=""))
        batch.create_index("ix_disks_auto_snapshot_policy_id", ["auto_snapshot_policy_id"])
    with op.batch_alter_table("snapshots") as batch:
        batch.add_column(sa.Column("snapshot_type", sa.String(length=16), nullable=False,
                                   server_default="user"))
        batch.add_column(sa.Column("policy_id", sa.String(length=64), nullable=False,
                                   server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("snapshots") as batch:
        batch.drop_column("policy_id")
        batch.drop_column("snapshot_type")
    with op.batch_alter_table("disks") as batch:
        batch.drop_index("ix_disks_auto_snapshot_policy_id")
        batch.drop_column("auto_snapshot_policy_id")
    op.drop_index("ix_policy_runs_policy_id", table_name="policy_runs")
    op.drop_table("policy_runs")
    op.drop_index("ix_auto_snapshot_policies_owner", table_name="auto_snapshot_policies")
    op.drop_table("auto_snapshot_policies")
