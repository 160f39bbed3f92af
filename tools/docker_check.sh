#!/usr/bin/env bash
# Build the Docker image and run the pipeline in it on the smoke preset, killing it once mid-run
# with SIGKILL (as a terminated instance would) and checking that a second run finishes the job.
#
#   tools/docker_check.sh                 # official python:3.11-slim-bookworm base
#   BASE_IMAGE=stand-in tools/docker_check.sh
#
# BASE_IMAGE=stand-in builds the base from Debian bookworm's own packages (debootstrap, python3,
# python3-pip, python-is-python3) for machines that reach Debian's and PyPI's mirrors but not
# Docker Hub; every other line of the Dockerfile is then exercised unchanged. Needs a running
# Docker engine and root (for debootstrap); downloads TensorFlow with its CUDA wheels (~3 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-worldmodels}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ "$BASE_IMAGE" = stand-in ]; then
    BASE_IMAGE=worldmodels-base:bookworm-py311
    if ! docker image inspect "$BASE_IMAGE" > /dev/null 2>&1; then
        echo "== building the stand-in base image $BASE_IMAGE from Debian bookworm"
        debootstrap --variant=minbase --include=python3,python3-pip,python-is-python3,ca-certificates \
            bookworm "$WORK/rootfs" http://deb.debian.org/debian > "$WORK/debootstrap.log"
        # The official image's pip installs into the system Python; Debian's refuses (PEP 668).
        # The host's CA bundle goes in too, so that pip works behind a TLS-intercepting proxy
        # (Debian's pip trusts the system bundle).
        cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
        rm -f "$WORK"/rootfs/usr/lib/python3*/EXTERNALLY-MANAGED
        rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
        tar -C "$WORK/rootfs" -c . | docker import - "$BASE_IMAGE" > /dev/null
        rm -rf "$WORK/rootfs"
    fi
fi

echo "== docker build (base $BASE_IMAGE)"
start=$(date +%s)
docker build --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE" . > "$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; exit 1; }
echo "   built in $(( $(date +%s) - start )) s; image size $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.1f GB", $1/1e9}')"

echo "== editing the code does not reinstall the packages"
cp -r . "$WORK/edited" && rm -rf "$WORK/edited/.venv" "$WORK/edited/.git"
echo "# an edit" >> "$WORK/edited/config.py"
docker build --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE-edited" "$WORK/edited" > "$WORK/rebuild.log" 2>&1
grep -A1 "RUN pip install" "$WORK/rebuild.log" | grep -q "Using cache" \
    || { echo "the package layer was rebuilt after a code edit"; tail -20 "$WORK/rebuild.log"; exit 1; }
docker rmi "$IMAGE-edited" > /dev/null
echo "   package layer reused"

echo "== the image runs as a non-root user, headless, and sees these devices"
docker run --rm "$IMAGE" sh -c 'id -u' | grep -qx 1000
docker run --rm "$IMAGE" python -c "from worldmodels.devices import describe_devices; print('  ', describe_devices())"

DATA="$WORK/data"
mkdir -p "$DATA" && chown 1000:1000 "$DATA"
echo "== smoke pipeline in the container, SIGKILLed once stage 2 has started"
docker run -d --name wm_check -v "$DATA:/app/data" "$IMAGE" python run_pipeline.py --preset smoke > /dev/null
for _ in $(seq 600); do
    [ -d "$DATA/vae" ] && break
    sleep 1
done
docker kill wm_check > /dev/null && docker rm wm_check > /dev/null
echo "   killed with $(ls "$DATA/rollouts" | grep -c '^episode_') episode(s) recorded; rerunning"
docker run --rm -v "$DATA:/app/data" "$IMAGE" python run_pipeline.py --preset smoke > "$WORK/run.log" 2>&1 \
    || { tail -40 "$WORK/run.log"; exit 1; }
for f in vae/metrics.json rnn/metrics.json controller/metrics.json; do
    [ -s "$DATA/$f" ] || { echo "missing $f"; tail -40 "$WORK/run.log"; exit 1; }
done
grep -m1 -i "already" "$WORK/run.log" | sed 's/^/   /' || true
echo "== OK: image built, pipeline resumed after SIGKILL and finished (controller: $(python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(f\"{m['mean']:.1f} +- {m['std']:.1f} over {m['episodes']} episodes\")" "$DATA/controller/metrics.json"))"
