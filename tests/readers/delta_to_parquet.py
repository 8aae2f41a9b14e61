"""A second Delta reader for the tests: delta-rs's Python package (its own
release, log reader, S3 client and query engine, which applies deletion
vectors) reads a Delta table and writes the columns asked for, sorted by the
key, to a local Parquet file that the test compares with its replay.

usage: delta_to_parquet.py TABLE_URI OUT.parquet COLUMNS KEY
  COLUMNS, KEY: comma-separated column names.
  Storage options (endpoint, keys) come from the environment (AWS_*).
"""

import os
import sys

import deltalake
import pyarrow
import pyarrow.parquet as pq

uri, out, columns, key = sys.argv[1:5]
options = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
table = deltalake.DeltaTable(uri, storage_options=options)
quoted = lambda names: ", ".join(f'"{n}"' for n in names.split(","))
query = f"SELECT {quoted(columns)} FROM t ORDER BY {quoted(key)}"
rows = pyarrow.table(deltalake.QueryBuilder().register("t", table).execute(query))
pq.write_table(rows, out)
print(f"{uri}: version {table.version()}, {rows.num_rows} rows")
