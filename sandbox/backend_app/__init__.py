"""The stand-in backend's application files, as its image holds them under /app: the
alembic project of its database schema (`alembic.ini`, `migrations/`)."""

from pathlib import Path

# What the backend image's working directory (/app) holds, for Jobs the sandbox runs.
APP_DIRECTORY = Path(__file__).resolve().parent
# The revision the sandbox seeds its database at: migrations have work to do.
SEED_REVISION = "3f2a9c1d7e10"
HEAD_REVISION = "e5c1d9a4f7b3"
