"""initial schema

Revision ID: 3f2a9c1d7e10
Revises:
Create Date: 2026-09-01 09:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "3f2a9c1d7e10"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "organizations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", sa.Text, nullable=False),
    )
    op.create_table(
        "compliance_scans",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("status", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in ("compliance_scans", "users", "organizations"):
        op.drop_table(table)
