"""tenants and API keys, idempotency keys, the outbox and the event relay's markers

Revision ID: 0004
Revises: 0003

Tasks stored before this revision belong to the ``default`` tenant, count as enqueued,
and their steps and ends as published: the relay does not replay history.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

DEFAULT_TENANT_ID = '00000000-0000-0000-0000-000000000001'


def upgrade() -> None:
    tenant = op.create_table(
        'umi_tenant',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('rate_per_s', sa.Float(), nullable=True),
        sa.Column('burst', sa.Integer(), nullable=True),
        sa.Column('max_in_flight', sa.Integer(), nullable=True),
        sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('name'),
    )
    op.bulk_insert(tenant, [{'id': uuid.UUID(DEFAULT_TENANT_ID), 'name': 'default', 'created_at': datetime.now(UTC)}])
    op.create_table(
        'umi_api_key',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('tenant_id', sa.Uuid(), nullable=False),
        sa.Column('prefix', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column('key_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('revoked_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(['tenant_id'], ['umi_tenant.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('key_hash'),
    )
    op.create_index('ix_umi_api_key_tenant_id', 'umi_api_key', ['tenant_id'])
    op.create_table(
        'umi_tenant_rate',
        sa.Column('tenant_id', sa.Uuid(), nullable=False),
        sa.Column('tat', sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(['tenant_id'], ['umi_tenant.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('tenant_id'),
    )
    with op.batch_alter_table('umi_task', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tenant_id', sa.Uuid(), nullable=False, server_default=DEFAULT_TENANT_ID))
        batch_op.add_column(sa.Column('idempotency_key', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('request_fingerprint', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column('reply_to', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('correlation_id', sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column('enqueued_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('end_published_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.create_foreign_key('fk_umi_task_tenant_id', 'umi_tenant', ['tenant_id'], ['id'])
        batch_op.create_unique_constraint('uq_umi_task_tenant_idempotency_key', ['tenant_id', 'idempotency_key'])
        batch_op.create_index('ix_umi_task_tenant_id', ['tenant_id'])
        batch_op.create_index('ix_umi_task_tenant_created', ['tenant_id', 'created_at', 'id'])
    with op.batch_alter_table('umi_task', schema=None) as batch_op:
        batch_op.alter_column('tenant_id', server_default=None)
    op.execute("UPDATE umi_task SET enqueued_at = created_at, end_published_at = updated_at")
    op.create_index(
        'ix_umi_task_unenqueued', 'umi_task', ['created_at'],
        postgresql_where=sa.text('enqueued_at IS NULL'), sqlite_where=sa.text('enqueued_at IS NULL'),
    )
    op.create_index(
        'ix_umi_task_end_unpublished', 'umi_task', ['id'],
        postgresql_where=sa.text('end_published_at IS NULL'), sqlite_where=sa.text('end_published_at IS NULL'),
    )
    with op.batch_alter_table('umi_step', schema=None) as batch_op:
        batch_op.add_column(sa.Column('started_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('published_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
    op.execute("UPDATE umi_step SET published_at = created_at")
    op.create_index(
        'ix_umi_step_unpublished',
        'umi_step',
        ['id'],
        postgresql_where=sa.text('published_at IS NULL'),
        sqlite_where=sa.text('published_at IS NULL'),
    )


def downgrade() -> None:
    op.drop_index('ix_umi_task_end_unpublished', table_name='umi_task')
    op.drop_index('ix_umi_task_unenqueued', table_name='umi_task')
    op.drop_index('ix_umi_step_unpublished', table_name='umi_step')
    with op.batch_alter_table('umi_step', schema=None) as batch_op:
        batch_op.drop_column('published_at')
        batch_op.drop_column('started_at')
    with op.batch_alter_table('umi_task', schema=None) as batch_op:
        batch_op.drop_index('ix_umi_task_tenant_created')
        batch_op.drop_index('ix_umi_task_tenant_id')
        batch_op.drop_constraint('uq_umi_task_tenant_idempotency_key', type_='unique')
        batch_op.drop_constraint('fk_umi_task_tenant_id', type_='foreignkey')
        batch_op.drop_column('end_published_at')
        batch_op.drop_column('enqueued_at')
        batch_op.drop_column('correlation_id')
        batch_op.drop_column('reply_to')
        batch_op.drop_column('request_fingerprint')
        batch_op.drop_column('idempotency_key')
        batch_op.drop_column('tenant_id')
    op.drop_table('umi_tenant_rate')
    op.drop_index('ix_umi_api_key_tenant_id', table_name='umi_api_key')
    op.drop_table('umi_api_key')
    op.drop_table('umi_tenant')
