"""The MLflow store a command is given (`--tracking-uri`, `tracking.uri`), checked before anything uses it: a wrong one
is one line (a ConfigError, exit code 2) at once, never a library's traceback or minutes of retries.

Accepted: `sqlite:///PATH` (a SQLite file; a sweep creates it, a reader needs it), `file:///DIR` (MLflow's file
store), `http(s)://HOST:PORT` (a tracking server, which must answer its /health within TIMEOUT_S), and the database
URLs MLflow's SQL store takes (`postgresql://`, `mysql://`, `mssql://`, with `+driver` optional), whose Python
driver must be importable. Plain Python: no MLflow import.
"""

from __future__ import annotations

from pathlib import Path

from kdray.errors import ConfigError

TIMEOUT_S = 10  # how long a tracking server has to answer /health
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
DATABASES = ("postgresql", "mysql", "mssql")
SCHEMES = ("sqlite", "file", "http", "https", *DATABASES)


def check_store(uri: str, must_exist: bool = False) -> None:
    """ConfigError naming `uri` when no MLflow store can be used there: an unknown scheme, a SQLite path that is not
    a SQLite database (or, with `must_exist`, is missing: a reader would otherwise get an empty store), a database
    URL whose driver is not installed, a server that does not answer."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme not in SCHEMES:
        raise ConfigError(f"tracking URI {uri}: not a store MLflow can open; expected sqlite:///PATH, "
                          "http(s)://HOST:PORT (a tracking server), file:///DIR, or a database URL "
                          f"({', '.join(s + '://' for s in DATABASES)})")
    if scheme == "sqlite":
        _check_sqlite(uri, Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None, must_exist)
    elif scheme in ("http", "https"):
        _check_server(uri)
    elif scheme in DATABASES:
        _check_driver(uri)


def _check_sqlite(uri: str, path: Path | None, must_exist: bool) -> None:
    if path is None:
        raise ConfigError(f"tracking URI {uri}: a SQLite store is sqlite:///PATH (three slashes, then the file)")
    if not path.exists():
        if must_exist:
            raise ConfigError(f"no MLflow store at {path} (tracking URI {uri}): pass --tracking-uri or set "
                              "MLFLOW_TRACKING_URI to the store the sweep printed")
        return
    if path.is_dir():
        raise ConfigError(f"tracking URI {uri}: {path} is a directory; a SQLite store is a file (a directory is "
                          f"file://{path})")
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as err:
        raise ConfigError(f"tracking URI {uri}: cannot read {path} ({err.strerror})") from None
    if head and head != SQLITE_HEADER:
        raise ConfigError(f"tracking URI {uri}: {path} is not a SQLite database (an MLflow store is one); name the "
                          ".db file the sweep printed")


def _check_server(uri: str) -> None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=TIMEOUT_S) as answer:
            answer.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        why = getattr(err, "reason", err)
        raise ConfigError(f"tracking URI {uri}: no MLflow server answers there ({why}); start it, or pass "
                          "another --tracking-uri") from None


# The Python modules SQLAlchemy's default driver of each database is: any one of them will do.
DEFAULT_DRIVERS = {"postgresql": ("psycopg2", "psycopg"), "mysql": ("MySQLdb", "pymysql"),
                   "mssql": ("pyodbc", "pymssql")}


def _check_driver(uri: str) -> None:
    """The database's Python driver importable (`postgresql+psycopg2://` names it; else one of the database's
    `DEFAULT_DRIVERS`); nothing is connected."""
    import importlib.util

    scheme = uri.split("://", 1)[0].lower()
    database, _, driver = scheme.partition("+")
    modules = (driver,) if driver else DEFAULT_DRIVERS[database]
    if not any(importlib.util.find_spec(m) is not None for m in modules):
        raise ConfigError(f"tracking URI {uri}: its database driver is not installed (Python module "
                          f"{' or '.join(modules)}); install it (pip install {modules[0]})")
