#!/usr/bin/env bash
# Install everything, make sure Redis answers, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test

redis_up() { .venv/bin/python -c "import redis,sys; redis.Redis(host='127.0.0.1', port=6379, socket_timeout=1).ping()" 2>/dev/null; }
if ! redis_up; then
  if ! command -v redis-server >/dev/null; then
    echo "Redis is not running and not installed: installing redis-server"
    (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null
  fi
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 50); do redis_up && break; sleep 0.2; done
  redis_up || { echo "Redis did not start on 127.0.0.1:6379"; exit 1; }
fi

# The benchmark smoke test (tests/unit/test_benchmark_smoke.py) drives load with wrk.
if ! command -v wrk >/dev/null; then
  echo "wrk is not installed: installing it"
  (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null
fi

# The console's browser test (tests/integration/test_console_browser.py) drives the system
# Chromium through its driver: Selenium is never left to download a browser.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  echo "chromium is not installed: installing chromium and chromium-driver"
  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null
fi

# The Slurm tests (tests/integration/test_slurm.py) start a one-node Slurm of their own:
# its daemons and munge come from Debian's packages.
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "Slurm is not installed: installing slurm-wlm and munge"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge) >/dev/null
fi

# The deployment tests (tests/unit/test_deploy_*.py) check the compose file with Debian's
# docker-compose and render the kustomize trees with kubectl, offline: no engine, no cluster.
if ! command -v docker-compose >/dev/null || ! command -v kubectl >/dev/null; then
  echo "docker-compose or kubectl is not installed: installing them"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose kubectl) >/dev/null
fi

# The monitoring tests parse the Grafana dashboard's queries and the Prometheus config with
# promtool, and run a real Prometheus against the test fleet (tests/integration/test_monitoring.py).
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  echo "prometheus is not installed: installing it"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus) >/dev/null
fi

.venv/bin/ruff check vpool tests benchmarks
.venv/bin/ruff format --check vpool tests benchmarks
.venv/bin/mypy vpool
.venv/bin/python -m pytest "$@"
