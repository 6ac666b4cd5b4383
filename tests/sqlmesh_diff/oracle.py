"""The SQLMesh side of the differential suite (tests/sqlmesh_diff.rs), run by the pinned SQLMesh
virtual environment that scripts/services.sh installs.

  oracle.py apply PROJECT EXECUTION_TIME [ENV [OPTION...]]
                                                 runs `sqlmesh plan ENV --auto-apply [OPTION...]` on PROJECT
  oracle.py run PROJECT NOW [ENV]                runs `sqlmesh run ENV` on PROJECT (at the wall clock)
  oracle.py execute DUCKDB_FILE SQL [reader]      runs SQL in a DuckDB file (tables the models read from
                                                   outside): with SQLMesh's DuckDB, or with `reader` the
                                                   DuckDB sluice links, so each tool's file stays in its
                                                   own DuckDB's format
  oracle.py dump DUCKDB_FILE|POSTGRES_URL VIEW...  prints each view's columns with their type family,
                                                   row count and an order-independent checksum, one
                                                   JSON line each (and its exact types on a # line)

Both tools' warehouses are dumped by the same code, so a difference is in the data, never in how
it was read.
"""

import decimal
import datetime
import hashlib
import json
import subprocess
import sys
from pathlib import Path


def apply(project: str, execution_time: str, environment: str = "prod", *options: str) -> None:
    """`options` are passed on to `sqlmesh plan` (such as `--start 2024-01-03`)."""
    sqlmesh = Path(sys.executable).with_name("sqlmesh")
    command = [str(sqlmesh), "--paths", project, "plan"]
    if environment != "prod":
        command.append(environment)
    command += ["--auto-apply", "--no-prompts", "--execution-time", execution_time, *options]
    # In the project's folder: SQLMesh writes its logs/ and cache beside it, never in the clone.
    result = subprocess.run(command, capture_output=True, text=True, cwd=project)
    if result.returncode != 0 or "Error" in result.stdout:
        sys.stderr.write(result.stdout + result.stderr)
        sys.exit(result.returncode or 1)


def run(project: str, _now: str, environment: str = "prod") -> None:
    """`sqlmesh run` has no execution time: it runs at the wall clock (the caller runs sluice at
    the same moment)."""
    sqlmesh = Path(sys.executable).with_name("sqlmesh")
    command = [str(sqlmesh), "--paths", project, "run"]
    if environment != "prod":
        command.append(environment)
    # In the project's folder: SQLMesh writes its logs/ and cache beside it, never in the clone.
    result = subprocess.run(command, capture_output=True, text=True, cwd=project)
    if result.returncode != 0 or "Error" in result.stdout:
        sys.stderr.write(result.stdout + result.stderr)
        sys.exit(result.returncode or 1)


def normalized(value):
    """One cell as text both tools' drivers agree on: numbers by value, times in ISO form."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float, decimal.Decimal)):
        number = float(value)
        if number == int(number) and abs(number) < 2**53:
            return str(int(number))
        return repr(round(number, 9))
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    return str(value)


def type_family(data_type: str) -> str:
    """A column type's family. SQLMesh casts every column to the type its optimizer infers
    (SUM of BIGINT is BIGINT), where sluice keeps the one the engine gives (HUGEINT in DuckDB,
    NUMERIC in PostgreSQL): within a family the rows compare equal, across families they do not."""
    name = data_type.lower().split("(")[0].strip()
    families = {
        "whole or decimal number": ["tinyint", "smallint", "integer", "int", "bigint", "hugeint", "ubigint",
                                    "uinteger", "usmallint", "utinyint", "uhugeint", "numeric", "decimal",
                                    "int2", "int4", "int8", "int128"],
        "floating point": ["real", "float", "double", "double precision", "float4", "float8"],
        "text": ["varchar", "text", "character varying", "string", "character", "char", "bpchar"],
        "date": ["date"],
        "timestamp": ["timestamp", "timestamp without time zone", "datetime"],
        "timestamp with time zone": ["timestamp with time zone", "timestamptz"],
        "boolean": ["boolean", "bool"],
    }
    for family, members in families.items():
        if name in members:
            return family
    return name


def table_summary(columns, rows):
    lines = sorted("\x1f".join(normalized(cell) for cell in row) for row in rows)
    digest = hashlib.sha256("\x1e".join(lines).encode()).hexdigest()[:16]
    return {"columns": columns, "rows": len(lines), "checksum": digest}


def dump(target: str, views) -> None:
    if target.startswith("postgres"):
        import psycopg2

        connection = psycopg2.connect(target)
        cursor = connection.cursor()

        def query(sql):
            cursor.execute(sql)
            return [d[0] for d in cursor.description], cursor.fetchall()

        def types(schema, name):
            cursor.execute(
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
                (schema, name),
            )
            return cursor.fetchall()
    else:
        # The DuckDB sluice links (2.0), installed beside SQLMesh's own in reader/ by
        # scripts/services.sh: it reads both tools' files.
        sys.path.insert(0, str(Path(sys.executable).parent.parent / "reader"))
        import duckdb

        connection = duckdb.connect(target, read_only=True)

        def query(sql):
            result = connection.execute(sql)
            return [d[0] for d in result.description], result.fetchall()

        def types(schema, name):
            return connection.execute(
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
                [schema, name],
            ).fetchall()

    for view in views:
        schema, name = view.split(".")
        try:
            _, rows = query(f'SELECT * FROM "{schema}"."{name}"')
            described = types(schema, name)
            columns = [f"{column} {type_family(data_type)}" for column, data_type in described]
            summary = table_summary(columns, rows)
            exact = ", ".join(f"{column} {data_type}" for column, data_type in described)
            print(f"# {view}: {exact}")
        except Exception as error:  # a missing view is a state to compare, not a crash
            sys.stderr.write(f"{view}: {str(error).splitlines()[0]}\n")
            if target.startswith("postgres"):
                connection.rollback()
            summary = {"missing": True}
        print(json.dumps({"view": view, **summary}, sort_keys=True))


def execute(target: str, sql: str, which: str = "sqlmesh") -> None:
    if which == "reader":
        sys.path.insert(0, str(Path(sys.executable).parent.parent / "reader"))
    import duckdb

    connection = duckdb.connect(target)
    connection.execute(sql)
    connection.close()


if __name__ == "__main__":
    verb, *arguments = sys.argv[1:]
    if verb == "apply":
        apply(*arguments)
    elif verb == "run":
        run(*arguments)
    elif verb == "execute":
        execute(*arguments)
    elif verb == "dump":
        dump(arguments[0], arguments[1:])
    else:
        sys.exit(f"unknown verb {verb}; expected apply, run, execute or dump")
