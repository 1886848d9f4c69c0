"""unique user emails

Revision ID: e5c1d9a4f7b3
Revises: a7e3f09b12c4
Create Date: 2026-11-20 10:30:00

A data migration: emails are lower-cased first (sign-in compares them so), then made
unique. Two accounts differing only in case make the unique index fail, and PostgreSQL
quotes the duplicated email in its error.
"""

from alembic import op

revision = "e5c1d9a4f7b3"
down_revision = "a7e3f09b12c4"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("UPDATE users SET email = lower(email) WHERE email <> lower(email)")
    op.create_unique_constraint("uq_users_email", "users", ["email"])


def downgrade() -> None:
    # The lower-casing is not undone: the original case is not kept anywhere.
    op.drop_constraint("uq_users_email", "users", type_="unique")
