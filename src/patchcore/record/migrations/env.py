"""Alembic's entry point for the record's migrations: always run on a connection the caller
opened (``store.migrate``), never from a URL in a config file."""

from alembic import context

context.configure(connection=context.config.attributes["connection"], render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
