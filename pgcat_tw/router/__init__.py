"""Routing decisions (L0: no I/O): PgCat's custom SQL commands."""
