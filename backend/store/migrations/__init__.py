"""Alembic revisions of the store, shipped inside the package (`backend.store.db.MIGRATIONS_DIR`)."""
