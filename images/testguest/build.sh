#!/usr/bin/env bash
# Build the test guest: the Debian bookworm cloud kernel plus a small
# initramfs (busybox, dropbear, qemu-guest-agent) assembled only from Debian
# packages, and a blank 64 MiB disk.
#
# Usage: build.sh [--force] [OUTDIR]
#   OUTDIR defaults to $AGENTVM_TESTGUEST_DIR, else <repo>/target/testguest.
#   Writes OUTDIR/vmlinuz, OUTDIR/initrd.img, OUTDIR/disk.qcow2 and prints
#   their absolute paths on stdout, one per line. Everything else goes to
#   stderr. Downloaded packages are kept in OUTDIR/debs.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo=$(cd "$here/../.." && pwd -P)

log() { printf 'testguest: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

force=
outdir=
for arg in "$@"; do
	case $arg in
	--force) force=1 ;;
	-h | --help)
		sed -n '2,10s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
		exit 0
		;;
	-*) die "unknown option: $arg" ;;
	*)
		[[ -z $outdir ]] || die "more than one OUTDIR given"
		outdir=$arg
		;;
	esac
done
outdir=${outdir:-${AGENTVM_TESTGUEST_DIR:-$repo/target/testguest}}
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd -P)
outputs=("$outdir/vmlinuz" "$outdir/initrd.img" "$outdir/disk.qcow2")

# Fresh = every output exists and is newer than every file in this directory.
is_fresh() {
	local f
	for f in "${outputs[@]}"; do
		[[ -f $f ]] || return 1
		[[ -z $(find "$here" -type f -newer "$f" -print -quit) ]] || return 1
	done
}

if [[ -z $force ]] && is_fresh; then
	printf '%s\n' "${outputs[@]}"
	exit 0
fi

# Concurrent callers (e.g. parallel tests) wait for one build.
exec 9>"$outdir/.lock"
flock 9
if [[ -z $force ]] && is_fresh; then
	printf '%s\n' "${outputs[@]}"
	exit 0
fi

for tool in apt-cache apt-get dpkg-deb readelf cpio gzip qemu-img; do
	command -v "$tool" >/dev/null || die "$tool not found"
done

debs=$outdir/debs
work=$outdir/.work
mkdir -p "$debs"
rm -rf "$work"
mkdir -p "$work/pkgs"
trap 'rm -rf "$work"' EXIT

apt_opts=()
# As root, apt drops privileges to _apt for downloads, which then cannot
# write into arbitrary directories.
[[ $(id -u) == 0 ]] && apt_opts+=(-o APT::Sandbox::User=root)

# --- packages --------------------------------------------------------------

# apt is slow to start (it re-reads the package lists every time), so query
# it in batches.
apt_depends() {
	apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
		--no-replaces --no-enhances "$@" |
		awk '/^[^ ]/ { p = $1 } $1 ~ /^\|?(Pre)?Depends:$/ && $2 !~ /^</ { print p, $2 }'
}
# "package section version architecture" of the candidate versions.
apt_info() {
	apt-cache show --no-all-versions "$@" | awk '
		$1 == "Package:" { p = $2 } $1 == "Section:" { s = $2 }
		$1 == "Version:" { v = $2 } $1 == "Architecture:" { a = $2 }
		/^$/ && p != "" { print p, s, v, a; p = "" }
		END { if (p != "") print p, s, v, a }'
}

kernel_pkg=$(apt_depends linux-image-cloud-amd64 | awk '$2 ~ /^linux-image-[0-9]/ { print $2 }')
[[ $kernel_pkg =~ ^linux-image-[^[:space:]]+$ ]] || die "cannot resolve linux-image-cloud-amd64"

# Shared libraries: the closure over dependencies in the "libs" section of
# the dynamically linked packages (this leaves out e.g. init-system-helpers
# and perl). Only the sonames actually NEEDED get copied later.
declare -A deps=() section=() version=() arch=()
while read -r p d; do
	deps[$p]+=" $d"
done < <(apt_depends --recurse dropbear-bin qemu-guest-agent)
while read -r p s v a; do
	section[$p]=$s version[$p]=$v arch[$p]=$a
done < <(apt_info "$kernel_pkg" busybox-static $(printf '%s\n' "${!deps[@]}" ${deps[*]} | sort -u))

libpkgs=()
declare -A seen=()
queue=(dropbear-bin qemu-guest-agent)
while ((${#queue[@]})); do
	p=${queue[0]}
	queue=("${queue[@]:1}")
	for d in ${deps[$p]:-}; do
		[[ -z ${seen[$d]:-} && ${section[$d]:-} =~ ^([a-z-]+/)?libs$ ]] || continue
		seen[$d]=1
		libpkgs+=("$d")
		queue+=("$d")
	done
done

packages=("$kernel_pkg" busybox-static dropbear-bin qemu-guest-agent "${libpkgs[@]}")
missing=()
for p in "${packages[@]}"; do
	[[ -n ${version[$p]:-} ]] || die "package $p not found (apt-get update?)"
	deb=$debs/${p}_${version[$p]//:/%3a}_${arch[$p]}.deb
	[[ -f $deb ]] || missing+=("$p=${version[$p]}")
done
if ((${#missing[@]})); then
	log "downloading ${missing[*]}"
	(cd "$debs" && apt-get "${apt_opts[@]}" download "${missing[@]}") >&2 ||
		die "download failed"
fi
: >"$work/packages.txt"
for p in "${packages[@]}"; do
	deb=$debs/${p}_${version[$p]//:/%3a}_${arch[$p]}.deb
	[[ -f $deb ]] || die "download of $p did not produce $deb"
	dpkg-deb -x "$deb" "$work/pkgs/$p"
	printf '%s %s\n' "$p" "${version[$p]}" >>"$work/packages.txt"
done
log "packages: $(tr '\n' ' ' <"$work/packages.txt")"

# --- root filesystem ---------------------------------------------------------

root=$work/root
libdir=usr/lib/x86_64-linux-gnu
mkdir -p "$root"/{usr/bin,usr/sbin,$libdir,usr/lib64,dev,proc,sys,run,tmp,root,mnt,var}
mkdir -p "$root"/etc/{dropbear,ssh,acpi/PWRF}
for d in bin sbin lib lib64; do
	ln -s "usr/$d" "$root/$d"
done
ln -s ../run "$root/var/run"
chmod 0700 "$root/root"
chmod 1777 "$root/tmp"

pkgdir=$work/pkgs
install -m 0755 "$pkgdir/busybox-static/bin/busybox" "$root/usr/bin/busybox"
install -m 0755 "$pkgdir/dropbear-bin/usr/sbin/dropbear" "$root/usr/sbin/dropbear"
install -m 0755 "$pkgdir/dropbear-bin/usr/bin/dropbearkey" "$root/usr/bin/dropbearkey"
install -m 0755 "$pkgdir/qemu-guest-agent/usr/sbin/qemu-ga" "$root/usr/sbin/qemu-ga"
install -m 0755 "$here/shutdown" "$root/usr/sbin/shutdown"
install -m 0755 "$here/init" "$root/init"

# Equivalent of "busybox --install -s", done at build time.
while read -r applet; do
	name=${applet##*/}
	case $applet in
	sbin/* | usr/sbin/*) dir=usr/sbin ;;
	bin/* | usr/bin/*) dir=usr/bin ;;
	*) continue ;;
	esac
	[[ -e $root/$dir/$name || -e $root/usr/bin/$name || -e $root/usr/sbin/$name ]] ||
		ln -s /usr/bin/busybox "$root/$dir/$name"
done < <("$root/usr/bin/busybox" --list-full)

# Copy every NEEDED library (recursively) out of the extracted packages;
# fail if one is not provided by them.
find_lib() {
	local d
	for d in "$pkgdir"/*/lib/x86_64-linux-gnu "$pkgdir"/*/usr/lib/x86_64-linux-gnu; do
		[[ -e $d/$1 ]] && { printf '%s\n' "$d/$1"; return 0; }
	done
	return 1
}
needed() { readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'; }
interp() { readelf -l "$1" | sed -n 's/.*Requesting program interpreter: \(.*\)\]$/\1/p'; }

elfs=(usr/sbin/dropbear usr/bin/dropbearkey usr/sbin/qemu-ga)
# glibc dlopen()s libgcc_s (thread cancellation), so it is not in NEEDED.
cp -L "$(find_lib libgcc_s.so.1)" "$root/$libdir/libgcc_s.so.1"
elfs+=("$libdir/libgcc_s.so.1")
while ((${#elfs[@]})); do
	f=${elfs[0]}
	elfs=("${elfs[@]:1}")
	for so in $(needed "$root/$f"); do
		[[ -e $root/$libdir/$so ]] && continue
		src=$(find_lib "$so") || die "$so (needed by $f) is in none of: ${libpkgs[*]}"
		cp -L "$src" "$root/$libdir/$so"
		elfs+=("$libdir/$so")
	done
done
ldso=$(interp "$root/usr/sbin/qemu-ga")
[[ $ldso == /lib64/ld-linux-x86-64.so.2 ]] || die "unexpected ELF interpreter $ldso"
cp -L "$(find_lib ld-linux-x86-64.so.2)" "$root/$libdir/ld-linux-x86-64.so.2"
ln -s ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$root/usr/lib64/ld-linux-x86-64.so.2"
for f in "$root"/usr/bin/* "$root"/usr/sbin/* "$root/$libdir"/*; do
	[[ -f $f && ! -L $f ]] || continue
	[[ $(head -c4 "$f") == $'\x7fELF' ]] || continue
	for so in $(needed "$f"); do
		[[ -e $root/$libdir/$so ]] || die "${f#"$root"/} needs $so, which is missing"
	done
	i=$(interp "$f")
	[[ -z $i || -e $root$i ]] || die "${f#"$root"/} needs interpreter $i, which is missing"
done
log "libraries: $(cd "$root/$libdir" && echo *)"

# --- kernel and modules ------------------------------------------------------

kdir=$(echo "$pkgdir/$kernel_pkg"/lib/modules/*)
kver=${kdir##*/}
[[ -d $kdir/kernel && -f $pkgdir/$kernel_pkg/boot/vmlinuz-$kver ]] ||
	die "unexpected layout of $kernel_pkg"
mkdir -p "$root/lib/modules/$kver"

declare -A modseen=()
modorder=()
add_module() {
	local name=${1//-/_} file dep
	[[ -z ${modseen[$name]:-} ]] || return 0
	modseen[$name]=1
	if grep -Eq "/(${name}|${name//_/-})\.ko$" "$kdir/modules.builtin"; then
		return 0
	fi
	file=$(find "$kdir/kernel" \( -name "$name.ko" -o -name "${name//_/-}.ko" \) -print -quit)
	[[ -n $file ]] || die "module $name not found in $kernel_pkg"
	for dep in $(tr '\0' '\n' <"$file" | sed -n 's/^depends=//p' | tr ',' ' '); do
		add_module "$dep"
	done
	cp "$file" "$root/lib/modules/$kver/$name.ko"
	modorder+=("$name")
}
# button + evdev: ACPI power button events for acpid. qemu_fw_cfg: systemd
# credentials QEMU passes through fw_cfg (the env). virtiofs: shared folders.
for m in virtio_pci virtio_net virtio_blk virtio_console virtio_rng button evdev qemu_fw_cfg virtiofs; do
	add_module "$m"
done
printf '%s\n' "${modorder[@]}" >"$root/etc/modules.load"
log "kernel $kver, modules: ${modorder[*]}"

# --- configuration -----------------------------------------------------------

cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
tty:x:5:
nogroup:x:65534:
EOF
printf '/bin/sh\n' >"$root/etc/shells"
cat >"$root/etc/nsswitch.conf" <<'EOF'
passwd: files
group: files
shadow: files
hosts: files dns
EOF
printf 'testguest\n' >"$root/etc/hostname"
printf '127.0.0.1 localhost\n10.0.2.15 testguest\n' >"$root/etc/hosts"
printf 'nameserver 10.0.2.3\n' >"$root/etc/resolv.conf"
cat >"$root/etc/os-release" <<'EOF'
PRETTY_NAME="agentvm test guest (Debian 12 packages)"
NAME="agentvm-testguest"
ID=agentvm-testguest
ID_LIKE=debian
VERSION_ID="12"
EOF
cp "$work/packages.txt" "$root/etc/testguest-packages"
# busybox init takes over as PID 1 once /init has started the services.
cat >"$root/etc/inittab" <<'EOF'
::askfirst:/bin/cttyhack /bin/sh -l
::ctrlaltdel:/sbin/reboot -f
::shutdown:/bin/sync
EOF
cat >"$root/etc/profile" <<'EOF'
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
EOF
printf '#!/bin/sh\nexec /sbin/shutdown -h -P +0 "power button pressed"\n' \
	>"$root/etc/acpi/PWRF/00000080"
chmod 0755 "$root/etc/acpi/PWRF/00000080"

# --- initramfs -----------------------------------------------------------------

# One newc cpio entry for a character device; the kernel opens /dev/console
# before running /init, and mknod would need root.
newc_chardev() {
	local name=$1 mode=$2 major=$3 minor=$4 ino=$5
	local namesize=$((${#name} + 1))
	printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
		"$ino" $((0020000 | mode)) 0 0 1 0 0 0 0 "$major" "$minor" "$namesize" 0
	printf '%s\0' "$name"
	head -c $(((4 - (110 + namesize) % 4) % 4)) /dev/zero
}
newc_trailer() {
	printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
		0 0 0 0 1 0 0 0 0 0 0 11 0
	printf 'TRAILER!!!\0'
	head -c 3 /dev/zero
}

{
	(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet)
	newc_chardev dev/console 0600 5 1 900001
	newc_trailer
} | gzip -6 -n >"$work/initrd.img"

cp "$pkgdir/$kernel_pkg/boot/vmlinuz-$kver" "$work/vmlinuz"
qemu-img create -q -f qcow2 "$work/disk.qcow2" 64M

cp "$work/packages.txt" "$outdir/packages.txt"
for f in vmlinuz initrd.img disk.qcow2; do
	mv -f "$work/$f" "$outdir/$f"
done
log "initrd.img $(($(stat -c %s "$outdir/initrd.img") / 1024)) KiB, vmlinuz $(($(stat -c %s "$outdir/vmlinuz") / 1024)) KiB"
printf '%s\n' "${outputs[@]}"
