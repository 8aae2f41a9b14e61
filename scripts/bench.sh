#!/usr/bin/env bash
# The benchmark (`make bench`): cdcflow against DuckDB and Polars on the same DMS files.
#   BENCH_ROWS=10000000 (changes in all, split over two tables; BENCH_ROWS=1000000 for a quick look)
#   BENCH_FORMATS="csv parquet"
#   BENCH_SHAPES="synth wide" (wide: scripts/bench/shape.py; BENCH_BIG_OBJECT_MB=1024, its large object)
#   BENCH_CORES="1 2" (default: 1, 2, 4, … up to nproc; each run pinned with taskset and told the count)
#   BENCH_PROFILE=1: also a perf profile of each synth run of cdcflow (bench-out/perf-*.txt)
#   BENCH_PARTS="pipeline capture" (capture: scripts/bench/capture.sh, CAPTURE_ROWS=1000000; it
#   starts the PostgreSQL peer). A run of some parts keeps the other parts' last results.
# Writes bench-out/ (data, outputs, results.tsv) and BENCH.md. Never part of `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS="${BENCH_ROWS:-10000000}"
FORMATS="${BENCH_FORMATS:-csv parquet}"
SHAPES="${BENCH_SHAPES:-synth wide}"
# 1 core and every core this machine has (and 2, 4, 8, … between).
CORES="${BENCH_CORES:-$(n=$(nproc); c=1; while [ $c -lt "$n" ]; do printf '%s ' $c; c=$((c * 2)); done; echo "$n")}"
SEED=20241122
OUT="$PWD/bench-out"
VENV="${PEERS_DIR:-$PWD/.peers}/venv-bench"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time; }
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import duckdb, polars, deltalake, numpy; assert duckdb.__version__ == "2.0.1" and polars.__version__ == "2.1.0"' 2>/dev/null; then
  python3 -m venv "$VENV"
  # deltalake: a second Delta reader, to check cdcflow's tables (it must apply deletion vectors).
  "$VENV/bin/pip" install -q --disable-pip-version-check duckdb==2.0.1 polars==2.1.0 deltalake==1.6.6 numpy==2.4.6
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
  *" pipeline "*) grep -P '\t(pgoutput|binlog|pgcopy|mydump)\t' "$RESULTS" >"$RESULTS.keep" || true; mv "$RESULTS.keep" "$RESULTS" ;;
  *" capture "*) grep -vP '\t(pgoutput|binlog|pgcopy|mydump)\t' "$RESULTS" >"$RESULTS.keep" || true; mv "$RESULTS.keep" "$RESULTS" ;;
esac

# measure NAME FORMAT CHANGES OUTPUT CMD...: wall seconds and peak RSS of CMD, appended to results.tsv
# (with $shape and $cores); CMD's output is left in $LAST_LOG.
measure() {
  local name=$1 fmt=$2 changes=$3 output=$4; shift 4
  sync
  local log="$OUT/${name//[^a-z0-9]/_}-${shape:-synth}-$fmt-${cores:-$(nproc)}.log"
  LAST_LOG=$log
  /usr/bin/time -f "%e %M" -o "$OUT/time.txt" "$@" >"$log" 2>&1 || {
    echo "bench: $name ($fmt) failed; see $log" >&2; tail -20 "$log" >&2; exit 1; }
  read -r secs rss <"$OUT/time.txt"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$fmt" "$changes" "$secs" "$rss" "$output" \
    "${shape:-synth}" "${cores:-$(nproc)}" >>"$RESULTS"
  printf '  %-26s %-8s %-6s %2s cores %10s changes %8ss %8s KiB\n' "$name" "$fmt" "${shape:-synth}" \
    "${cores:-$(nproc)}" "$changes" "$secs" "$rss"
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
for shape in $SHAPES; do
for fmt in $FORMATS; do
  data="$OUT/data-$shape-$fmt"
  rm -rf "$data"
  echo "generating $ROWS changes ($shape, $fmt)…"
  case $shape in
    synth) "$BIN" synth --changes $((ROWS / 2)) --seed $SEED --format "$fmt" --out "$data" >/dev/null ;;
    wide) "$VENV/bin/python" scripts/bench/shape.py "$fmt" "$ROWS" $SEED "$data" ;;
    *) echo "bench: unknown shape $shape (synth, wide)" >&2; exit 2 ;;
  esac
  for cores in $CORES; do
    pin=(taskset -c "0-$((cores - 1))")
    for engine in duckdb polars; do
      run="$OUT/$engine-$shape-$fmt-$cores"
      rm -rf "$run"
      BENCH_THREADS=$cores POLARS_MAX_THREADS=$cores measure "$engine" "$fmt" "$ROWS" "$run" \
        "${pin[@]}" "$VENV/bin/python" scripts/bench/peers.py "$engine" "$fmt" "$data" "$run"
    done
    run="$OUT/cdcflow-$shape-$fmt-$cores"
    rm -rf "$run" "$run.state.db"*
    "$VENV/bin/python" scripts/bench/peers.py pipeline "$data" "$run" >"$run.toml"
    measure cdcflow "$fmt" "$ROWS" "$run.toml" "${pin[@]}" "$BIN" --threads "$cores" run --now -p "$run.toml"
    [ "$shape" = synth ] || continue
    # Where the time goes, by function and thread: a sampled profile of the same run.
    if [ -n "${BENCH_PROFILE:-}" ] && command -v perf >/dev/null; then
      rm -rf "$run" "$run.state.db"*
      perf record -F 499 -g -o "$OUT/perf-$shape-$fmt-$cores.data" -- "${pin[@]}" "$BIN" --threads "$cores" run --now -p "$run.toml" >/dev/null 2>&1 || true
      perf report -i "$OUT/perf-$shape-$fmt-$cores.data" --no-children --sort comm,dso,symbol --percent-limit 1 --stdio \
        >"$OUT/perf-$shape-$fmt-$cores.txt" 2>/dev/null || true
    fi
  done
done
done

# Every engine must have written the same tables before anything is reported.
"$VENV/bin/python" scripts/bench/report.py check "$RESULTS" "$BIN" "$OUT" BENCH.md

# The incremental runs go into the synth warehouse cdcflow loaded on the most cores.
shape=synth cores=${CORES##* }
for fmt in $FORMATS; do
  [[ " $SHAPES " == *" synth "* ]] || break
  data="$OUT/data-synth-$fmt"
  toml="$OUT/cdcflow-synth-$fmt-$cores.toml"
  # One more CDC object into the full warehouse: its cost must track the new data.
  n=$(add_cdc "$data" ".$fmt")
  measure "cdcflow +1 object" "$fmt" "$n" "$toml" "$BIN" run --now -p "$toml"
  # Ten more, a run each: deletion vectors accumulate until a rewrite drops their rows.
  measure "cdcflow +10 objects, a run each" "$fmt" $((n * 10)) "$toml" bash -c '
    object=$1; shift
    for day in 02 03 04 05 06 07 08 09 10 11; do
      mkdir -p "${object%/01/01/*}/01/$day"
      cp "$object" "${object%/01/01/*}/01/$day/209901$day-000000000.${object##*.}"
      "$@" || exit 1
    done' _ "$data/public/orders/2099/01/01/20990101-000000000.$fmt" \
    "$BIN" run --now -p "$toml"
  # The same at a tenth of the size: memory, and the incremental cost on a smaller table.
  small="$OUT/small-$fmt"
  rm -rf "$small"
  "$BIN" synth --changes $((ROWS / 20)) --seed $SEED --format "$fmt" --out "$small/data" >/dev/null
  "$VENV/bin/python" scripts/bench/peers.py pipeline "$small/data" "$small/wh" >"$small/p.toml"
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
