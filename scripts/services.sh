#!/usr/bin/env bash
# Makes sure the local services sluice's tests use are installed and running on 127.0.0.1:
# PostgreSQL 5432 (trust; databases test and root), MariaDB 3306 (root, empty password,
# database test), Redis 6379 (nothing on disk), RabbitMQ 5672 (guest/guest).
# Installs a missing one with apt-get (Debian), starts one that is down, and fails loudly when
# one cannot be brought up. Safe to run when everything is already up.
set -euo pipefail

log() { echo "services: $*" >&2; }
fail() { echo "services: FAILED: $*" >&2; exit 1; }

wait_for() { # NAME SECONDS COMMAND...
  local name=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then fail "$name did not answer within ${seconds}s"; fi
    sleep 1
  done
}

APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null || fail "apt-get not found; install $* by hand"
  if ((APT_UPDATED == 0)); then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq || fail "apt-get update"
    APT_UPDATED=1
  fi
  log "installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || fail "apt-get install $*"
}

# PostgreSQL
fresh_postgres=0
if ! command -v pg_ctlcluster >/dev/null || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
  apt_install postgresql
  fresh_postgres=1
fi
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  log "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  wait_for PostgreSQL 60 pg_isready -q -h 127.0.0.1 -p 5432
fi
if ((fresh_postgres == 1)); then
  version=$(ls /etc/postgresql | head -1)
  hba=/etc/postgresql/$version/main/pg_hba.conf
  printf 'local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n' > "$hba"
  pg_ctlcluster --skip-systemctl-redirect "$version" main reload
  for database in test root; do
    su postgres -c "psql -qtAc \"SELECT 1 FROM pg_database WHERE datname = '$database'\"" | grep -q 1 \
      || su postgres -c "createdb $database"
  done
  su postgres -c "psql -qc \"DO \\\$\\\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'root') THEN CREATE ROLE root SUPERUSER LOGIN; END IF; END \\\$\\\$;\""
fi
psql -h 127.0.0.1 -U postgres -d postgres -qtAc "SELECT 1" >/dev/null || fail "PostgreSQL does not accept trust logins on 127.0.0.1"

# MariaDB
fresh_mariadb=0
if [ ! -x /usr/sbin/mariadbd ]; then
  apt_install mariadb-server
  fresh_mariadb=1
fi
if ! mysqladmin --protocol=tcp -h 127.0.0.1 -u root ping >/dev/null 2>&1; then
  log "starting MariaDB"
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
  wait_for MariaDB 60 mysqladmin --protocol=socket -u root ping
fi
if ((fresh_mariadb == 1)); then
  mysql -u root -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD(''); CREATE DATABASE IF NOT EXISTS test; FLUSH PRIVILEGES;"
fi
wait_for MariaDB 30 mysqladmin --protocol=tcp -h 127.0.0.1 -u root ping

# Redis
if ! command -v redis-server >/dev/null; then apt_install redis-server; fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
  log "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for Redis 30 sh -c 'redis-cli -h 127.0.0.1 -p 6379 ping | grep -q PONG'
fi

# RabbitMQ
if ! command -v rabbitmq-server >/dev/null; then apt_install rabbitmq-server; fi
if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
  log "starting RabbitMQ"
  rabbitmq-server -detached || true
  wait_for RabbitMQ 120 rabbitmq-diagnostics -q ping
fi

log "PostgreSQL, MariaDB, Redis and RabbitMQ are up"

# SQLMesh, the differential suite's oracle (tests/sqlmesh_diff.rs), pinned, in its own virtual
# environment outside the clone (installed once per machine, about a minute).
SQLMESH_VERSION=0.236.4
venv="${SLUICE_SQLMESH_VENV:-$HOME/.cache/sluice/sqlmesh-$SQLMESH_VERSION}"
# The dump reads both tools' DuckDB files with the DuckDB sluice links (2.0: it reads SQLMesh's
# 1.5 files too; SQLMesh itself keeps the DuckDB it supports), installed beside it in reader/.
if ! "$venv/bin/python" -c "import sqlmesh, duckdb, psycopg2" >/dev/null 2>&1 \
  || ! PYTHONPATH="$venv/reader" "$venv/bin/python" -c "import duckdb; assert duckdb.__version__ == '2.0.1'" >/dev/null 2>&1; then
  command -v python3 >/dev/null || apt_install python3
  python3 -c "import venv, ensurepip" >/dev/null 2>&1 || apt_install python3-venv
  log "installing SQLMesh $SQLMESH_VERSION into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv" || fail "python3 -m venv $venv"
  "$venv/bin/pip" install -q "sqlmesh==$SQLMESH_VERSION" "duckdb==1.5.6" "psycopg2-binary==2.9.13" \
    || fail "pip install sqlmesh==$SQLMESH_VERSION"
  "$venv/bin/pip" install -q --target "$venv/reader" "duckdb==2.0.1" || fail "pip install duckdb==2.0.1 (the reader)"
fi
log "SQLMesh $SQLMESH_VERSION is in $venv"

# The manifest checks' tools (scripts/check-kubernetes.py): Kubernetes' schemas, offline
# (kubernetes-validate), and Prometheus's text parser (the metrics test), pinned, in their own
# virtual environment outside the clone.
tools="${SLUICE_TOOLS_VENV:-$HOME/.cache/sluice/k8s-tools}"
if ! "$tools/bin/python" -c "import kubernetes_validate, prometheus_client, jsonschema, yaml" >/dev/null 2>&1; then
  log "installing kubernetes-validate and prometheus-client into $tools"
  rm -rf "$tools"
  python3 -m venv "$tools" || fail "python3 -m venv $tools"
  "$tools/bin/pip" install -q "kubernetes-validate==1.37.0" "prometheus-client==0.26.0" \
    || fail "pip install kubernetes-validate prometheus-client"
fi
command -v kubectl >/dev/null || fail "kubectl not found: the manifest checks render deploy/kubernetes with 'kubectl kustomize' (install kubectl 1.27 or later)"
log "manifest tools are in $tools"
