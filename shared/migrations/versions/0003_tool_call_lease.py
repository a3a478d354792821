"""tool-call claims have an owner and a lease

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Both nullable: claims stored before this revision have neither, and count as lapsed.
    with op.batch_alter_table('umi_tool_call', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True))
        batch_op.add_column(sa.Column('lease_expires_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('umi_tool_call', schema=None) as batch_op:
        batch_op.drop_column('lease_expires_at')
        batch_op.drop_column('owner')
