#!/usr/bin/env bash
# Fills deploy/wheelhouse/ with every wheel the image installs (the gateway's dependencies with
# the redis and uvloop extras, and its build backend), for a build that reaches no index:
#   deploy/offline/wheelhouse.sh BASE_IMAGE
#   docker build --build-arg BASE_IMAGE=BASE_IMAGE --build-arg PIP_OFFLINE=1 -f deploy/Dockerfile .
# pip runs inside BASE_IMAGE, so the wheels (and the environment markers, such as
# `python_full_version < "3.11.3"`) are those of the image's own Python, CPU and libc. It uses
# the host's network and CA certificates (a TLS-inspecting proxy's CA included) and the host's
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL if set. Run it where PyPI or your mirror is reachable; copy
# deploy/wheelhouse/ to the build host if that is another machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
image="${1:?usage: $0 BASE_IMAGE (e.g. the tag deploy/offline/base-image.sh prints)}"
certs=()
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  certs=(-v /etc/ssl/certs/ca-certificates.crt:/host-ca.crt:ro -e PIP_CERT=/host-ca.crt)
fi
index=()
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
  if [ -n "${!var:-}" ]; then index+=(-e "$var=${!var}"); fi
done
docker run --rm --network host --user "$(id -u):$(id -g)" -e HOME=/tmp -e PIP_NO_CACHE_DIR=1 \
  "${certs[@]}" "${index[@]}" \
  -v "$PWD/pyproject.toml:/src/pyproject.toml:ro" -v "$PWD/deploy/wheelhouse:/wheelhouse" \
  "$image" sh -euc '
    python3 -m venv /tmp/venv
    # The requirements, read from pyproject.toml: nothing to keep in sync by hand.
    python3 -c "
import tomllib
data = tomllib.load(open(\"/src/pyproject.toml\", \"rb\"))
project = data[\"project\"]
wanted = project[\"dependencies\"] + data[\"build-system\"][\"requires\"]
for extra in (\"redis\", \"uvloop\"):
    wanted += project[\"optional-dependencies\"][extra]
print(chr(10).join(wanted))
" > /tmp/requirements.txt
    /tmp/venv/bin/pip download --quiet --disable-pip-version-check --only-binary=:all: \
      --dest /wheelhouse -r /tmp/requirements.txt
    echo "deploy/wheelhouse: $(ls /wheelhouse | grep -c "\.whl$") wheels for $(python3 -V) on $(uname -m)"
  '
