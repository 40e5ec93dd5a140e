#!/usr/bin/env bash
# Build the tflite_ext images with podman and run a smoke check inside each.
#
#   docker/build.sh                      # both images (full, slim), then the checks
#   docker/build.sh --target slim        # one image
#   docker/build.sh --base local         # skip the registry, use a local Debian base
#   docker/build.sh --no-run             # build only
#   docker/build.sh --run-only           # the checks on images built before
#
# Base image: `--base auto` (default) pulls BASE_IMAGE (a registry image, the Dockerfile's
# default) and, when no registry answers, makes a base from a Debian root file system instead:
# debootstrap --variant=minbase against the mirror in this host's apt sources, with python3 and
# python3-venv, imported with `podman import` (Debian's pip is externally managed, so the
# Dockerfile installs into a venv on either base). The local base is made once and reused.
#
# What this host needs and the script sets up, every run (rerunnable, nothing left in /etc):
#   - podman, runc and debootstrap from apt when missing;
#   - runc, not crun: crun refuses a host with mixed cgroup v1/v2 ("cgroups in hybrid mode
#     not supported");
#   - container ulimits no higher than the host's hard limits (podman's defaults are higher
#     and runc then fails to start the container); both go in a containers.conf of our own,
#     passed as CONTAINERS_CONF;
#   - --network=host, and the host's CA bundle bind-mounted into the build for pip when the
#     host trusts extra CAs (/usr/local/share/ca-certificates: a network that re-signs HTTPS).
#
# Results (build seconds, image sizes, what ran and its exit code) go to
# $WORK/results.txt and to stdout. WORK defaults to /var/tmp/tflite-ext-docker.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BASE_MODE=auto
TARGETS="full slim"
RUN_CHECKS=1
BUILD=1
TAG="${TAG:-localhost/tflite-ext}"
BASE_IMAGE="${BASE_IMAGE:-docker.io/library/python:3.11-slim-bookworm}"
LOCAL_BASE="${LOCAL_BASE:-localhost/tflite-ext-base}"
WORK="${WORK:-/var/tmp/tflite-ext-docker}"
TEST_SUBSET="${TEST_SUBSET:-tests/test_cli.py tests/test_docker.py tests/test_readme.py}"

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --base) BASE_MODE="$2"; shift 2 ;;
    --target) TARGETS="$2"; shift 2 ;;
    --no-run) RUN_CHECKS=0; shift ;;
    --run-only) BUILD=0; shift ;;
    -h|--help) usage 0 ;;
    *) echo "build.sh: unknown argument: $1" >&2; usage 2 ;;
  esac
done
case "$BASE_MODE" in auto|registry|local) ;; *) echo "build.sh: --base auto|registry|local, got: $BASE_MODE" >&2; exit 2 ;; esac
for t in $TARGETS; do
  case "$t" in full|slim) ;; *) echo "build.sh: --target full|slim, got: $t" >&2; exit 2 ;; esac
done

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
mkdir -p "$WORK"
RESULTS="$WORK/results.txt"
log() { echo "[build.sh $(date -u +%H:%M:%S)] $*" >&2; }
record() { echo "$*" >>"$RESULTS"; echo "$*" >&2; }

# --- tools -------------------------------------------------------------------------------
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
if [ "$BASE_MODE" != registry ] && ! command -v debootstrap >/dev/null; then need+=(debootstrap); fi
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]} with apt-get"
  ($SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null
fi

# --- containers.conf: runc, ulimits within the host's ----------------------------------
hard_nofile=$(ulimit -Hn); hard_nproc=$(ulimit -Hu)
[ "$hard_nofile" = unlimited ] && hard_nofile=1048576
[ "$hard_nproc" = unlimited ] && hard_nproc=32768
nofile=$(( hard_nofile < 20000 ? hard_nofile : 20000 ))
nproc=$(( hard_nproc < 32768 ? hard_nproc : 32768 ))
export CONTAINERS_CONF="$WORK/containers.conf"
cat > "$CONTAINERS_CONF" <<EOF
# Written by docker/build.sh (rewritten on every run).
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
PODMAN=(env CONTAINERS_CONF="$CONTAINERS_CONF" podman)
[ -z "$SUDO" ] || PODMAN=("$SUDO" "${PODMAN[@]}")

# --- base image ----------------------------------------------------------------------------
debian_mirror() {  # the first Debian mirror in this host's apt sources (deb822 or one-line)
  local m
  m=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' \
        | grep -v -- '-security' | grep -m1 '/debian/\?$' || true)
  [ -n "$m" ] || m=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        | awk '{print $2}' | grep -v -- '-security' | grep -m1 '/debian/\?$' || true)
  echo "${m:-http://deb.debian.org/debian}"
}

make_local_base() {
  local suite mirror rootfs py
  # shellcheck disable=SC1091
  suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  if "${PODMAN[@]}" image exists "$LOCAL_BASE:$suite"; then
    log "local base $LOCAL_BASE:$suite exists, reused"; echo "$LOCAL_BASE:$suite"; return
  fi
  mirror=$(debian_mirror)
  rootfs="$WORK/rootfs-$suite"
  log "debootstrap --variant=minbase $suite from $mirror into $rootfs"
  $SUDO rm -rf "$rootfs"
  local t0=$SECONDS
  $SUDO debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$suite" "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
  py=$($SUDO chroot "$rootfs" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  case "$py" in 3.10|3.11|3.12|3.13) ;; *)
    echo "build.sh: Debian $suite ships Python $py; tensorflow 2.21 has wheels for 3.10-3.13" >&2; exit 1 ;;
  esac
  {
    echo "deb $mirror $suite main"
    echo "deb $mirror $suite-updates main"
    echo "deb ${mirror%/debian*}/debian-security $suite-security main"
  } | $SUDO tee "$rootfs/etc/apt/sources.list" >/dev/null
  # Lean, as Debian's own slim images are: no documentation but the copyright files, no
  # manual pages, no translations, no apt lists; a dpkg rule keeps later installs lean too.
  # Every path below is inside the root file system: refuse to go on without one.
  case "$rootfs" in /?*/rootfs-*) ;; *) echo "build.sh: bad rootfs path: '$rootfs'" >&2; exit 1 ;; esac
  [ -x "$rootfs/usr/bin/python3" ] || { echo "build.sh: $rootfs is not a root file system" >&2; exit 1; }
  printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
    'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
    'path-exclude /usr/share/locale/*' 'path-include /usr/share/locale/locale.alias' \
    | $SUDO tee "$rootfs/etc/dpkg/dpkg.cfg.d/tflite-ext-slim" >/dev/null
  $SUDO find "$rootfs/usr/share/doc" \( \( -type f ! -name copyright \) -o -type l \) -delete
  $SUDO find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  $SUDO find "$rootfs/usr/share/man" "$rootfs/usr/share/info" -mindepth 1 -delete
  $SUDO rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log
  $SUDO tar -C "$rootfs" --numeric-owner -cf - . | "${PODMAN[@]}" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$LOCAL_BASE:$suite" >/dev/null
  $SUDO rm -rf "$rootfs"
  record "local base: $LOCAL_BASE:$suite (Debian $suite minbase, Python $py, mirror $mirror), $((SECONDS - t0)) s"
  echo "$LOCAL_BASE:$suite"
}

pick_base() {
  if [ "$BASE_MODE" != local ]; then
    if "${PODMAN[@]}" image exists "$BASE_IMAGE" \
       || timeout 120 "${PODMAN[@]}" pull -q "$BASE_IMAGE" >/dev/null 2>"$WORK/pull.log"; then
      echo "$BASE_IMAGE"; return
    fi
    if [ "$BASE_MODE" = registry ]; then
      echo "build.sh: cannot pull $BASE_IMAGE:" >&2; cat "$WORK/pull.log" >&2; exit 1
    fi
    log "no registry ($(tail -c 200 "$WORK/pull.log" | tr '\n' ' ')); making a local Debian base"
  fi
  make_local_base
}

# --- build ---------------------------------------------------------------------------------
build_args=(--network=host -f "$ROOT/docker/Dockerfile")
extra_ca=$(find /usr/local/share/ca-certificates -name '*.crt' 2>/dev/null | head -1 || true)
if [ -n "$extra_ca" ] && [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  # Build-time only: the bundle is mounted for RUN steps and never copied into a layer.
  build_args+=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca/ca-certificates.crt:ro
               --build-arg PIP_CERT=/run/host-ca/ca-certificates.crt)
  log "host trusts extra CAs ($extra_ca ...): its bundle is mounted into the build for pip"
fi

size_of() { "${PODMAN[@]}" image inspect --format '{{.Size}}' "$1"; }
human() { awk -v b="$1" 'BEGIN { printf "%.2f GB (%.0f bytes)", b / 1e9, b }'; }

if [ "$BUILD" = 1 ]; then
  base=$(pick_base)
  record "=== $(date -u +%FT%TZ) base $base, $(nproc) cores, commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
  for t in $TARGETS; do
    log "building $TAG:$t (log: $WORK/build-$t.log)"
    t0=$SECONDS
    if ! "${PODMAN[@]}" build "${build_args[@]}" --build-arg BASE="$base" --target "$t" \
         -t "$TAG:$t" "$ROOT" >"$WORK/build-$t.log" 2>&1; then
      tail -30 "$WORK/build-$t.log" >&2; record "build $t: FAILED after $((SECONDS - t0)) s"; exit 1
    fi
    record "build $t: $((SECONDS - t0)) s; size $(human "$(size_of "$TAG:$t")")"
  done
fi

# --- checks inside the images --------------------------------------------------------------
run_in() {  # run_in TARGET LABEL CMD...: run, tee to a log, record the exit code and time
  local t=$1 label=$2; shift 2
  local t0=$SECONDS rc=0
  "${PODMAN[@]}" run --rm --network=host "$TAG:$t" "$@" >"$WORK/run-$t-$label.log" 2>&1 || rc=$?
  record "run $t: $* -> exit $rc, $((SECONDS - t0)) s; $(grep -E '[0-9]+ (passed|failed)' "$WORK/run-$t-$label.log" | tail -1)"
  tail -5 "$WORK/run-$t-$label.log" >&2
  return 0
}
if [ "$RUN_CHECKS" = 1 ]; then
  for t in $TARGETS; do
    "${PODMAN[@]}" image exists "$TAG:$t" || { echo "build.sh: no image $TAG:$t" >&2; exit 1; }
    run_in "$t" help tflite-ext --help
    run_in "$t" vela vela --version
    run_in "$t" adb adb version
    run_in "$t" demo tflite-ext demo --quick --out /tmp/demo
    if [ "$t" = full ]; then
      # shellcheck disable=SC2086
      run_in "$t" tests python -m pytest -q -p no:cacheprovider $TEST_SUBSET
    fi
  done
  "${PODMAN[@]}" images --filter reference="$TAG" | tee -a "$RESULTS"
fi
