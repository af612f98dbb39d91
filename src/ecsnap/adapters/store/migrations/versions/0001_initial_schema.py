"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25 06:58:43.380319
"""

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('access_keys',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('secret', sa.String(length=128), nullable=False),
    sa.Column('account_id', sa.String(length=64), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('access_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_access_keys_account_id'), ['account_id'], unique=False)

    op.create_table('accounts',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('password_hash', sa.String(length=256), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('disks',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('account_id', sa.String(length=64), nullable=False),
    sa.Column('region_id', sa.String(length=64), nullable=False),
    sa.Column('zone_id', sa.String(length=64), nullable=False),
    sa.Column('size_gib', sa.Integer(), nullable=False),
    sa.Column('type', sa.Enum('system', 'data', name='disktype', native_enum=False, length=32), nullable=False),
    sa.Column('category', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('status', sa.Enum('Creating', 'Available', 'In_use', 'Attaching', 'Detaching', 'ReIniting', name='diskstatus', native_enum=False, length=32), nullable=False),
    sa.Column('instance_id', sa.String(length=64), nullable=True),
    sa.Column('device', sa.String(length=32), nullable=False),
    sa.Column('delete_with_instance', sa.Boolean(), nullable=False),
    sa.Column('image_id', sa.String(length=64), nullable=False),
    sa.Column('source_snapshot_id', sa.String(length=64), nullable=False),
    sa.Column('lock_task_id', sa.String(length=64), nullable=True),
    sa.Column('released', sa.Boolean(), nullable=False),
    sa.Column('portable', sa.Boolean(), nullable=False),
    sa.Column('tags', sa.JSON(), nullable=False),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.Column('attached_time', sa.DateTime(), nullable=True),
    sa.Column('detached_time', sa.DateTime(), nullable=True),
    sa.Column('released_time', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('disks', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_disks_instance_id'), ['instance_id'], unique=False)
        batch_op.create_index('ix_disks_owner', ['account_id', 'region_id', 'created'], unique=False)

    op.create_table('idempotency',
    sa.Column('account_id', sa.String(length=64), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('token', sa.String(length=64), nullable=False),
    sa.Column('params_digest', sa.String(length=64), nullable=False),
    sa.Column('response', sa.JSON(), nullable=False),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('account_id', 'action', 'token')
    )
    op.create_table('images',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('region_id', sa.String(length=64), nullable=False),
    sa.Column('account_id', sa.String(length=64), nullable=True),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('os_name', sa.String(length=256), nullable=False),
    sa.Column('os_type', sa.String(length=16), nullable=False),
    sa.Column('architecture', sa.String(length=16), nullable=False),
    sa.Column('template_path', sa.Text(), nullable=False),
    sa.Column('size_gib', sa.Integer(), nullable=False),
    sa.Column('boot_mode', sa.String(length=16), nullable=False),
    sa.Column('kernel_path', sa.Text(), nullable=False),
    sa.Column('initrd_path', sa.Text(), nullable=False),
    sa.Column('kernel_args', sa.Text(), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_images_account_id'), ['account_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_images_region_id'), ['region_id'], unique=False)

    op.create_table('instances',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('account_id', sa.String(length=64), nullable=False),
    sa.Column('region_id', sa.String(length=64), nullable=False),
    sa.Column('zone_id', sa.String(length=64), nullable=False),
    sa.Column('instance_type', sa.String(length=64), nullable=False),
    sa.Column('vcpus', sa.Integer(), nullable=False),
    sa.Column('memory_mib', sa.Integer(), nullable=False),
    sa.Column('image_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('status', sa.Enum('Pending', 'Starting', 'Running', 'Stopping', 'Stopped', name='instancestatus', native_enum=False, length=32), nullable=False),
    sa.Column('stopped_mode', sa.Enum('KeepCharging', 'StopCharging', 'Not-applicable', name='stoppedmode', native_enum=False, length=32), nullable=False),
    sa.Column('lock_task_id', sa.String(length=64), nullable=True),
    sa.Column('tags', sa.JSON(), nullable=False),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.Column('started', sa.DateTime(), nullable=True),
    sa.Column('host_name', sa.String(length=128), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.create_index('ix_instances_owner', ['account_id', 'region_id', 'created'], unique=False)

    op.create_table('invocations',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('invoke_id', sa.String(length=64), nullable=False),
    sa.Column('command_id', sa.String(length=64), nullable=False),
    sa.Column('account_id', sa.String(length=64), nullable=False),
    sa.Column('region_id', sa.String(length=64), nullable=False),
    sa.Column('instance_id', sa.String(length=64), nullable=False),
    sa.Column('command_type', sa.String(length=32), nullable=False),
    sa.Column('command_content', sa.Text(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('working_dir', sa.Text(), nullable=False),
    sa.Column('timeout', sa.Integer(), nullable=False),
    sa.Column('status', sa.Enum('Running', 'Success', 'Failed', 'Timeout', 'Error', name='invocationstatus', native_enum=False, length=32), nullable=False),
    sa.Column('exit_code', sa.Integer(), nullable=True),
    sa.Column('output', sa.Text(), nullable=False),
    sa.Column('dropped', sa.Integer(), nullable=False),
    sa.Column('error_code', sa.String(length=64), nullable=False),
    sa.Column('error_info', sa.Text(), nullable=False),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.Column('started', sa.DateTime(), nullable=True),
    sa.Column('finished', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('invocations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_invocations_command_id'), ['command_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_invocations_instance_id'), ['instance_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_invocations_invoke_id'), ['invoke_id'], unique=False)
        batch_op.create_index('ix_invocations_owner', ['account_id', 'region_id', 'created'], unique=False)

    op.create_table('nonces',
    sa.Column('key_id', sa.String(length=64), nullable=False),
    sa.Column('nonce', sa.String(length=128), nullable=False),
    sa.Column('expires', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('key_id', 'nonce')
    )
    with op.batch_alter_table('nonces', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_nonces_expires'), ['expires'], unique=False)

    op.create_table('regions',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('local_name', sa.String(length=128), nullable=False),
    sa.Column('vcpu_capacity', sa.Integer(), nullable=False),
    sa.Column('memory_mib_capacity', sa.Integer(), nullable=False),
    sa.Column('storage_pool', sa.Text(), nullable=False),
    sa.Column('instance_types', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('snapshot_groups',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('account_id', sa.String(length=64), nullable=False),
    sa.Column('region_id', sa.String(length=64), nullable=False),
    sa.Column('instance_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('status', sa.Enum('progressing', 'accomplished', 'failed', name='snapshotstatus', native_enum=False, length=32), nullable=False),
    sa.Column('purpose', sa.Enum('user', 'safety', name='grouppurpose', native_enum=False, length=32), nullable=False),
    sa.Column('consistency', sa.Enum('CrashConsistent', 'FileSystemConsistent', name='consistency', native_enum=False, length=32), nullable=False),
    sa.Column('window_ms', sa.Float(), nullable=True),
    sa.Column('tags', sa.JSON(), nullable=False),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('snapshot_groups', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_snapshot_groups_instance_id'), ['instance_id'], unique=False)
        batch_op.create_index('ix_snapshot_groups_owner', ['account_id', 'region_id', 'created'], unique=False)

    op.create_table('snapshots',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('account_id', sa.String(length=64), nullable=False),
    sa.Column('region_id', sa.String(length=64), nullable=False),
    sa.Column('source_disk_id', sa.String(length=64), nullable=False),
    sa.Column('source_disk_type', sa.Enum('system', 'data', name='disktype', native_enum=False, length=32), nullable=False),
    sa.Column('source_disk_size', sa.Integer(), nullable=False),
    sa.Column('instance_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('status', sa.Enum('progressing', 'accomplished', 'failed', name='snapshotstatus', native_enum=False, length=32), nullable=False),
    sa.Column('progress', sa.Integer(), nullable=False),
    sa.Column('group_id', sa.String(length=64), nullable=True),
    sa.Column('consistency', sa.Enum('CrashConsistent', 'FileSystemConsistent', name='consistency', native_enum=False, length=32), nullable=False),
    sa.Column('retention_days', sa.Integer(), nullable=True),
    sa.Column('tags', sa.JSON(), nullable=False),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.Column('last_modified', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('snapshots', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_snapshots_group_id'), ['group_id'], unique=False)
        batch_op.create_index('ix_snapshots_owner', ['account_id', 'region_id', 'created'], unique=False)
        batch_op.create_index(batch_op.f('ix_snapshots_source_disk_id'), ['source_disk_id'], unique=False)

    op.create_table('tasks',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('account_id', sa.String(length=64), nullable=False),
    sa.Column('region_id', sa.String(length=64), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('resource_id', sa.String(length=64), nullable=False),
    sa.Column('status', sa.Enum('Processing', 'Finished', 'Failed', name='taskstatus', native_enum=False, length=32), nullable=False),
    sa.Column('plan', sa.JSON(), nullable=False),
    sa.Column('done', sa.JSON(), nullable=False),
    sa.Column('result', sa.JSON(), nullable=False),
    sa.Column('error_code', sa.String(length=128), nullable=False),
    sa.Column('error_message', sa.Text(), nullable=False),
    sa.Column('created', sa.DateTime(), nullable=False),
    sa.Column('finished', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.create_index('ix_tasks_owner', ['account_id', 'region_id', 'created'], unique=False)
        batch_op.create_index(batch_op.f('ix_tasks_status'), ['status'], unique=False)

    op.create_table('zones',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('region_id', sa.String(length=64), nullable=False),
    sa.Column('local_name', sa.String(length=128), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('zones', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_zones_region_id'), ['region_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('zones', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_zones_region_id'))

    op.drop_table('zones')
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_tasks_status'))
        batch_op.drop_index('ix_tasks_owner')

    op.drop_table('tasks')
    with op.batch_alter_table('snapshots', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_snapshots_source_disk_id'))
        batch_op.drop_index('ix_snapshots_owner')
        batch_op.drop_index(batch_op.f('ix_snapshots_group_id'))

    op.drop_table('snapshots')
    with op.batch_alter_table('snapshot_groups', schema=None) as batch_op:
        batch_op.drop_index('ix_snapshot_groups_owner')
        batch_op.drop_index(batch_op.f('ix_snapshot_groups_instance_id'))

    op.drop_table('snapshot_groups')
    op.drop_table('regions')
    with op.batch_alter_table('nonces', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_nonces_expires'))

    op.drop_table('nonces')
    with op.batch_alter_table('invocations', schema=None) as batch_op:
        batch_op.drop_index('ix_invocations_owner')
        batch_op.drop_index(batch_op.f('ix_invocations_invoke_id'))
        batch_op.drop_index(batch_op.f('ix_invocations_instance_id'))
        batch_op.drop_index(batch_op.f('ix_invocations_command_id'))

    op.drop_table('invocations')
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index('ix_instances_owner')

    op.drop_table('instances')
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_images_region_id'))
        batch_op.drop_index(batch_op.f('ix_images_account_id'))

    op.drop_table('images')
    op.drop_table('idempotency')
    with op.batch_alter_table('disks', schema=None) as batch_op:
        batch_op.drop_index('ix_disks_owner')
        batch_op.drop_index(batch_op.f('ix_disks_instance_id'))

    op.drop_table('disks')
    op.drop_table('accounts')
    with op.batch_alter_table('access_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_access_keys_account_id'))

    op.drop_table('access_keys')
