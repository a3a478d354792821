"""task mode and generation overrides

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('umi_task', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mode', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False, server_default='agent'))
        batch_op.add_column(sa.Column('temperature', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('max_new_tokens', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('umi_task', schema=None) as batch_op:
        batch_op.drop_column('max_new_tokens')
        batch_op.drop_column('temperature')
        batch_op.drop_column('mode')
