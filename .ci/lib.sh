# Shared by .ci/setup, .ci/test, .ci/demo and .ci/run. Sourced, not run.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The unprivileged user tests and the demo run as when started by root:
# root has no qemu:///session.
TEST_USER="${AGENTVM_TEST_USER:-agentvm-test}"
# Where the test guest is built; outside the checkout so it can be shared and kept warm.
export AGENTVM_TESTGUEST_DIR="${AGENTVM_TESTGUEST_DIR:-/var/tmp/agentvm-testguest}"
# Where the Debian guest disk images (images/debian) are built and cached.
export AGENTVM_DEBIAN_GUEST_DIR="${AGENTVM_DEBIAN_GUEST_DIR:-/var/tmp/agentvm-debian}"

PACKAGES=(
  qemu-system-x86 qemu-utils
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
  libxml2-utils pkg-config dbus openssh-client cpio binutils
  nix-bin age dropbear-bin
  mmdebstrap e2fsprogs fdisk grub-pc-bin
  dosfstools python3-yaml
  libseccomp-dev libcap-ng-dev
)
# Debian 12 has no virtiofsd package; shared folders need the Rust virtiofsd.
VIRTIOFSD_VERSION=1.14.0
VIRTIOFSD_ROOT="${AGENTVM_VIRTIOFSD_ROOT:-/var/tmp/agentvm-virtiofsd}"

say() { printf '\n==> %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Installs the Debian packages that are missing. qemu-utils is pinned to
# bookworm's build because a newer one (from backports) blocks qemu-system-x86.
install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ! command -v qemu-system-x86_64 >/dev/null; then missing+=(qemu-system-x86); fi
  [ "${#missing[@]}" -eq 0 ] && return 0
  say "installing Debian packages: ${missing[*]}"
  as_root apt-get update -q
  local args=()
  for p in "${missing[@]}"; do
    if [ "$p" = qemu-utils ] || [ "$p" = qemu-system-x86 ]; then
      args+=(qemu-system-x86 qemu-utils/bookworm)
    else
      args+=("$p")
    fi
  done
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    --allow-downgrades "${args[@]}"
}

ensure_test_user() {
  [ "$(id -u)" -eq 0 ] || return 0
  if ! id "$TEST_USER" >/dev/null 2>&1; then
    say "creating the unprivileged user $TEST_USER"
    useradd --create-home --shell /bin/bash "$TEST_USER"
  fi
}

# Runs a command as the user that owns the VMs: the caller, or TEST_USER under root.
as_vm_user() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u "$TEST_USER" -- env -u XDG_RUNTIME_DIR -u DBUS_SESSION_BUS_ADDRESS \
      HOME="$(getent passwd "$TEST_USER" | cut -d: -f6)" "$@"
  else
    "$@"
  fi
}

build_testguest() {
  # The build downloads Debian packages, which needs current package lists.
  if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    as_root apt-get update -q
  fi
  say "building the test guest in $AGENTVM_TESTGUEST_DIR"
  "$REPO/images/testguest/build.sh" "$AGENTVM_TESTGUEST_DIR" >&2
  chmod -R a+rX "$AGENTVM_TESTGUEST_DIR"
}

# Builds both variants of the Debian guest disk image (cached by content: a
# rebuild happens only when images/debian or the Debian packages change). As
# root, because mmdebstrap's unprivileged mode needs subuid ranges.
build_debian_guest() {
  if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    as_root apt-get update -q
  fi
  local variant
  for variant in plain cloud; do
    say "building the Debian guest ($variant) in $AGENTVM_DEBIAN_GUEST_DIR"
    local image
    image=$(as_root "$REPO/images/debian/build.sh" --variant "$variant" "$AGENTVM_DEBIAN_GUEST_DIR")
    # The tests (tests/common::debian_image) take the images from here.
    case $variant in
    plain) export AGENTVM_DEBIAN_IMAGE="$image" ;;
    cloud) export AGENTVM_DEBIAN_CLOUD_IMAGE="$image" ;;
    esac
  done
  as_root chmod -R a+rX "$AGENTVM_DEBIAN_GUEST_DIR"
}

# Builds virtiofsd (crates.io, about a minute; kept between runs) unless one
# with --translate-uid is on PATH, and links it into /usr/local/bin.
install_virtiofsd() {
  if command -v virtiofsd >/dev/null && virtiofsd --help 2>&1 | grep -q -- --translate-uid; then
    return 0
  fi
  local bin="$VIRTIOFSD_ROOT/bin/virtiofsd"
  if ! "$bin" --version 2>/dev/null | grep -q "$VIRTIOFSD_VERSION"; then
    say "building virtiofsd $VIRTIOFSD_VERSION into $VIRTIOFSD_ROOT"
    as_root mkdir -p "$VIRTIOFSD_ROOT"
    as_root env PATH="$PATH" CARGO_TARGET_DIR="$VIRTIOFSD_ROOT/target" \
      cargo install --locked --quiet virtiofsd --version "$VIRTIOFSD_VERSION" --root "$VIRTIOFSD_ROOT"
    as_root rm -rf "$VIRTIOFSD_ROOT/target"
  fi
  as_root chmod -R a+rX "$VIRTIOFSD_ROOT"
  as_root ln -sf "$bin" /usr/local/bin/virtiofsd
}

# Under root, the test user must be able to read the checkout (test binaries read
# xml/ and tests/pve/, and run from target/). If it cannot, work on a readable copy.
use_readable_checkout() {
  [ "$(id -u)" -eq 0 ] || return 0
  if as_vm_user test -r "$REPO/Cargo.toml" -a -x "$REPO/src"; then return 0; fi
  local copy=/var/tmp/agentvm-checkout
  say "$TEST_USER cannot read $REPO; using a copy in $copy"
  mkdir -p "$copy"
  (cd "$REPO" && tar --exclude=./target -cf - .) | tar -xf - -C "$copy"
  chmod -R a+rX "$copy"
  REPO="$copy"
}

# Every .nix file of the project must at least parse.
parse_nix_files() {
  say "nix-instantiate --parse on every .nix file"
  local f
  while IFS= read -r f; do
    nix-instantiate --parse "$f" >/dev/null || { echo "does not parse: $f" >&2; return 1; }
  done < <(cd "$REPO" && git ls-files -co --exclude-standard -- '*.nix')
}
