"""Alembic environment: runs on the connection `ecsnap.adapters.store.sql.migrate` hands over."""

from alembic import context

from ecsnap.adapters.store.orm import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # `alembic` command line: use sqlalchemy.url from the config
    from sqlalchemy import create_engine

    engine = create_engine(context.config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
