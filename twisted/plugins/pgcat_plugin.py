from twisted.application.service import ServiceMaker

pgcat = ServiceMaker(
    "pgcat_tw",
    "pgcat_tw.tap",
    "PostgreSQL connection pooler and query router (PgCat-compatible).",
    "pgcat",
)
