"""unipelt's in-tree plugins, installed as the package ``unipelt_plugins``.

They register through the entry-point group ``unipelt`` (see pyproject.toml) exactly as a
third-party package would; nothing in the core names them.
"""
