"""Migrate a database from code (the CLI, bootstrap, tests), whatever the working directory."""

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import make_url

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(database_url: str) -> Config:
    # No alembic.ini: it configures logging for the command line, which a library call must not.
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # The option goes through ConfigParser interpolation, so a literal % (an escaped password) is doubled.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade_database(database_url: str) -> None:
    """Bring the schema up to the newest migration; a no-op when it is already there."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        # The embedded default's folder does not exist before the first run.
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(database_url), "head")


def downgrade_database(database_url: str, revision: str = "base") -> None:
    """Undo migrations down to `revision` ("base" drops the whole schema)."""
    command.downgrade(alembic_config(database_url), revision)
