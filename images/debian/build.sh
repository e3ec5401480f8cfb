#!/usr/bin/env bash
# Build a Debian 12 (bookworm) guest disk image: systemd, openssh-server,
# qemu-guest-agent and the cloud kernel on one ext4 partition, booted by
# GRUB (BIOS). Built from Debian packages with mmdebstrap, mke2fs -d and
# grub-mkimage: no loop devices, no mount.
#
# Usage: build.sh [--force] [--variant plain|cloud] [OUTDIR]
#   --variant cloud adds cloud-init. The default is plain.
#   OUTDIR defaults to $AGENTVM_DEBIAN_GUEST_DIR, else /var/tmp/agentvm-debian.
#   Writes OUTDIR/<variant>-<key>.qcow2, where <key> is a hash of this
#   directory and the versions of the packages, and prints its absolute path
#   on stdout. Beside it: <variant>-<key>.vmlinuz, .initrd.img and .cmdline,
#   the image's kernel, initrd and kernel command line, for booting it
#   without GRUB. Everything else goes to stderr. Downloaded packages are
#   kept in OUTDIR/debs-<variant>.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)

log() { printf 'debian-guest: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

force=
variant=plain
outdir=
while (($#)); do
	case $1 in
	--force) force=1 ;;
	--variant)
		(($# >= 2)) || die "--variant needs an argument"
		variant=$2
		shift
		;;
	--variant=*) variant=${1#--variant=} ;;
	-h | --help)
		sed -n '2,17s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
		exit 0
		;;
	-*) die "unknown option: $1" ;;
	*)
		[[ -z $outdir ]] || die "more than one OUTDIR given"
		outdir=$1
		;;
	esac
	shift
done
[[ $variant == plain || $variant == cloud ]] || die "unknown variant: $variant (plain or cloud)"
outdir=${outdir:-${AGENTVM_DEBIAN_GUEST_DIR:-/var/tmp/agentvm-debian}}
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd -P)

suite=bookworm
mirrors=(
	"deb http://deb.debian.org/debian $suite main"
	"deb http://deb.debian.org/debian $suite-updates main"
	"deb http://security.debian.org/debian-security $suite-security main"
)
packages=(
	systemd systemd-sysv udev dbus systemd-resolved libpam-systemd
	openssh-server qemu-guest-agent
	linux-image-cloud-amd64 tiny-initramfs
	e2fsprogs fdisk netbase iproute2 procps
)
case $variant in
plain) uuid=6a1e0c52-8d4e-4f3b-9b1a-0d3b1e6a0001 label_id=0x6a1e0001 ;;
cloud)
	packages+=(cloud-init cloud-guest-utils netplan.io sudo)
	uuid=6a1e0c52-8d4e-4f3b-9b1a-0d3b1e6a0002 label_id=0x6a1e0002
	;;
esac
# What GRUB passes to the kernel (customize.sh writes it into grub.cfg), and
# what the .cmdline output holds for booting without GRUB.
cmdline="root=UUID=$uuid ro console=ttyS0,115200 quiet"
disk_size=2G
grubdir=/usr/lib/grub/i386-pc

for tool in apt-cache mmdebstrap mke2fs sfdisk grub-mkimage qemu-img sha256sum flock; do
	command -v "$tool" >/dev/null || die "$tool not found"
done
[[ -f $grubdir/boot.img ]] || die "$grubdir/boot.img not found (install grub-pc-bin)"

# --- cache key -----------------------------------------------------------------

# The key covers every file here but the README, the candidate versions of
# the packages asked for (a point release or security update changes them)
# and the GRUB build that makes the boot loader.
versions=$(apt-cache policy "${packages[@]}" 2>/dev/null |
	awk '/^[^ ]/ { p = $1 } $1 == "Candidate:" { print p, $2 }')
missing=$(awk '$2 == "(none)" { print $1 }' <<<"$versions")
[[ -z $missing && $(wc -l <<<"$versions") == "${#packages[@]}" ]] ||
	die "no candidate version for: ${missing:-some of ${packages[*]}} (apt-get update?)"
grub_version=$(dpkg-query -W -f='${Version}' grub-pc-bin 2>/dev/null || grub-mkimage --version)
key=$(
	{
		printf 'variant %s\n%s\ngrub %s\n' "$variant" "$versions" "$grub_version"
		cd "$here" && find . -type f ! -name '*.md' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
	} | sha256sum | cut -c1-12
)
output=$outdir/$variant-$key.qcow2
base=${output%.qcow2}
boot_files=("$base.vmlinuz" "$base.initrd.img" "$base.cmdline")

# Cached only if the image and its boot files are all there.
built() {
	local f
	for f in "$output" "${boot_files[@]}"; do
		[[ -f $f ]] || return 1
	done
}
if [[ -z $force ]] && built; then
	printf '%s\n' "$output"
	exit 0
fi

# Concurrent callers (e.g. parallel tests) wait for one build.
exec 9>"$outdir/.lock-$variant"
flock 9
if [[ -z $force ]] && built; then
	printf '%s\n' "$output"
	exit 0
fi

# As root, build in a plain chroot. Otherwise mmdebstrap builds in a user
# namespace (needs subuid/subgid ranges), and whatever has to see the files
# as root-owned runs in such a namespace too.
if [[ $(id -u) == 0 ]]; then
	mode=root
	asroot() { "$@"; }
else
	mode=unshare
	asroot() { mmdebstrap --unshare-helper "$@"; }
fi

started=$SECONDS
debs=$outdir/debs-$variant
mkdir -p "$debs"
work=$(mktemp -d "$outdir/.work-$variant.XXXXXX")
cleanup() {
	[[ -d $work/root ]] && asroot rm -rf "$work/root"
	rm -rf "$work"
}
trap cleanup EXIT
# The user namespace's root needs to get into $work and to write $work/fs.
chmod 0755 "$work"
mkdir -m 0777 "$work/fs"
mkdir "$work/debs"

log "building $variant image $key ($mode mode)"
log "packages: $(tr '\n' ' ' <<<"$versions")"

# --- root file system ---------------------------------------------------------

# Packages downloaded by earlier builds are reused (debs/ is synced into and
# out of the chroot's apt cache).
mmdebstrap --mode="$mode" --variant=minbase --format=directory \
	--include="$(
		IFS=,
		echo "${packages[*]}"
	)" \
	--skip=essential/unlink --skip=download/empty \
	--setup-hook='mkdir -p "$1/var/cache/apt/archives"' \
	--setup-hook="sync-in '$debs' /var/cache/apt/archives" \
	--essential-hook="'$here/customize.sh' essential \"\$1\" $variant $uuid '$cmdline'" \
	--customize-hook="sync-out /var/cache/apt/archives '$work/debs'" \
	--customize-hook="'$here/customize.sh' customize \"\$1\" $variant $uuid '$cmdline'" \
	"$suite" "$work/root" "${mirrors[@]}" >&2 ||
	die "mmdebstrap failed"
# Keep only the packages this build used.
rm -rf "$debs.old"
mv "$debs" "$debs.old"
mv "$work/debs" "$debs"
rm -rf "$debs.old" "$debs/partial" "$debs/lock"
cp "$work/root/etc/agentvm-image" "$work/manifest"

# The kernel and initrd that grub.cfg boots (/vmlinuz and /initrd.img are
# symlinks into /boot, resolved inside the root, not on the host), copied out
# for booting the image directly. Read as (namespace) root: in unshare mode
# they belong to a subordinate uid and may not be world-readable.
in_root_path() {
	local path=$1 target n
	for ((n = 0; n < 8; n++)); do
		[[ -L $work/root$path ]] || break
		target=$(readlink "$work/root$path")
		if [[ $target == /* ]]; then
			path=$target
		else
			path=$(dirname "$path")/$target
		fi
		path=/${path#/}
	done
	[[ -f $work/root$path ]] || die "$1 in the image is not a file (it resolves to $path)"
	printf '%s\n' "$work/root$path"
}
asroot cat "$(in_root_path /vmlinuz)" >"$work/vmlinuz"
asroot cat "$(in_root_path /initrd.img)" >"$work/initrd.img"
printf '%s\n' "$cmdline" >"$work/cmdline"

# --- disk image ---------------------------------------------------------------

# MBR, one Linux partition from 1 MiB to the end. The gap before it holds
# GRUB's core.img.
part_start=2048
disk_bytes=$(numfmt --from=iec "$disk_size")
fs_bytes=$((disk_bytes - part_start * 512))

# metadata_csum_seed and orphan_file are newer than GRUB 2.06's ext2 driver.
log "mke2fs -d ($(du -sh "$work/root" 2>/dev/null | cut -f1) of files)"
asroot mke2fs -q -t ext4 -O ^metadata_csum_seed,^orphan_file -U "$uuid" -L root \
	-E root_owner=0:0,hash_seed="$uuid" -d "$work/root" \
	"$work/fs/root.ext4" "$((fs_bytes / 1024))k" >&2
asroot rm -rf "$work/root"

raw=$work/disk.raw
truncate -s "$disk_bytes" "$raw"
sfdisk -q "$raw" <<EOF
label: dos
label-id: $label_id
unit: sectors

start=$part_start, type=83, bootable
EOF
dd if="$work/fs/root.ext4" of="$raw" bs=1M seek=1 conv=notrunc,sparse status=none
rm -f "$work/fs/root.ext4"

# GRUB for BIOS without grub-install: core.img carries the modules it needs
# and finds the root file system by UUID. boot.img (the first 440 bytes of
# the MBR, before the disk signature and partition table) loads core.img's
# first sector from sector 1, which loads the rest from sector 2 on: both
# are the defaults that boot.img and grub-mkimage write.
# GRUB also writes to the serial port, so that a boot stuck in GRUB shows in
# the VM's serial log (what `agentvm console` and a failed `up` show), not
# only on its screen.
cat >"$work/early.cfg" <<EOF
serial --unit=0 --speed=115200
terminal_output serial console
echo "GRUB: looking for the root file system $uuid"
search --no-floppy --fs-uuid --set=root $uuid
set prefix=(\$root)/boot/grub
EOF
grub-mkimage -O i386-pc -d "$grubdir" -c "$work/early.cfg" -p /boot/grub \
	-o "$work/core.img" \
	biosdisk part_msdos ext2 search search_fs_uuid normal configfile linux echo test boot \
	serial terminal
core_sectors=$((($(stat -c %s "$work/core.img") + 511) / 512))
((core_sectors < part_start - 1)) || die "core.img ($core_sectors sectors) does not fit before the partition"
dd if="$grubdir/boot.img" of="$raw" bs=440 count=1 conv=notrunc status=none
dd if="$work/core.img" of="$raw" bs=512 seek=1 conv=notrunc status=none

log "qemu-img convert"
qemu-img convert -c -f raw -O qcow2 "$raw" "$work/disk.qcow2"
rm -f "$raw"
chmod 0644 "$work/disk.qcow2" "$work/manifest" "$work/vmlinuz" "$work/initrd.img" "$work/cmdline"

mv -f "$work/manifest" "$base.packages"
for f in vmlinuz initrd.img cmdline; do
	mv -f "$work/$f" "$base.$f"
done
mv -f "$work/disk.qcow2" "$output"
# Outputs of earlier keys of this variant.
for old in "$outdir/$variant"-*.qcow2 "$outdir/$variant"-*.packages \
	"$outdir/$variant"-*.vmlinuz "$outdir/$variant"-*.initrd.img "$outdir/$variant"-*.cmdline; do
	[[ $old == "${output%.qcow2}".* ]] || rm -f "$old"
done
log "$output: $(($(stat -c %s "$output") / 1048576)) MiB, built in $((SECONDS - started)) s"
printf '%s\n' "$output"
