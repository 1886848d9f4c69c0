"""add organization retention policy

Revision ID: a7e3f09b12c4
Revises: 8c41d5e2b6a9
Create Date: 2026-11-02 15:45:00
"""

import sqlalchemy as sa
from alembic import op

revision = "a7e3f09b12c4"
down_revision = "8c41d5e2b6a9"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "organizations",
        sa.Column("retention_days", sa.Integer, nullable=False, server_default="365"),
    )
    op.create_check_constraint(
        "ck_organizations_retention_days_positive", "organizations", "retention_days > 0"
    )


def downgrade() -> None:
    op.drop_constraint("ck_organizations_retention_days_positive", "organizations")
    op.drop_column("organizations", "retention_days")
