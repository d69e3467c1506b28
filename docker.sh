#!/usr/bin/env bash
# Run the tutorial's ClickHouse in Docker, so producer.py and
# perspective_server.py have a real database to talk to.
#
#   ./docker.sh [start]   start (or restart) ClickHouse and wait until it answers
#   ./docker.sh stop      remove the container; the data volume is kept
#   ./docker.sh help      show this help
set -euo pipefail

# A pinned LTS line: `latest` would change under the tutorial without notice.
image="${CLICKHOUSE_IMAGE:-clickhouse/clickhouse-server:25.8}"
name="${CLICKHOUSE_CONTAINER:-perspective-clickhouse}"
http_port="${CLICKHOUSE_HTTP_PORT:-8123}"
# The scripts speak HTTP only. Set CLICKHOUSE_NATIVE_PORT (e.g. 9000) to also
# publish the native protocol, for a clickhouse-client on this machine.
native_port="${CLICKHOUSE_NATIVE_PORT:-}"
wait_seconds="${CLICKHOUSE_WAIT_SECONDS:-60}"
# No colon in this expansion: CLICKHOUSE_VOLUME= (empty) means "no volume,
# start from scratch every time".
volume="${CLICKHOUSE_VOLUME-perspective-clickhouse-data}"

# These defaults are the ones the Python scripts assume. They are exported
# because `docker run -e NAME` copies them from our environment, which keeps
# the password out of the command line (and out of `ps`).
export CLICKHOUSE_DB="${CLICKHOUSE_DB:-demo}"
export CLICKHOUSE_USER="${CLICKHOUSE_USER:-demo}"
export CLICKHOUSE_PASSWORD="${CLICKHOUSE_PASSWORD:-demo}"

usage() {
    cat <<EOF
usage: ./docker.sh [start|stop|help]

  start  (default) run ClickHouse in container '$name' and wait until it is ready
  stop   remove the container; data stays in the volume '$volume'
  help   show this message

Settings (environment variables, with their current values):
  CLICKHOUSE_IMAGE=$image
  CLICKHOUSE_CONTAINER=$name
  CLICKHOUSE_HTTP_PORT=$http_port  CLICKHOUSE_NATIVE_PORT=${native_port:-(not published)}
  CLICKHOUSE_DB=$CLICKHOUSE_DB  CLICKHOUSE_USER=$CLICKHOUSE_USER  CLICKHOUSE_PASSWORD (default demo)
  CLICKHOUSE_VOLUME=$volume  (set it empty for a throwaway database)
  CLICKHOUSE_WAIT_SECONDS=$wait_seconds
EOF
}

# Fail with one actionable line: a missing engine is the most common
# stumbling block, and the tutorial also runs without Docker.
require_docker() {
    if ! command -v docker >/dev/null 2>&1; then
        echo "docker.sh: docker is not installed; install Docker, or run without it: .venv/bin/python perspective_server.py --embedded" >&2
        exit 1
    fi
    if ! docker info >/dev/null 2>&1; then
        echo "docker.sh: cannot reach the Docker daemon; start Docker Desktop or \`sudo systemctl start docker\`, or run without it: .venv/bin/python perspective_server.py --embedded" >&2
        exit 1
    fi
}

start() {
    require_docker

    # A container left over from an earlier run, running or not, would
    # hold on to the name and the ports.
    docker rm -f "$name" >/dev/null 2>&1 || true

    # Spelled out below as ${storage[@]+...} because macOS's bash 3.2
    # treats an empty array as unset under `set -u`.
    local storage=()
    if [[ -n "$volume" ]]; then
        storage=(-v "$volume:/var/lib/clickhouse")
    fi

    echo "Starting $image as container '$name'..."
    # 127.0.0.1 only: the demo password is no secret, so the database must
    # not be reachable from the rest of the network.
    # The nofile ulimit is what ClickHouse asks for; the Docker default is
    # too low for it and it warns at startup.
    local ports=(-p "127.0.0.1:$http_port:8123")
    if [[ -n "$native_port" ]]; then
        ports+=(-p "127.0.0.1:$native_port:9000")
    fi
    docker run -d --name "$name" \
        "${ports[@]}" \
        -e CLICKHOUSE_DB -e CLICKHOUSE_USER -e CLICKHOUSE_PASSWORD \
        -e CLICKHOUSE_DEFAULT_ACCESS_MANAGEMENT=1 \
        --ulimit nofile=262144:262144 \
        ${storage[@]+"${storage[@]}"} \
        "$image" >/dev/null

    # Ask from inside the container so no host tool (curl, wget) is needed.
    # clickhouse-client reads CLICKHOUSE_USER/CLICKHOUSE_PASSWORD from the
    # container's environment, so "ready" also means "the demo user can log in".
    local deadline=$((SECONDS + wait_seconds))
    until docker exec "$name" clickhouse-client --query 'SELECT 1' >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "docker.sh: ClickHouse was not ready after ${wait_seconds}s (CLICKHOUSE_WAIT_SECONDS); see why with: docker logs $name" >&2
            exit 1
        fi
        sleep 1
    done

    cat <<EOF
ClickHouse is ready.
  URL:       http://localhost:$http_port  (native protocol on port $native_port)
  user:      $CLICKHOUSE_USER
  password:  from CLICKHOUSE_PASSWORD (default demo)
  database:  $CLICKHOUSE_DB

Next, in two terminals:
  .venv/bin/python producer.py
  .venv/bin/python perspective_server.py
then open http://localhost:8080
Stop with: ./docker.sh stop
EOF
    # The Python scripts call the HTTP port CLICKHOUSE_PORT.
    if [[ "$http_port" != 8123 ]]; then
        echo "(non-default port: export CLICKHOUSE_PORT=$http_port in those terminals first)"
    fi
}

stop() {
    require_docker
    if ! docker container inspect "$name" >/dev/null 2>&1; then
        echo "No container '$name' to remove"
        return
    fi
    docker rm -f "$name" >/dev/null
    if [[ -n "$volume" ]]; then
        echo "Removed container '$name'; data kept in volume '$volume' (delete it with: docker volume rm $volume)"
    else
        echo "Removed container '$name'"
    fi
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    help | -h | --help) usage ;;
    *)
        echo "docker.sh: unknown command '$1'" >&2
        usage >&2
        exit 2
        ;;
esac
