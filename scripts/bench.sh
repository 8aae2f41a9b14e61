#!/usr/bin/env bash
# The benchmark (`make bench`): cdcflow against DuckDB and Polars on the same DMS files.
#   BENCH_ROWS=10000000 (changes in all, split over two tables; BENCH_ROWS=1000000 for a quick look)
#   BENCH_FORMATS="csv parquet"
#   BENCH_PARTS="pipeline capture" (capture: scripts/bench/capture.sh, CAPTURE_ROWS=1000000; it
#   starts the PostgreSQL peer). A run of some parts keeps the other parts' last results.
# Writes bench-out/ (data, outputs, results.tsv) and BENCH.md. Never part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${BENCH_ROWS:-10000000}"
FORMATS="${BENCH_FORMATS:-csv parquet}"
SEED=20241122
OUT="$PWD/bench-out"
VENV="${PEERS_DIR:-$PWD/.peers}/venv-bench"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time; }
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import duckdb, polars, deltalake' 2>/dev/null; then
  python3 -m venv "$VENV"
  # deltalake: a second Delta reader, to check cdcflow's tables (it must apply deletion vectors).
  "$VENV/bin/pip" install -q --disable-pip-version-check duckdb==1.5.6 polars==1.44.2 deltalake==1.6.6
fi
cargo build --release --quiet
BIN="$CARGO_TARGET_DIR/release/cdcflow"
mkdir -p "$OUT"
RESULTS="$OUT/results.tsv"
PARTS="${BENCH_PARTS:-pipeline capture}"
# Keep the last results of the parts not run now (capture rows have format pgoutput or binlog).
touch "$RESULTS"
case " $PARTS " in
  *" pipeline "*" capture "*|*" capture "*" pipeline "*) : >"$RESULTS" ;;
  *" pipeline "*) grep -P '\t(pgoutput|binlog)\t' "$RESULTS" >"$RESULTS.keep" || true; mv "$RESULTS.keep" "$RESULTS" ;;
  *" capture "*) grep -vP '\t(pgoutput|binlog)\t' "$RESULTS" >"$RESULTS.keep" || true; mv "$RESULTS.keep" "$RESULTS" ;;
esac

# measure NAME FORMAT CHANGES OUTPUT CMD...: wall seconds and peak RSS of CMD, appended to results.tsv.
measure() {
  local name=$1 fmt=$2 changes=$3 output=$4; shift 4
  sync
  local log="$OUT/${name//[^a-z0-9]/_}-$fmt.log"
  /usr/bin/time -f "%e %M" -o "$OUT/time.txt" "$@" >"$log" 2>&1 || {
    echo "bench: $name ($fmt) failed; see $log" >&2; tail -20 "$log" >&2; exit 1; }
  read -r secs rss <"$OUT/time.txt"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$fmt" "$changes" "$secs" "$rss" "$output" >>"$RESULTS"
  printf '  %-26s %-8s %10s changes %8ss %8s KiB\n' "$name" "$fmt" "$changes" "$secs" "$rss"
}

# pipeline FILE DATA WAREHOUSE: a cdcflow pipeline over DATA (both tables declared).
pipeline() {
  cat >"$1" <<TOML
name = "bench"
[source]
url = "file://$2"
timestamp_column = "dms_timestamp"
[state]
url = "sqlite://$3.state.db"
[warehouse]
kind = "local"
path = "$3"
[[tables]]
schema = "public"
name = "orders"
primary_key = ["id"]
columns = [
  { name = "id", type = "bigint" }, { name = "customer", type = "text" },
  { name = "amount", type = "decimal(12,2)" }, { name = "status", type = "text" },
  { name = "note", type = "text" }, { name = "created_at", type = "timestamptz" },
]
[[tables]]
schema = "public"
name = "order_items"
primary_key = ["order_id", "line_no"]
columns = [
  { name = "order_id", type = "bigint" }, { name = "line_no", type = "integer" },
  { name = "sku", type = "text" }, { name = "qty", type = "integer" },
  { name = "price", type = "decimal(10,2)" }, { name = "updated_at", type = "timestamp" },
]
TOML
}

# add_cdc DATA EXT: a new CDC object of about 50,000 changes (the newest CDC objects of
# orders replayed into one file named after them); prints its change count.
add_cdc() {
  "$VENV/bin/python" - "$1" "$2" <<'PY'
import os, sys, re
data, ext = sys.argv[1], sys.argv[2]
root = os.path.join(data, "public", "orders")
cdc = sorted((f, os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs
             if re.match(r"\d{8}-\d{9}\.", f) and f.endswith(ext))
picked = cdc[-10:]
target = os.path.join(root, "2099", "01", "01", "20990101-000000000" + ext)
os.makedirs(os.path.dirname(target), exist_ok=True)
if ext == ".csv":
    with open(target, "wb") as out:
        for _, path in picked:
            out.write(open(path, "rb").read())
else:
    import polars as pl
    pl.concat([pl.read_parquet(p) for _, p in picked]).write_parquet(
        target, compression="uncompressed", row_group_size=10_000)
import polars as pl
n = (pl.read_parquet(target).height if ext == ".parquet" else
     sum(1 for _ in open(target, newline="")) )
print(n)
PY
}

if [[ " $PARTS " == *" pipeline "* ]]; then
for fmt in $FORMATS; do
  data="$OUT/data-$fmt"
  rm -rf "$data"
  echo "generating $ROWS changes ($fmt)…"
  "$BIN" synth --changes $((ROWS / 2)) --seed $SEED --format "$fmt" --out "$data" >/dev/null
  for engine in duckdb polars; do
    rm -rf "$OUT/$engine-$fmt"
    measure "$engine" "$fmt" "$ROWS" "$OUT/$engine-$fmt" \
      "$VENV/bin/python" scripts/bench/peers.py "$engine" "$fmt" "$data" "$OUT/$engine-$fmt"
  done
  rm -rf "$OUT/cdcflow-$fmt" "$OUT/cdcflow-$fmt.state.db"*
  pipeline "$OUT/cdcflow-$fmt.toml" "$data" "$OUT/cdcflow-$fmt"
  measure cdcflow "$fmt" "$ROWS" "$OUT/cdcflow-$fmt.toml" "$BIN" run --now -p "$OUT/cdcflow-$fmt.toml"
done

# Every engine must have written the same tables before anything is reported.
"$VENV/bin/python" scripts/bench/report.py check "$RESULTS" "$BIN" "$OUT" BENCH.md

for fmt in $FORMATS; do
  # One more CDC object into the full warehouse: its cost must track the new data.
  n=$(add_cdc "$OUT/data-$fmt" ".$fmt")
  measure "cdcflow +1 object" "$fmt" "$n" "$OUT/cdcflow-$fmt.toml" "$BIN" run --now -p "$OUT/cdcflow-$fmt.toml"
  # Ten more, a run each: deletion vectors accumulate until a rewrite drops their rows.
  measure "cdcflow +10 objects, a run each" "$fmt" $((n * 10)) "$OUT/cdcflow-$fmt.toml" bash -c '
    object=$1; shift
    for day in 02 03 04 05 06 07 08 09 10 11; do
      mkdir -p "${object%/01/01/*}/01/$day"
      cp "$object" "${object%/01/01/*}/01/$day/209901$day-000000000.${object##*.}"
      "$@" || exit 1
    done' _ "$OUT/data-$fmt/public/orders/2099/01/01/20990101-000000000.$fmt" \
    "$BIN" run --now -p "$OUT/cdcflow-$fmt.toml"
  # The same at a tenth of the size: memory, and the incremental cost on a smaller table.
  small="$OUT/small-$fmt"
  rm -rf "$small"
  "$BIN" synth --changes $((ROWS / 20)) --seed $SEED --format "$fmt" --out "$small/data" >/dev/null
  pipeline "$small/p.toml" "$small/data" "$small/wh"
  measure "cdcflow (1/10 size)" "$fmt" $((ROWS / 10)) "$small/p.toml" "$BIN" run --now -p "$small/p.toml"
  n=$(add_cdc "$small/data" ".$fmt")
  measure "cdcflow +1 object (1/10)" "$fmt" "$n" "$small/p.toml" "$BIN" run --now -p "$small/p.toml"
done
"$VENV/bin/python" scripts/bench/report.py delta "$RESULTS" "$BIN" "$OUT" BENCH.md
fi

if [[ " $PARTS " == *" capture "* ]]; then
  # shellcheck source=scripts/bench/capture.sh
  source scripts/bench/capture.sh
fi

"$VENV/bin/python" scripts/bench/report.py write "$RESULTS" "$BIN" "$OUT" BENCH.md
