"""initial schema: tasks, steps, tool calls

Revision ID: 0001
Revises: 
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('umi_task',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('query', sa.Text(), nullable=False),
    sa.Column('tools', sa.JSON(), nullable=False),
    sa.Column('answer', sa.Text(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('end_reason', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('max_steps', sa.Integer(), nullable=False),
    sa.Column('constrained', sa.Boolean(), nullable=False),
    sa.Column('deadline_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('finished_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('umi_task', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_umi_task_status'), ['status'], unique=False)

    op.create_table('umi_step',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.Uuid(), nullable=False),
    sa.Column('index', sa.Integer(), nullable=False),
    sa.Column('role', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('output', sa.Text(), nullable=False),
    sa.Column('raw_output', sa.Text(), nullable=True),
    sa.Column('next_role', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
    sa.Column('tool_name', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True),
    sa.Column('prompt_tokens', sa.Integer(), nullable=True),
    sa.Column('completion_tokens', sa.Integer(), nullable=True),
    sa.Column('cached_tokens', sa.Integer(), nullable=True),
    sa.Column('latency_s', sa.Float(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=True),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['task_id'], ['umi_task.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('task_id', 'index', name='uq_umi_step_task_index')
    )
    with op.batch_alter_table('umi_step', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_umi_step_task_id'), ['task_id'], unique=False)

    op.create_table('umi_tool_call',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.Uuid(), nullable=False),
    sa.Column('step_index', sa.Integer(), nullable=False),
    sa.Column('tool_name', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=False),
    sa.Column('arguments', sa.Text(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('ok', sa.Boolean(), nullable=True),
    sa.Column('backend', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('latency_s', sa.Float(), nullable=True),
    sa.Column('started_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('finished_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['task_id'], ['umi_task.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('task_id', 'step_index', name='uq_umi_tool_call_task_step')
    )
    with op.batch_alter_table('umi_tool_call', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_umi_tool_call_task_id'), ['task_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('umi_tool_call', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_umi_tool_call_task_id'))

    op.drop_table('umi_tool_call')
    with op.batch_alter_table('umi_step', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_umi_step_task_id'))

    op.drop_table('umi_step')
    with op.batch_alter_table('umi_task', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_umi_task_status'))

    op.drop_table('umi_task')
