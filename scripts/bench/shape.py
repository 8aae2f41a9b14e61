"""A second benchmark dataset, made by a generator cdcflow does not share.

    shape.py {csv|parquet} CHANGES SEED OUT_DIR

Unlike `cdcflow synth`: wide rows with long text (commas, quotes and line
breaks inside quoted fields), many more distinct keys and no hot ones, a
table with a three-column key, and uneven objects: one object of about
BENCH_BIG_OBJECT_MB (default 1024) MiB of CSV among small ones. A quarter of
the changes go to `accounts` (14 columns), the rest to `ledger_lines`.
Writes DMS-layout objects under OUT_DIR/public/<table>/ and the tables' spec
as OUT_DIR/tables.json (read by peers.py, report.py and bench.sh).
"""

import datetime as dt
import json
import os
import sys

import numpy as np
import polars as pl

TABLES = {
    "accounts": {
        "key": ["id"],
        "columns": [
            ["id", "BIGINT"],
            ["region", "VARCHAR"],
            ["email", "VARCHAR"],
            ["display_name", "VARCHAR"],
            ["bio", "VARCHAR"],
            ["address", "VARCHAR"],
            ["balance", "DECIMAL(18,4)"],
            ["credit_limit", "DECIMAL(12,2)"],
            ["visits", "INTEGER"],
            ["plan", "VARCHAR"],
            ["tags", "VARCHAR"],
            ["flags", "INTEGER"],
            ["created_at", "TIMESTAMP"],
            ["updated_at", "TIMESTAMP"],
        ],
    },
    "ledger_lines": {
        "key": ["tenant_id", "account_id", "line_no"],
        "columns": [
            ["tenant_id", "BIGINT"],
            ["account_id", "BIGINT"],
            ["line_no", "INTEGER"],
            ["amount", "DECIMAL(14,2)"],
            ["currency", "VARCHAR"],
            ["memo", "VARCHAR"],
            ["posted_at", "TIMESTAMP"],
        ],
    },
}

START = dt.datetime(2024, 6, 1)
WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda omicron sigma tau "
         "upsilon phi chi psi omega north south east west river stone harbor market "
         "ledger account balance review pending settled refund invoice shipment").split()


def text_pool(rng, size):
    """A long text of words, with commas, quotes and (rarely) line breaks."""
    words = rng.choice(WORDS, size // 6)
    seps = rng.choice([" ", " ", " ", " ", ", ", ' "', '" ', "\n"], len(words),
                      p=[0.55, 0.15, 0.1, 0.05, 0.08, 0.03, 0.03, 0.01])
    return "".join(w + s for w, s in zip(words.tolist(), seps.tolist()))


def slices(rng, pool, n, low, high):
    """n texts of low..high characters cut from pool, none empty after stripping."""
    lengths = rng.integers(low, high, n)
    starts = rng.integers(0, len(pool) - high, n)
    return [("x" + pool[s:s + l]).rstrip() for s, l in zip(starts.tolist(), lengths.tolist())]


def ops_and_keys(rng, n, load_share, shares):
    """(op, key) per change: a full load of fresh keys, then inserts of new keys
    and updates and deletes of uniformly chosen earlier keys."""
    load = int(n * load_share)
    ops = np.full(n, "I", dtype=object)
    cdc = rng.choice(["I", "U", "D"], n - load, p=shares)
    ops[load:] = cdc
    fresh = np.cumsum(ops == "I") - 1  # the key an insert creates
    keys = fresh.copy()
    old = ops != "I"
    # An update or delete picks a key inserted before it (a delete may be
    # re-inserted later by chance: "I" on a deleted key is a fresh key here,
    # but "U" after "D" revives a key, as replays do).
    keys[old] = (rng.random(old.sum()) * np.maximum(fresh[old], 1)).astype(np.int64)
    return load, ops, keys


def accounts(rng, n):
    load, ops, keys = ops_and_keys(rng, n, 0.3, [0.25, 0.6, 0.15])
    pool = text_pool(rng, 8 << 20)
    regions = np.array(["eu-west-1", "us-east-1", "ap-south-1", "sa-east-1", "me-central-1"])
    plans = np.array(["free", "team", "business", "enterprise"])
    created = START - dt.timedelta(days=900)
    frame = pl.DataFrame({
        "id": keys + 1,
        "region": regions[rng.integers(0, len(regions), n)],
        "email": [f"user{k}.{v}@example.{d}" for k, v, d in zip(
            keys.tolist(), rng.integers(0, 99, n).tolist(), rng.choice(["com", "org", "net"], n).tolist())],
        "display_name": slices(rng, pool, n, 8, 40),
        "bio": slices(rng, pool, n, 200, 2000),
        "address": slices(rng, pool, n, 30, 120),
        "balance": [f"{v / 10000:.4f}" for v in rng.integers(-10**9, 10**12, n).tolist()],
        "credit_limit": [f"{v / 100:.2f}" for v in rng.integers(0, 10**9, n).tolist()],
        "visits": rng.integers(0, 2**31 - 1, n).astype(np.int32),
        "plan": plans[rng.integers(0, len(plans), n)],
        "tags": [None if r < 0.2 else t for r, t in zip(rng.random(n).tolist(), slices(rng, pool, n, 5, 60))],
        "flags": rng.integers(-1000, 1000, n).astype(np.int32),
        "created_at": [created + dt.timedelta(microseconds=int(u)) for u in rng.integers(0, 900 * 86400 * 10**6, n)],
        "updated_at": [START + dt.timedelta(microseconds=int(u)) for u in rng.integers(0, 30 * 86400 * 10**6, n)],
    })
    return load, ops, frame


def ledger_lines(rng, n):
    load, ops, keys = ops_and_keys(rng, n, 0.2, [0.8, 0.15, 0.05])
    pool = text_pool(rng, 2 << 20)
    frame = pl.DataFrame({
        "tenant_id": keys % 997 + 1,
        "account_id": (keys // 997) % 100_003 + 1,
        "line_no": (keys // (997 * 100_003) + 1).astype(np.int32),
        "amount": [f"{v / 100:.2f}" for v in rng.integers(-10**10, 10**10, n).tolist()],
        "currency": np.array(["EUR", "USD", "JPY", "GBP", "BRL"])[rng.integers(0, 5, n)],
        "memo": slices(rng, pool, n, 10, 160),
        "posted_at": [START + dt.timedelta(microseconds=int(u)) for u in rng.integers(0, 30 * 86400 * 10**6, n)],
    })
    return load, ops, frame


def objects(n_load, n, big_rows, rows_per_object):
    """(start, end) row ranges: load files, then small CDC objects with one
    object of big_rows rows in the middle of the CDC changes."""
    ranges = [(s, min(s + 500_000, n_load)) for s in range(0, n_load, 500_000)]
    cdc = n - n_load
    big_at = n_load + cdc // 2 if big_rows else None
    s = n_load
    while s < n:
        size = big_rows if s == big_at else int(rows_per_object)
        if big_at is not None and s < big_at < s + size:
            size = big_at - s
        ranges.append((s, min(s + size, n)))
        s += size
    return ranges


def write(fmt, frame, ops, n_load, ranges, table, out_dir, spec):
    root = os.path.join(out_dir, "public", table)
    names = [c for c, _ in spec["columns"]]
    types = dict(spec["columns"])
    # Change i happens at START + i ms (plus some µs); a CDC object is named
    # after its last change, in ms, one ms later than the object before at least.
    micros = np.arange(len(ops), dtype=np.int64) * 1000 + (np.arange(len(ops)) * 7919) % 1000
    stamps = [(START + dt.timedelta(microseconds=int(m))) for m in micros.tolist()]
    ts = pl.Series("dms_timestamp", stamps, dtype=pl.Datetime("us")).dt.strftime("%Y-%m-%d %H:%M:%S%.6f")
    typed = frame.with_columns(
        [pl.col(c).cast(pl.Decimal(*map(int, t[8:-1].split(",")))) for c, t in types.items() if t.startswith("DECIMAL")]
    )
    last_name = ""
    for i, (s, e) in enumerate(ranges):
        part = typed.slice(s, e - s)
        is_load = s < n_load
        head = {"dms_timestamp": ts.slice(s, e - s)}
        if not is_load:
            head = {"Op": pl.Series("Op", ops[s:e].tolist(), dtype=pl.Utf8), **head}
        part = pl.DataFrame(head).hstack(part.select(names))
        if is_load:
            path = os.path.join(root, f"LOAD{i + 1:08}.{fmt}")
        else:
            name = stamps[e - 1].strftime("%Y%m%d-%H%M%S") + f"{stamps[e - 1].microsecond // 1000:03}"
            if name <= last_name:
                bumped = dt.datetime.strptime(last_name, "%Y%m%d-%H%M%S%f") + dt.timedelta(milliseconds=1)
                name = bumped.strftime("%Y%m%d-%H%M%S") + f"{bumped.microsecond // 1000:03}"
            last_name = name
            path = os.path.join(root, name[:4], name[4:6], name[6:8], f"{name}.{fmt}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if fmt == "csv":
            part.write_csv(path, include_header=False, datetime_format="%Y-%m-%d %H:%M:%S%.6f",
                           quote_style="necessary", null_value="")
        else:
            part.write_parquet(path, compression="uncompressed", row_group_size=100_000)


def main():
    fmt, changes, seed, out_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    big_mb = int(os.environ.get("BENCH_BIG_OBJECT_MB", "1024"))
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    for table, make, share in (("accounts", accounts, 0.25), ("ledger_lines", ledger_lines, 0.75)):
        n = int(changes * share)
        n_load, ops, frame = make(rng, n)
        spec = TABLES[table]
        if table == "accounts":
            # About 1.2 KB of CSV per row: the big object holds big_mb MiB, at most
            # 40 % of the CDC changes (a smaller run scales it down).
            big = min(int(big_mb * 2**20 / 1200), int((n - n_load) * 0.4))
            ranges = objects(n_load, n, big, 3_000)
        else:
            ranges = objects(n_load, n, 0, 40_000)
        write(fmt, frame, ops, n_load, ranges, table, out_dir, spec)
        print(f"{table}: {n:,} changes in {len(ranges):,} objects")
    with open(os.path.join(out_dir, "tables.json"), "w") as f:
        json.dump(TABLES, f, indent=1)


if __name__ == "__main__":
    main()
