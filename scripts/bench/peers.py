"""The benchmark job in a peer engine: DMS files -> history and current as Parquet.

    peers.py {duckdb|polars} {csv|parquet} DATA_DIR OUT_DIR
    peers.py pipeline DATA_DIR WAREHOUSE_DIR > pipeline.toml   (cdcflow's pipeline for the data)

The tables are DATA_DIR/tables.json when the data has one (scripts/bench/shape.py),
else those of `cdcflow synth`. Threads: BENCH_THREADS (DuckDB's `threads`);
Polars reads POLARS_MAX_THREADS.

For each table: read the objects in DMS order (LOAD files by number, then CDC
files by the time in their name) with the file name and row number, number
the changes in that order, write every change to <OUT>/<table>_history.parquet,
take the last change per key, drop deleted keys, and write the rest to
<OUT>/<table>.parquet. The same job cdcflow does, in the engine's own idiom.
"""

import json
import os
import re
import sys

SYNTH = {
    "orders": {
        "key": ["id"],
        "columns": [
            ("id", "BIGINT"),
            ("customer", "VARCHAR"),
            ("amount", "DECIMAL(12,2)"),
            ("status", "VARCHAR"),
            ("note", "VARCHAR"),
            ("created_at", "TIMESTAMP"),
        ],
    },
    "order_items": {
        "key": ["order_id", "line_no"],
        "columns": [
            ("order_id", "BIGINT"),
            ("line_no", "INTEGER"),
            ("sku", "VARCHAR"),
            ("qty", "INTEGER"),
            ("price", "DECIMAL(10,2)"),
            ("updated_at", "TIMESTAMP"),
        ],
    },
}


# Where cdcflow declares a type of its own: synth writes created_at with a time zone.
SYNTH_CDCFLOW_TYPES = {("orders", "created_at"): "timestamptz"}


def tables(data_dir):
    """{table: {"key": [...], "columns": [(name, SQL type), ...]}} of a dataset."""
    spec = os.path.join(data_dir, "tables.json")
    if not os.path.exists(spec):
        return SYNTH
    with open(spec) as f:
        return {t: {"key": s["key"], "columns": [tuple(c) for c in s["columns"]]} for t, s in json.load(f).items()}


def pipeline(data_dir, warehouse):
    """A cdcflow pipeline file over the dataset, every table declared."""
    kinds = {"BIGINT": "bigint", "INTEGER": "integer", "VARCHAR": "text", "TIMESTAMP": "timestamp"}
    lines = [
        'name = "bench"',
        "[source]",
        f'url = "file://{data_dir}"',
        'timestamp_column = "dms_timestamp"',
        "[state]",
        f'url = "sqlite://{warehouse}.state.db"',
        "[warehouse]",
        'kind = "local"',
        f'path = "{warehouse}"',
    ]
    for table, spec in tables(data_dir).items():
        columns = ", ".join(
            f'{{ name = "{c}", type = "{SYNTH_CDCFLOW_TYPES.get((table, c)) or kinds.get(t, t.lower())}" }}'
            for c, t in spec["columns"]
        )
        key = ", ".join(f'"{k}"' for k in spec["key"])
        lines += ["[[tables]]", 'schema = "public"', f'name = "{table}"', f"primary_key = [{key}]",
                  f"columns = [{columns}]"]
    print("\n".join(lines))


LOAD = re.compile(r"LOAD(\d{8})\.")
CDC = re.compile(r"(\d{8}-\d{9})\.")


def ordered_objects(data_dir, table, ext):
    """(load files, cdc files) of a table, each in DMS order."""
    root = os.path.join(data_dir, "public", table)
    loads, cdcs = [], []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if not f.endswith(ext):
                continue
            path = os.path.join(dirpath, f)
            if m := LOAD.search(f):
                loads.append((int(m.group(1)), path))
            elif m := CDC.search(f):
                cdcs.append((m.group(1), path))
    return [p for _, p in sorted(loads)], [p for _, p in sorted(cdcs)]


def run_duckdb(fmt, data_dir, out_dir):
    import duckdb

    con = duckdb.connect()
    con.execute("SET preserve_insertion_order = true")
    if threads := os.environ.get("BENCH_THREADS"):
        con.execute(f"SET threads = {int(threads)}")
    for table, spec in tables(data_dir).items():
        cols = spec["columns"]
        key = ", ".join(spec["key"])
        names = ", ".join(c for c, _ in cols)
        parts = []
        for cdc, files in zip((False, True), ordered_objects(data_dir, table, "." + fmt)):
            if not files:
                continue
            file_list = "[" + ", ".join(f"'{f}'" for f in files) + "]"
            op = "op" if cdc else "'I'"
            if fmt == "csv":
                schema = ([("op", "VARCHAR")] if cdc else []) + [("ts", "VARCHAR")] + cols
                types = "{" + ", ".join(f"'{c}': '{t}'" for c, t in schema) + "}"
                scan = (
                    f"read_csv({file_list}, header = false, columns = {types}, "
                    f"quote = '\"', escape = '\"', nullstr = '', allow_quoted_nulls = false, filename = true)"
                )
                row = "row_number() OVER ()"
                ts = "ts"
            else:
                scan = f"read_parquet({file_list}, filename = true, file_row_number = true)"
                row = "row_number() OVER ()"
                ts = "dms_timestamp"
                op = "Op" if cdc else "'I'"
            parts.append(
                f"SELECT {names}, {op} AS op, CAST({ts} AS TIMESTAMP) AS commit_ts, "
                f"filename AS source_file, {int(cdc)} AS cls, {row} AS n FROM {scan}"
            )
        con.execute(
            f"CREATE TEMP TABLE h AS SELECT * EXCLUDE (cls, n), "
            f"row_number() OVER (ORDER BY cls, n) AS seq FROM ({' UNION ALL '.join(parts)})"
        )
        con.execute(f"COPY h TO '{out_dir}/{table}_history.parquet' (FORMAT parquet)")
        con.execute(
            f"COPY (SELECT {names}, commit_ts, seq FROM h "
            f"QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY seq DESC) = 1 AND op <> 'D') "
            f"TO '{out_dir}/{table}.parquet' (FORMAT parquet)"
        )
        con.execute("DROP TABLE h")


def run_polars(fmt, data_dir, out_dir):
    import polars as pl

    def polars_type(sql):
        if sql.startswith("DECIMAL("):
            return pl.Decimal(*map(int, sql[8:-1].split(",")))
        # TIMESTAMP is parsed after the read, as DMS writes text.
        return {"BIGINT": pl.Int64, "INTEGER": pl.Int32, "VARCHAR": pl.Utf8, "TIMESTAMP": pl.Utf8}[sql]

    for table, spec in tables(data_dir).items():
        cols = spec["columns"]
        names = [c for c, _ in cols]
        frames = []
        for cdc, files in zip((False, True), ordered_objects(data_dir, table, "." + fmt)):
            if not files:
                continue
            if fmt == "csv":
                schema = {"op": pl.Utf8} if cdc else {}
                schema["ts"] = pl.Utf8
                schema.update({c: polars_type(t) for c, t in cols})
                lf = pl.scan_csv(
                    files,
                    has_header=False,
                    schema=schema,
                    quote_char='"',
                    include_file_paths="source_file",
                )
                ts = pl.col("ts")
            else:
                lf = pl.scan_parquet(files, include_file_paths="source_file").rename(
                    {"Op": "op"} if cdc else {}
                )
                ts = pl.col("dms_timestamp")
            op = pl.col("op") if cdc else pl.lit("I")
            frames.append(
                lf.select(
                    *[pl.col(c) for c in names],
                    op.alias("op"),
                    ts.str.to_datetime("%Y-%m-%d %H:%M:%S%.f", time_unit="us").alias("commit_ts"),
                    pl.col("source_file"),
                )
            )
        history = pl.concat(frames).with_row_index("seq")
        for c, t in cols:
            if t == "TIMESTAMP" and fmt == "csv":
                history = history.with_columns(
                    pl.col(c).str.to_datetime("%Y-%m-%d %H:%M:%S%.f", time_unit="us")
                )
        history = history.collect()
        history.write_parquet(f"{out_dir}/{table}_history.parquet")
        current = (
            history.lazy()
            .group_by(spec["key"])
            .agg(pl.all().sort_by("seq").last())
            .filter(pl.col("op") != "D")
            .select(*names, "commit_ts", "seq")
            .collect()
        )
        current.write_parquet(f"{out_dir}/{table}.parquet")


if __name__ == "__main__":
    if sys.argv[1] == "pipeline":
        pipeline(*sys.argv[2:4])
        sys.exit(0)
    engine, fmt, data_dir, out_dir = sys.argv[1:5]
    os.makedirs(out_dir, exist_ok=True)
    {"duckdb": run_duckdb, "polars": run_polars}[engine](fmt, data_dir, out_dir)
