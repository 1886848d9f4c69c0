"""add scan severity index

Revision ID: 8c41d5e2b6a9
Revises: 3f2a9c1d7e10
Create Date: 2026-10-14 11:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "8c41d5e2b6a9"
down_revision = "3f2a9c1d7e10"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "compliance_scans",
        sa.Column("severity", sa.Text, nullable=False, server_default="medium"),
    )
    op.create_index("ix_compliance_scans_severity", "compliance_scans", ["severity"])


def downgrade() -> None:
    op.drop_index("ix_compliance_scans_severity", table_name="compliance_scans")
    op.drop_column("compliance_scans", "severity")
