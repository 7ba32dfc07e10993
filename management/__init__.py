"""Tessera management: the storage control plane (REST, SQLAlchemy store).

`create_app` in `management.app` builds the FastAPI application; the
`tessera-management` console script (`management.__main__`) serves it.
"""
