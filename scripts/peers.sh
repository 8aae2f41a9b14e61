#!/usr/bin/env bash
# Real test peers on loopback, installed and started by the project itself.
#   scripts/peers.sh {moto|bq|pg|mariadb|all} {install|start|stop|status|env}
# State (virtualenvs, logs, pids) lives in $PEERS_DIR (default ./.peers).
#   moto       S3 API on 127.0.0.1:19000 (any credentials accepted)
#   moto-auth  S3 API on 127.0.0.1:19001 that enforces credentials (for "wrong credentials" tests)
#   bq         BigQuery REST API (bqemulator, DuckDB inside) on 127.0.0.1:19050, project test-proj
#   pg         PostgreSQL 15 with wal_level=logical on 127.0.0.1:15432 (user postgres, trust auth), TLS on
#   pgwrap     PostgreSQL 15 on 127.0.0.1:15433, its xids 496 short of the 32-bit wrap (fresh at every start)
#   mariadb    MariaDB with a ROW/FULL binlog on 127.0.0.1:13306 (user root, no password), TLS on
#   tools      clients the tests check with: headless Chromium, prometheus-client's OpenMetrics parser, PyYAML
#   (TLS: a test CA in $PEERS_DIR/tls, see tls_certs)
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS_DIR="${PEERS_DIR:-$PWD/.peers}"
MOTO_PORT="${MOTO_PORT:-19000}"
MOTO_AUTH_PORT="${MOTO_AUTH_PORT:-19001}"
MOTO_VERSION=5.2.5
PROM_CLIENT_VERSION=0.23.1
PYYAML_VERSION=6.0.2
DELTALAKE_VERSION=1.6.6
PYARROW_VERSION=26.0.1
TOOLS_IMPORT='import prometheus_client, yaml, deltalake, pyarrow'
BQ_PORT="${BQ_PORT:-19050}"
BQ_GRPC_PORT="${BQ_GRPC_PORT:-19060}"
BQ_PROJECT="${BQ_PROJECT:-test-proj}"
PG_PORT="${PG_PORT:-15432}"
PG_BIN=/usr/lib/postgresql/15/bin
MY_PORT="${MY_PORT:-13306}"
mkdir -p "$PEERS_DIR"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() { # name seconds command...
  local name=$1 secs=$2; shift 2
  for _ in $(seq $((secs * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "peers: $name did not become ready in ${secs}s; see $PEERS_DIR/*.log" >&2; return 1
}
stop_pid() { if alive "$1"; then kill "$(cat "$1")"; fi; rm -f "$1"; }
http_ok() { python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" "$1"; }

moto_install() {
  [ -x "$PEERS_DIR/venv-moto/bin/moto_server" ] && return 0
  python3 -m venv "$PEERS_DIR/venv-moto"
  "$PEERS_DIR/venv-moto/bin/pip" install -q --disable-pip-version-check "moto[server]==$MOTO_VERSION"
}
moto_start() {
  moto_install
  if ! alive "$PEERS_DIR/moto.pid"; then
    nohup "$PEERS_DIR/venv-moto/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$PEERS_DIR/moto.log" 2>&1 &
    echo $! >"$PEERS_DIR/moto.pid"
  fi
  if ! alive "$PEERS_DIR/moto-auth.pid"; then
    INITIAL_NO_AUTH_ACTION_COUNT=0 nohup "$PEERS_DIR/venv-moto/bin/moto_server" -H 127.0.0.1 -p "$MOTO_AUTH_PORT" \
      >"$PEERS_DIR/moto-auth.log" 2>&1 &
    echo $! >"$PEERS_DIR/moto-auth.pid"
  fi
  wait_for "moto :$MOTO_PORT" 30 http_ok "http://127.0.0.1:$MOTO_PORT/moto-api/"
  wait_for "moto-auth :$MOTO_AUTH_PORT" 30 http_ok "http://127.0.0.1:$MOTO_AUTH_PORT/moto-api/"
}
moto_stop() { stop_pid "$PEERS_DIR/moto.pid"; stop_pid "$PEERS_DIR/moto-auth.pid"; }
moto_status() {
  alive "$PEERS_DIR/moto.pid" && echo "moto: up on 127.0.0.1:$MOTO_PORT" || echo "moto: down"
  alive "$PEERS_DIR/moto-auth.pid" && echo "moto-auth: up on 127.0.0.1:$MOTO_AUTH_PORT" || echo "moto-auth: down"
}
moto_env() {
  echo "export CDCFLOW_TEST_S3_ENDPOINT=http://127.0.0.1:$MOTO_PORT"
  echo "export CDCFLOW_TEST_S3_AUTH_ENDPOINT=http://127.0.0.1:$MOTO_AUTH_PORT"
}

# bqemulator needs two fixes to start offline: its DuckDB runs `INSTALL spatial` at start-up
# (a download), so duckdb is pinned to 1.5.5 and the extension is copied from its PyPI wheel
# into a private HOME; and numpy, missing from its dependencies.
BQ_EXT_DIR="$PEERS_DIR/bq-home/.duckdb/extensions/v1.5.5/linux_amd64"
bq_install() {
  [ -x "$PEERS_DIR/venv-bq/bin/bqemulator" ] && [ -f "$BQ_EXT_DIR/spatial.duckdb_extension" ] && return 0
  python3 -m venv "$PEERS_DIR/venv-bq"
  "$PEERS_DIR/venv-bq/bin/pip" install -q --disable-pip-version-check \
    'bqemulator==1.4.0' 'duckdb==1.5.5' 'duckdb-extension-spatial==1.5.5' numpy
  local ext
  ext=$("$PEERS_DIR/venv-bq/bin/python" -c 'import duckdb_extension_spatial,os;print(os.path.dirname(duckdb_extension_spatial.__file__))')
  mkdir -p "$BQ_EXT_DIR"
  cp "$ext/extensions/v1.5.5/spatial.duckdb_extension" "$BQ_EXT_DIR/"
}
bq_start() {
  bq_install
  if ! alive "$PEERS_DIR/bq.pid"; then
    HOME="$PEERS_DIR/bq-home" nohup "$PEERS_DIR/venv-bq/bin/bqemulator" start \
      --rest-host 127.0.0.1 --rest-port "$BQ_PORT" --grpc-host 127.0.0.1 --grpc-port "$BQ_GRPC_PORT" \
      --project "$BQ_PROJECT" --ephemeral --log-level warning >"$PEERS_DIR/bq.log" 2>&1 &
    echo $! >"$PEERS_DIR/bq.pid"
  fi
  wait_for "bqemulator :$BQ_PORT" 60 http_ok "http://127.0.0.1:$BQ_PORT/readyz"
}
bq_stop() { stop_pid "$PEERS_DIR/bq.pid"; }
bq_status() { alive "$PEERS_DIR/bq.pid" && echo "bq: up on 127.0.0.1:$BQ_PORT" || echo "bq: down"; }
bq_env() {
  echo "export CDCFLOW_TEST_BQ_ENDPOINT=http://127.0.0.1:$BQ_PORT"
  echo "export CDCFLOW_TEST_BQ_PROJECT=$BQ_PROJECT"
}

# PostgreSQL refuses to run as root: the cluster belongs to the `postgres` user the package creates.
# A test certificate authority (made once with openssl): ca.pem signs server.pem, whose only
# name is DNS:localhost (so 127.0.0.1 is a wrong host for verify-full); other-ca.pem signs
# nothing of ours. PostgreSQL and MariaDB serve server.pem; each gets its own copy of the key,
# owned by its user, as both servers insist.
TLS_DIR="$PEERS_DIR/tls"
tls_certs() {
  [ -f "$TLS_DIR/server.pem" ] && return 0
  command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl; }
  mkdir -p "$TLS_DIR"
  local ca_ext=(-addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign")
  (cd "$TLS_DIR"
   for ca in ca other-ca; do
     openssl req -x509 -newkey rsa:2048 -nodes -keyout $ca.key -out $ca.pem -days 3650 \
       -subj "/CN=cdcflow test $ca" "${ca_ext[@]}" 2>/dev/null
   done
   openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
   printf '%s\n' "subjectAltName=DNS:localhost" "basicConstraints=critical,CA:FALSE" \
     "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" >server.ext
   openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem \
     -days 3650 -extfile server.ext 2>/dev/null)
}
# Copies the server certificate and key into directory $1 for user $2.
tls_install() {
  tls_certs
  cp "$TLS_DIR/server.pem" "$TLS_DIR/server.key" "$1/"
  chmod 600 "$1/server.key"
  if [ "$(id -u)" = 0 ]; then chown "$2:$2" "$1/server.pem" "$1/server.key"; fi
}
tls_env() { echo "export CDCFLOW_TEST_TLS_DIR=$TLS_DIR"; }

# Durability settings are off: this server holds test data only.
as_postgres() { if [ "$(id -u)" = 0 ]; then su postgres -c "$*"; else sh -c "$*"; fi; }
pg_install() {
  if [ ! -x "$PG_BIN/postgres" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 postgresql-client-15
  fi
  [ -f "$PEERS_DIR/pg/data/PG_VERSION" ] && return 0
  mkdir -p "$PEERS_DIR/pg"
  if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$PEERS_DIR/pg"; fi
  as_postgres "$PG_BIN/initdb -D '$PEERS_DIR/pg/data' -U postgres -A trust -E UTF8 --no-locale" \
    >"$PEERS_DIR/pg-initdb.log"
  printf '%s\n' "listen_addresses = '127.0.0.1'" "port = $PG_PORT" \
    "unix_socket_directories = '$PEERS_DIR/pg'" "wal_level = logical" \
    "max_replication_slots = 40" "max_wal_senders = 40" "max_connections = 200" \
    "fsync = off" "synchronous_commit = off" "full_page_writes = off" \
    | as_postgres "cat >>'$PEERS_DIR/pg/data/postgresql.conf'"
}
pg_ready() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; }
# TLS on (the test CA's certificate); the role `tlsonly` may connect only over TLS, so a
# test that connects as it knows TLS was used.
pg_start() {
  pg_install
  pg_ready && return 0
  tls_install "$PEERS_DIR/pg" postgres
  local hba="$PEERS_DIR/pg/data/pg_hba.conf"
  grep -q tlsonly "$hba" || as_postgres "sed -i '1i hostnossl all tlsonly 0.0.0.0/0 reject' '$hba'"
  as_postgres "$PG_BIN/pg_ctl -D '$PEERS_DIR/pg/data' -l '$PEERS_DIR/pg/server.log' -w -t 30 \
    -o '-c ssl=on -c ssl_cert_file=$PEERS_DIR/pg/server.pem -c ssl_key_file=$PEERS_DIR/pg/server.key' \
    start" >/dev/null
  wait_for "postgres :$PG_PORT" 30 pg_ready
}
pg_stop() {
  [ -f "$PEERS_DIR/pg/data/postmaster.pid" ] || return 0
  as_postgres "$PG_BIN/pg_ctl -D '$PEERS_DIR/pg/data' -m fast -w stop" >/dev/null || true
}
pg_status() { pg_ready && echo "pg: up on 127.0.0.1:$PG_PORT" || echo "pg: down"; }
pg_env() {
  echo "export CDCFLOW_TEST_PG_URL=postgres://postgres@127.0.0.1:$PG_PORT/postgres"
  tls_env
}

# A second PostgreSQL 15 whose transaction ids are a few hundred short of the 32-bit wrap
# (pg_resetwal -x), made afresh at every start so that each test run crosses the wrap.
PGW_PORT="${PGW_PORT:-15433}"
PGW_DIR="$PEERS_DIR/pgwrap"
pgwrap_install() { pg_install; }
pgwrap_ready() { "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PGW_PORT"; }
pgwrap_ctl() { as_postgres "$PG_BIN/pg_ctl -D '$PGW_DIR/data' -l '$PGW_DIR/server.log' -w -t 30 $*" >/dev/null; }
pgwrap_start() {
  pgwrap_install
  pgwrap_stop
  rm -rf "$PGW_DIR" && mkdir -p "$PGW_DIR"
  if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$PGW_DIR"; fi
  as_postgres "$PG_BIN/initdb -D '$PGW_DIR/data' -U postgres -A trust -E UTF8 --no-locale" >"$PGW_DIR/initdb.log"
  printf '%s\n' "listen_addresses = '127.0.0.1'" "port = $PGW_PORT" \
    "unix_socket_directories = '$PGW_DIR'" "wal_level = logical" "max_replication_slots = 10" \
    "max_wal_senders = 10" "fsync = off" "synchronous_commit = off" \
    | as_postgres "cat >>'$PGW_DIR/data/postgresql.conf'"
  pgwrap_ctl start
  # Every row of the catalogs frozen, so that they stay visible after the reset.
  "$PG_BIN/psql" -q -h 127.0.0.1 -p "$PGW_PORT" -U postgres -d postgres \
    -c "UPDATE pg_database SET datallowconn = true WHERE datname = 'template0'" >/dev/null
  "$PG_BIN/vacuumdb" -q -h 127.0.0.1 -p "$PGW_PORT" -U postgres --all --freeze
  pgwrap_ctl stop
  as_postgres "$PG_BIN/pg_resetwal -x 4294966800 -D '$PGW_DIR/data'" >/dev/null
  as_postgres "dd if=/dev/zero of='$PGW_DIR/data/pg_xact/0FFF' bs=8192 count=32 status=none"
  pgwrap_ctl start
  wait_for "postgres near the xid wrap :$PGW_PORT" 30 pgwrap_ready
}
pgwrap_stop() { [ -f "$PGW_DIR/data/postmaster.pid" ] && pgwrap_ctl "-m fast stop" || true; }
pgwrap_status() { pgwrap_ready && echo "pgwrap: up on 127.0.0.1:$PGW_PORT" || echo "pgwrap: down"; }
pgwrap_env() { echo "export CDCFLOW_TEST_PGWRAP_URL=postgres://postgres@127.0.0.1:$PGW_PORT/postgres"; }

# MariaDB with the row binlog capture needs (ROW, FULL image, full row metadata for column names).
MY_BIN_DIR="$PEERS_DIR/mariadb"
my_admin() { mariadb-admin --no-defaults -h127.0.0.1 -P"$MY_PORT" -uroot "$@"; }
mariadb_install() {
  if ! command -v mariadbd >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server
  fi
  # sysbench drives the MariaDB soak test (pgbench, for PostgreSQL's, comes with postgresql-15).
  if ! command -v sysbench >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sysbench
  fi
  [ -d "$MY_BIN_DIR/data/mysql" ] && return 0
  mkdir -p "$MY_BIN_DIR"
  if [ "$(id -u)" = 0 ]; then chown mysql:mysql "$MY_BIN_DIR"; fi
  mariadb-install-db --no-defaults --user=mysql --datadir="$MY_BIN_DIR/data" \
    --auth-root-authentication-method=normal --skip-test-db >"$PEERS_DIR/mariadb-install.log" 2>&1
}
mariadb_start() {
  mariadb_install
  my_admin ping >/dev/null 2>&1 && return 0
  tls_install "$MY_BIN_DIR" mysql
  nohup mariadbd --no-defaults --user=mysql --datadir="$MY_BIN_DIR/data" --port="$MY_PORT" \
    --bind-address=127.0.0.1 --socket="$MY_BIN_DIR/mysqld.sock" --pid-file="$MY_BIN_DIR/mysqld.pid" \
    --log-error="$MY_BIN_DIR/error.log" --log-bin="$MY_BIN_DIR/data/binlog" --binlog-format=ROW \
    --binlog-row-image=FULL --binlog-row-metadata=FULL --server-id=1 --max-connections=300 \
    --character-set-server=utf8mb4 --collation-server=utf8mb4_general_ci \
    --innodb-flush-log-at-trx-commit=2 --sync-binlog=0 --ssl-ca="$TLS_DIR/ca.pem" \
    --ssl-cert="$MY_BIN_DIR/server.pem" --ssl-key="$MY_BIN_DIR/server.key" >/dev/null 2>&1 &
  wait_for "mariadb :$MY_PORT" 30 my_admin ping
}
mariadb_stop() { my_admin shutdown >/dev/null 2>&1 || true; }
mariadb_status() { my_admin ping >/dev/null 2>&1 && echo "mariadb: up on 127.0.0.1:$MY_PORT" || echo "mariadb: down"; }
mariadb_env() { echo "export CDCFLOW_TEST_MYSQL_URL=mysql://root@127.0.0.1:$MY_PORT"; tls_env; }

tools_install() {
  # Headless Chromium drives the web UI's tests.
  if ! command -v chromium >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
  fi
  "$PEERS_DIR/venv-tools/bin/python" -c "$TOOLS_IMPORT" >/dev/null 2>&1 && return 0
  python3 -m venv "$PEERS_DIR/venv-tools"
  # prometheus-client: parses /metrics; deltalake (+ pyarrow): a second Delta
  # reader of the warehouse tables in S3.
  "$PEERS_DIR/venv-tools/bin/pip" install -q --disable-pip-version-check \
    "prometheus-client==$PROM_CLIENT_VERSION" "PyYAML==$PYYAML_VERSION" \
    "deltalake==$DELTALAKE_VERSION" "pyarrow==$PYARROW_VERSION"
}
tools_start() { tools_install; }
tools_stop() { :; }
tools_status() {
  "$PEERS_DIR/venv-tools/bin/python" -c "$TOOLS_IMPORT" >/dev/null 2>&1 \
    && command -v chromium >/dev/null 2>&1 && echo "tools: installed" || echo "tools: missing"
}
tools_env() {
  echo "export CDCFLOW_TEST_PYTHON=$PEERS_DIR/venv-tools/bin/python"
  command -v chromium >/dev/null 2>&1 && echo "export CDCFLOW_TEST_CHROMIUM=$(command -v chromium)"
  return 0
}

peer=${1:-}; action=${2:-}
usage="usage: $0 {moto|bq|pg|pgwrap|mariadb|tools|all} {install|start|stop|status|env}"
case "$peer" in moto|bq|pg|pgwrap|mariadb|tools) peers=$peer ;; all) peers="moto bq pg pgwrap mariadb tools" ;; *) echo "$usage" >&2; exit 2 ;; esac
case "$action" in install|start|stop|status|env) ;; *) echo "$usage" >&2; exit 2 ;; esac
for p in $peers; do "${p}_${action}"; done
