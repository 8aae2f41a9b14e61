# Capture benchmark, sourced by scripts/bench.sh (uses its BIN, OUT, RESULTS and measure):
# CAPTURE_ROWS changes (default 1M) in table bench(id bigint pk, t text, n numeric(12,2),
# ts timestamptz), committed 1000 rows per transaction, then read from two slots made before
# them: pg_recvlogical writing the pgoutput stream to a file, and `cdcflow capture --once`
# writing Parquet objects to a local folder. Same server, same WAL, one after the other.
CAPTURE_ROWS="${CAPTURE_ROWS:-1000000}"
scripts/peers.sh pg start >/dev/null
eval "$(scripts/peers.sh pg env)"
PG_BIN=/usr/lib/postgresql/15/bin
PSQL=(psql -X -q -v ON_ERROR_STOP=1 "$CDCFLOW_TEST_PG_URL")
DB_URL="${CDCFLOW_TEST_PG_URL%/*}/bench_capture"
"${PSQL[@]}" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name IN ('bench_recv', 'bench_cdcflow')" >/dev/null
"${PSQL[@]}" -c "DROP DATABASE IF EXISTS bench_capture" -c "CREATE DATABASE bench_capture"
psql -X -q -v ON_ERROR_STOP=1 "$DB_URL" <<SQL
CREATE TABLE bench(id bigint PRIMARY KEY, t text, n numeric(12,2), ts timestamptz);
CREATE PUBLICATION bench_pub FOR TABLE bench;
SELECT pg_create_logical_replication_slot('bench_recv', 'pgoutput');
SELECT pg_create_logical_replication_slot('bench_cdcflow', 'pgoutput');
DO \$\$ BEGIN
  FOR b IN 0..($CAPTURE_ROWS / 1000 - 1) LOOP
    INSERT INTO bench SELECT g, 'row ' || g, g * 0.01, now() FROM generate_series(b * 1000 + 1, b * 1000 + 1000) g;
    COMMIT;
  END LOOP;
END \$\$;
SQL
END_LSN=$(psql -X -At "$DB_URL" -c "SELECT pg_current_wal_insert_lsn()")
until [ "$(psql -X -At "$DB_URL" -c "SELECT pg_current_wal_flush_lsn() >= '$END_LSN'")" = t ]; do sleep 0.1; done
echo "capture: $CAPTURE_ROWS changes written up to $END_LSN"
rm -rf "$OUT/capture" && mkdir -p "$OUT/capture"
measure pg_recvlogical pgoutput "$CAPTURE_ROWS" "$OUT/capture/recv.bin" \
  "$PG_BIN/pg_recvlogical" -d "$DB_URL" --slot bench_recv --start --endpos "$END_LSN" --no-loop \
  -o proto_version=1 -o publication_names=bench_pub -f "$OUT/capture/recv.bin"
cat >"$OUT/capture/capture.toml" <<TOML
name = "bench"
[source]
url = "$DB_URL"
slot = "bench_cdcflow"
publication = "bench_pub"
mode = "cdc"
[target]
url = "file://$OUT/capture/objects"
TOML
measure "cdcflow capture" pgoutput "$CAPTURE_ROWS" "$OUT/capture/objects" \
  "$BIN" capture --config "$OUT/capture/capture.toml" --once
# Both must have read every change.
got=$("$BIN" capture --config "$OUT/capture/capture.toml" --status | grep -c 'last object' || true)
[ "$got" -ge 1 ] || { echo "bench: cdcflow capture wrote no objects" >&2; exit 1; }
grep -q "captured $CAPTURE_ROWS changes" "$LAST_LOG" || {
  echo "bench: cdcflow capture did not capture $CAPTURE_ROWS changes; see $LAST_LOG" >&2; exit 1; }
"${PSQL[@]}" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name IN ('bench_recv', 'bench_cdcflow')" >/dev/null

# MariaDB: the same CAPTURE_ROWS changes in the row binlog, read by mariadb-binlog (decoding the
# rows, output to /dev/null) and by `cdcflow capture --once` (Parquet objects), from one position.
scripts/peers.sh mariadb start >/dev/null
eval "$(scripts/peers.sh mariadb env)"
MY=(mariadb --no-defaults -h127.0.0.1 -P13306 -uroot)
"${MY[@]}" -e "DROP DATABASE IF EXISTS bench_capture; CREATE DATABASE bench_capture;
  CREATE TABLE bench_capture.bench(id bigint PRIMARY KEY, t varchar(40), n decimal(12,2), ts timestamp(6) NULL)"
cat >"$OUT/capture/mariadb.toml" <<TOML
name = "bench-mariadb"
[source]
url = "$CDCFLOW_TEST_MYSQL_URL/bench_capture"
mode = "cdc"
server_id = 4999
[target]
url = "file://$OUT/capture/mariadb-objects"
TOML
rm -rf "$OUT/capture/mariadb-objects"
"$BIN" capture --config "$OUT/capture/mariadb.toml" --once >/dev/null  # records the start position
read -r MY_FILE MY_POS < <("${MY[@]}" -N -e "SHOW MASTER STATUS" | cut -f1,2)
"${MY[@]}" bench_capture -e "
  DELIMITER //
  CREATE PROCEDURE fill() BEGIN
    DECLARE b INT DEFAULT 0;
    WHILE b < $CAPTURE_ROWS / 1000 DO
      INSERT INTO bench SELECT b * 1000 + seq, CONCAT('row ', b * 1000 + seq), (b * 1000 + seq) * 0.01, NOW(6) FROM seq_1_to_1000;
      COMMIT;
      SET b = b + 1;
    END WHILE;
  END //
  DELIMITER ;
  SET autocommit = 0; CALL fill();"
echo "capture: $CAPTURE_ROWS changes in the binlog from $MY_FILE:$MY_POS"
measure mariadb-binlog binlog "$CAPTURE_ROWS" /dev/null \
  mariadb-binlog --no-defaults --read-from-remote-server -h127.0.0.1 -P13306 -uroot \
  --base64-output=DECODE-ROWS -v --start-position="$MY_POS" --to-last-log "$MY_FILE" --result-file=/dev/null
measure "cdcflow capture" binlog "$CAPTURE_ROWS" "$OUT/capture/mariadb-objects" \
  "$BIN" capture --config "$OUT/capture/mariadb.toml" --once
grep -q "captured $CAPTURE_ROWS changes" "$LAST_LOG" || {
  echo "bench: cdcflow capture did not capture $CAPTURE_ROWS binlog changes; see $LAST_LOG" >&2; exit 1; }

# Full loads: one large table (pgbench's accounts, FULLLOAD_SCALE × 100,000 rows, default 50), read
# by the server's own export and by `cdcflow capture` (mode full-load, Parquet LOAD objects).
FULLLOAD_SCALE="${FULLLOAD_SCALE:-50}"
# measure_capture FORMAT CONFIG OBJECTS ROWS: `cdcflow capture --once` with CONFIG into OBJECTS
# (emptied first); it must have captured ROWS changes.
measure_capture() {
  rm -rf "$3"
  measure "cdcflow capture" "$1" "$4" "$3" "$BIN" capture --config "$2" --once
  grep -q "captured $4 changes" "$LAST_LOG" || {
    echo "bench: cdcflow capture ($1) did not capture $4 changes; see $LAST_LOG" >&2; exit 1; }
}
LOAD_ROWS=$((FULLLOAD_SCALE * 100000))
LOAD_URL="${CDCFLOW_TEST_PG_URL%/*}/bench_load"
"${PSQL[@]}" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'bench_load'" >/dev/null
"${PSQL[@]}" -c "DROP DATABASE IF EXISTS bench_load" -c "CREATE DATABASE bench_load"
pgbench -q -i -s "$FULLLOAD_SCALE" "$LOAD_URL" >/dev/null 2>&1
psql -X -q "$LOAD_URL" -c "VACUUM ANALYZE pgbench_accounts" -c "CREATE PUBLICATION bench_load FOR TABLE pgbench_accounts"
measure "psql \\copy" pgcopy "$LOAD_ROWS" /dev/null \
  psql -X -q "$LOAD_URL" -c "\\copy pgbench_accounts TO '/dev/null'"
cat >"$OUT/capture/load.toml" <<TOML
name = "bench-load"
[source]
url = "$LOAD_URL"
slot = "bench_load"
publication = "bench_load"
mode = "full-load"
[target]
url = "file://$OUT/capture/load-objects"
TOML
measure_capture pgcopy "$OUT/capture/load.toml" "$OUT/capture/load-objects" "$LOAD_ROWS"
"${PSQL[@]}" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'bench_load'" >/dev/null

"${MY[@]}" -e "DROP DATABASE IF EXISTS bench_load; CREATE DATABASE bench_load"
"${MY[@]}" bench_load -e "CREATE TABLE accounts(aid int PRIMARY KEY, bid int, abalance int, filler char(84));
  INSERT INTO accounts SELECT seq, (seq - 1) DIV 100000 + 1, 0, '' FROM seq_1_to_$LOAD_ROWS;"
measure mariadb-dump mydump "$LOAD_ROWS" /dev/null \
  mariadb-dump --no-defaults -h127.0.0.1 -P13306 -uroot --single-transaction --result-file=/dev/null bench_load accounts
cat >"$OUT/capture/mariadb-load.toml" <<TOML
name = "bench-mariadb-load"
[source]
url = "$CDCFLOW_TEST_MYSQL_URL/bench_load"
mode = "full-load"
server_id = 4998
[target]
url = "file://$OUT/capture/mariadb-load-objects"
TOML
measure_capture mydump "$OUT/capture/mariadb-load.toml" "$OUT/capture/mariadb-load-objects" "$LOAD_ROWS"
