"""Checks that every engine wrote the same tables, then writes BENCH.md.

    report.py {check|delta|write} RESULTS_TSV CDCFLOW_BIN OUT_DIR BENCH_MD

`delta` reads cdcflow's current-state tables with another Delta reader (the
deltalake Python package, which applies deletion vectors) after the extra
objects (they replay changes already loaded, so the state must not move) and
compares them with DuckDB's.

RESULTS_TSV has one line per measured run:
    engine  format  changes  seconds  peak_rss_kib  output
where output is a cdcflow pipeline file (engine cdcflow*) or a directory of
Parquet files written by peers.py. Tables are compared by fingerprints
(row counts, ops, sums over every column) computed in each engine's SQL.
"""

import json
import os
import platform
import subprocess
import sys

import duckdb

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import tables  # noqa: E402  (the datasets' tables, shared with the peers)

ENGINES = ("cdcflow", "duckdb", "polars")
SHAPES = {
    "synth": "`cdcflow synth`: orders (6 columns, hot keys, bursts across objects, delete and re-insert) and\n"
    "order_items (two-column key); headerless CSV (a third of the CDC objects gzipped) or Parquet.",
    "wide": "scripts/bench/shape.py, a generator cdcflow does not share: accounts (14 columns, text of up to\n"
    "2,000 characters with commas, quotes and line breaks, no hot keys) and ledger_lines (three-column\n"
    "key, mostly inserts); small objects and one of about 1 GiB (CSV) in the middle of accounts' changes.",
}


def fingerprint_sql(spec, source, history, dialect):
    """Row count, op counts and sums over every column of a table, by column type."""
    # Integer division is `//` in DuckDB and `/` on integers in DataFusion.
    if dialect == "duckdb":
        micros, div = (lambda c: f"epoch_us({c})"), "//"
    else:
        micros, div = (lambda c: f"CAST({c} AS BIGINT)"), "/"
    parts = ["count(*) AS n"]
    for c, t in spec["columns"]:
        if t in ("BIGINT", "INTEGER"):
            parts.append(f"sum({c}) AS s_{c}")
        elif t.startswith("DECIMAL("):
            scale = int(t[8:-1].split(",")[1])
            parts.append(f"sum(CAST({c} * {10 ** scale} AS BIGINT)) AS s_{c}")
        elif t == "VARCHAR":
            parts += [f"count({c}) AS c_{c}", f"sum(length({c})) AS l_{c}"]
    for c in [c for c, t in spec["columns"] if t == "TIMESTAMP"] + ["commit_ts"]:
        parts += [
            f"sum({micros(c)} {div} 1000000) AS s_{c}",
            f"sum({micros(c)} % 1000000) AS f_{c}",
        ]
    if history:
        parts += [f"sum(CASE WHEN op = '{o}' THEN 1 ELSE 0 END) AS op_{o.lower()}" for o in "IUD"]
    return f"SELECT {', '.join(parts)} FROM {source}"


def cdcflow_fingerprints(binary, pipeline, specs):
    out = {}
    for table, spec in specs.items():
        for history in (False, True):
            name = f"{table}_history" if history else table
            sql = fingerprint_sql(spec, name, history, "datafusion")
            text = subprocess.run(
                [binary, "query", "-p", pipeline, "-f", "json", sql],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            out[name] = {k: str(int(v)) for k, v in json.loads(text).items()}
    return out


def peer_fingerprints(directory, specs):
    con = duckdb.connect()
    out = {}
    for table, spec in specs.items():
        for history in (False, True):
            name = f"{table}_history" if history else table
            source = f"read_parquet('{directory}/{name}.parquet')"
            row = con.execute(fingerprint_sql(spec, source, history, "duckdb")).fetchone()
            cols = [d[0] for d in con.description]
            out[name] = {k: str(int(v)) for k, v in zip(cols, row)}
    return out


def data_dir(out_dir, shape, fmt):
    return os.path.join(out_dir, f"data-{shape}-{fmt}")


def run_of(runs, engine, shape, fmt, cores):
    return next(r for r in runs if (r["engine"], r["shape"], r["format"], r["cores"]) == (engine, shape, fmt, cores))


def delta_check(runs, out_dir):
    """cdcflow's current tables of the synth shape (its run on the most cores, which
    the extra objects went into) read by deltalake, against DuckDB's of the same run."""
    import deltalake
    import polars

    problems = []
    for fmt in sorted({r["format"] for r in runs if r["engine"] == "cdcflow" and r["shape"] == "synth"}):
        cores = max(r["cores"] for r in runs if r["engine"] == "cdcflow" and r["shape"] == "synth")
        specs = tables(data_dir(out_dir, "synth", fmt))
        expected = peer_fingerprints(run_of(runs, "duckdb", "synth", fmt, cores)["output"], specs)
        warehouse = run_of(runs, "cdcflow", "synth", fmt, cores)["output"][: -len(".toml")]
        con = duckdb.connect()
        for table, spec in specs.items():
            # polars.read_delta reads through deltalake; DuckDB computes the fingerprint.
            copy = os.path.join(out_dir, f"delta-read-{fmt}-{table}.parquet")
            polars.read_delta(os.path.join(warehouse, table)).write_parquet(copy)
            source = f"read_parquet('{copy}')"
            row = con.execute(fingerprint_sql(spec, source, False, "duckdb")).fetchone()
            os.remove(copy)
            cols = [d[0] for d in con.description]
            got = {k: str(int(v)) for k, v in zip(cols, row)}
            if got != expected[table]:
                problems.append(f"{fmt}: {table} read by deltalake {got} != DuckDB {expected[table]}")
    if problems:
        print("CURRENT TABLES DIFFER:\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(1)
    print(f"deltalake {deltalake.__version__} reads the same current tables as DuckDB wrote")


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // (1024 * 1024)
    return f"{os.cpu_count()} cores ({cpu}), {mem} GiB RAM, {platform.system()} {platform.release()}"


def main():
    action, results_tsv, binary, out_dir, bench_md = sys.argv[1:6]
    runs = []
    with open(results_tsv) as f:
        for line in f:
            engine, fmt, changes, seconds, rss, output, *rest = line.rstrip("\n").split("\t")
            shape, cores = rest if rest else ("synth", str(os.cpu_count()))
            runs.append(
                dict(engine=engine, format=fmt, changes=int(changes), seconds=float(seconds),
                     rss_mib=int(rss) / 1024, output=output, shape=shape, cores=int(cores))
            )

    if action == "write":
        write(runs, binary, out_dir, bench_md)
        return
    if action == "delta":
        delta_check(runs, out_dir)
        return
    # Every engine's tables must hold the same rows (per shape and format, every core count).
    problems = []
    for shape, fmt in sorted({(r["shape"], r["format"]) for r in runs if r["engine"] == "cdcflow"}):
        specs = tables(data_dir(out_dir, shape, fmt))
        full = [r for r in runs if (r["shape"], r["format"]) == (shape, fmt) and r["engine"] in ENGINES]
        reference = None
        for r in sorted(full, key=lambda r: r["engine"] != "cdcflow"):
            label = f"{shape} {fmt}: {r['engine']} on {r['cores']} cores"
            if r["engine"] == "cdcflow":
                fp = cdcflow_fingerprints(binary, r["output"], specs)
            else:
                fp = peer_fingerprints(r["output"], specs)
            reference = reference or (label, fp)
            for name in fp:
                if fp[name] != reference[1][name]:
                    problems.append(f"{label} {name} {fp[name]} != {reference[0]} {reference[1][name]}")
    if problems:
        print("OUTPUTS DIFFER:\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(1)
    print("all engines wrote the same tables")


def write(runs, binary, out_dir, bench_md):
    import polars

    previous = open(bench_md).read().splitlines() if os.path.exists(bench_md) else []
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Benchmark: DMS files → history and current tables",
        "",
        "Written by `make bench` (scripts/bench.sh); rerun it to refresh. Every engine reads the same files",
        "in DMS order with file name and row number, takes the last change per key, drops deleted keys, and",
        "writes history and current. cdcflow writes Delta Lake tables (and does its exactly-once bookkeeping);",
        "DuckDB and Polars write Parquet. All outputs were checked to hold the same rows (row counts, op counts",
        "and sums over every column) before this file was written.",
        "",
        "Each engine runs pinned to N cores (`taskset`) and told so: cdcflow `--threads N`, DuckDB",
        "`SET threads = N`, Polars `POLARS_MAX_THREADS=N`. `time / fastest peer` compares with the faster of",
        "DuckDB and Polars on the same cores.",
        "",
        f"* machine: {machine()}",
        f"* versions: {version} (git {rev}, release build), DuckDB {duckdb.__version__}, Polars {polars.__version__}",
        "* time is wall clock of the whole process (start-up included); peak RSS from /usr/bin/time",
        "",
    ]
    keys = sorted({(r["shape"], r["format"]) for r in runs if r["engine"] == "cdcflow" and r["shape"] in SHAPES},
                  key=lambda k: (k[0] != "synth", k))
    all_cores = sorted({r["cores"] for r in runs if r["engine"] == "cdcflow" and r["shape"] in SHAPES})
    lines += [
        "## cdcflow's time / the fastest peer's, by cores",
        "",
        "| shape | format | " + " | ".join(f"{c} core{'s' if c > 1 else ''}" for c in all_cores) + " |",
        "|---|---|" + "---:|" * len(all_cores),
    ]
    for shape, fmt in keys:
        cells = []
        for cores in all_cores:
            here = [r for r in runs if (r["shape"], r["format"], r["cores"]) == (shape, fmt, cores)
                    and r["engine"] in ENGINES]
            ours = [r for r in here if r["engine"] == "cdcflow"]
            peers = [r for r in here if r["engine"] != "cdcflow"]
            cells.append(f"{ours[0]['seconds'] / min(p['seconds'] for p in peers):.2f}" if ours and peers else "–")
        lines.append(f"| {shape} | {fmt} | " + " | ".join(cells) + " |")
    lines.append("")
    for shape, fmt in keys:
        full = [r for r in runs if (r["shape"], r["format"]) == (shape, fmt) and r["engine"] in ENGINES]
        changes = full[0]["changes"]
        data = data_dir(out_dir, shape, fmt)
        sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(data) for f in fs
                 if f.endswith(("." + fmt, "." + fmt + ".gz"))]
        heading = f"## {shape} shape, {fmt.upper()}: "
        if sizes:
            heading += (
                f"{changes:,} changes in {len(sizes):,} objects "
                f"({sum(sizes) / 2**20:,.0f} MiB, the largest {max(sizes) / 2**20:,.0f} MiB), "
                f"tables {', '.join(tables(data))}"
            )
        else:
            # The data of a run kept from before is gone: its heading as written then.
            heading = next((l for l in previous if l.startswith(heading)), heading + f"{changes:,} changes")
        lines += [
            heading,
            "",
            SHAPES[shape],
            "",
            "| cores | engine | seconds | changes/s | peak RSS (MiB) | time / fastest peer |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        for cores in sorted({r["cores"] for r in full}):
            here = [r for r in full if r["cores"] == cores]
            fastest = min((r for r in here if r["engine"] != "cdcflow"), key=lambda r: r["seconds"])
            for r in sorted(here, key=lambda r: ENGINES.index(r["engine"])):
                ratio = r["seconds"] / fastest["seconds"]
                lines.append(
                    f"| {cores} | {r['engine']} | {r['seconds']:.2f} | {changes / r['seconds']:,.0f} | "
                    f"{r['rss_mib']:,.0f} | {ratio:.2f} |"
                )
        lines.append("")
    for fmt, peer, title, how in [
        ("pgoutput", "pg_recvlogical", "PostgreSQL (pgoutput, 1000 rows per transaction)",
         "Both read the same WAL from their own slot, made before the changes. pg_recvlogical writes the\n"
         "raw stream to a file; cdcflow capture decodes it and writes Parquet objects (and its checkpoint)."),
        ("binlog", "mariadb-binlog", "MariaDB (row binlog, 1000 rows per transaction)",
         "Both read the same binlog from the same position. mariadb-binlog decodes the rows\n"
         "(--base64-output=DECODE-ROWS -v) to /dev/null; cdcflow capture writes Parquet objects."),
        ("pgcopy", "psql \\copy", "a PostgreSQL full load (pgbench_accounts)",
         "One large table. `psql \\copy pgbench_accounts TO '/dev/null'` is the server's own export of it;\n"
         "cdcflow capture (mode full-load) copies it under an exported snapshot in binary COPY, in key ranges\n"
         "side by side (`parallel_load`), and writes Parquet LOAD objects. Changes here are rows."),
        ("mydump", "mariadb-dump", "a MariaDB full load (accounts, pgbench's shape)",
         "One large table. `mariadb-dump --single-transaction` of it to /dev/null is the server's own\n"
         "export; cdcflow capture (mode full-load) reads it in one consistent snapshot and writes Parquet\n"
         "LOAD objects. Changes here are rows."),
    ]:
        capture = [r for r in runs if r["format"] == fmt]
        base = next((r for r in capture if r["engine"] == peer), None)
        if not base:
            continue
        lines += [
            f"## Capture from {title}: {base['changes']:,} changes",
            "",
            how,
            "",
            f"| reader | seconds | changes/s | peak RSS (MiB) | changes/s vs {peer} |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in capture:
            lines.append(
                f"| {r['engine']} | {r['seconds']:.2f} | {r['changes'] / r['seconds']:,.0f} | "
                f"{r['rss_mib']:,.0f} | {base['seconds'] / r['seconds']:.2f} |"
            )
        lines.append("")
    extra = [r for r in runs if r["engine"] not in ("cdcflow", "duckdb", "polars")
             and r["format"] not in ("pgoutput", "binlog", "pgcopy", "mydump")]
    if extra:
        lines += [
            "## cdcflow: memory and incremental cost",
            "",
            "`+1 object`: one more CDC object (the newest ~50k changes of `orders` replayed) into the",
            "warehouse the run above left. cdcflow applies it to the current table by Delta deletion vectors",
            "plus one appended file, so its cost tracks the object, not the table. `+10 objects, a run each`:",
            "ten more such objects, one `cdcflow run` (process start included) per object, in all; the",
            "deletion vectors grow until marked rows are a quarter of the table, and then one batch rewrites",
            "the files. Afterwards the current tables, read by Polars through the deltalake Python package,",
            "still equal DuckDB's.",
            "",
            "| run | format | changes | seconds | peak RSS (MiB) |",
            "|---|---|---:|---:|---:|",
        ]
        for r in extra:
            lines.append(
                f"| {r['engine']} | {r['format']} | {r['changes']:,} | {r['seconds']:.2f} | {r['rss_mib']:,.0f} |"
            )
        lines.append("")
    with open(bench_md, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
