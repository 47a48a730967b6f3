"""pgcat_tw: a PostgreSQL pooler, proxy and query router on Twisted."""

__version__ = "0.1.0"
