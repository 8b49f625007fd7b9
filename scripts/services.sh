#!/usr/bin/env bash
# Make sure the local RabbitMQ and Redis answer on loopback; start them with this machine's own start
# commands when they do not. Does nothing for a broker or store that is not on this machine.
set -euo pipefail

answers() {  # host port
  python3 - "$1" "$2" <<'PY'
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
except OSError:
    sys.exit(1)
PY
}

wait_for() {  # name host port seconds
  local deadline=$((SECONDS + $4))
  until answers "$2" "$3"; do
    if (( SECONDS > deadline )); then echo "services: $1 did not come up on $2:$3" >&2; return 1; fi
    sleep 1
  done
  echo "services: $1 answers on $2:$3"
}

if answers 127.0.0.1 5672; then
  echo "services: RabbitMQ answers on 127.0.0.1:5672"
elif command -v rabbitmq-server >/dev/null; then
  echo "services: starting RabbitMQ"
  rabbitmq-server -detached
  wait_for RabbitMQ 127.0.0.1 5672 120
else
  echo "services: no RabbitMQ on 127.0.0.1:5672 and rabbitmq-server is not installed (try: make up)" >&2
  exit 1
fi

if answers 127.0.0.1 6379; then
  echo "services: Redis answers on 127.0.0.1:6379"
elif command -v redis-server >/dev/null; then
  echo "services: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for Redis 127.0.0.1 6379 60
else
  echo "services: no Redis on 127.0.0.1:6379 and redis-server is not installed (Redis tests will skip)" >&2
fi
