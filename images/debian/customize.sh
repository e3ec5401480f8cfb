#!/usr/bin/env bash
# mmdebstrap hook of build.sh, run outside the chroot as (namespace) root.
#   customize.sh essential ROOT VARIANT UUID CMDLINE
#     after the essential packages: copy rootfs/common and rootfs/VARIANT
#     into ROOT, before the kernel, initramfs-tools and ssh are installed.
#   customize.sh customize ROOT VARIANT UUID CMDLINE
#     after all packages: boot loader configuration (GRUB passes CMDLINE to
#     the kernel), units, and removal of what must differ between machines
#     (host keys, machine-id).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
phase=$1 root=$2 variant=$3 uuid=$4 cmdline=$5

log() { printf 'debian-guest: %s\n' "$*" >&2; }

# Files are installed 0644, or 0755 if executable in the checkout; owned by root.
copy_tree() {
	local src=$1 f
	[[ -d $src ]] || return 0
	while IFS= read -r -d '' f; do
		if [[ -x $src/$f ]]; then
			install -D -m 0755 "$src/$f" "$root/$f"
		else
			install -D -m 0644 "$src/$f" "$root/$f"
		fi
	done < <(cd "$src" && find . -type f -print0)
}

in_root() { chroot "$root" "$@"; }

case $phase in
essential)
	copy_tree "$here/rootfs/common"
	copy_tree "$here/rootfs/$variant"
	exit 0
	;;
customize) ;;
*)
	log "unknown phase $phase"
	exit 1
	;;
esac

printf 'debian\n' >"$root/etc/hostname"
cat >"$root/etc/hosts" <<'HOSTS'
127.0.0.1	localhost
127.0.1.1	debian
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
HOSTS
# No fsck at boot (pass 0): it would wait for udev to announce the disk,
# which is slow under emulation; the ext4 journal covers unclean shutdowns.
cat >"$root/etc/fstab" <<FSTAB
# <file system>	<mount point>	<type>	<options>	<dump>	<pass>
UUID=$uuid	/	ext4	errors=remount-ro	0	0
FSTAB

# The kernel's postinst keeps /vmlinuz and /initrd.img pointing at the newest
# kernel, so this stays valid across kernel upgrades in the guest.
for f in vmlinuz initrd.img; do
	[[ -e $root/$f ]] || {
		log "/$f missing after the kernel's installation"
		exit 1
	}
done
mkdir -p "$root/boot/grub"
cat >"$root/boot/grub/grub.cfg" <<GRUB
# Written by hand at image build time (images/debian/build.sh in agentvm);
# no update-grub here. GRUB's core.img finds this file by the root file
# system's UUID and loads it with the modules built into core.img.
search --no-floppy --fs-uuid --set=root $uuid
echo "GRUB: loading /vmlinuz and /initrd.img"
linux /vmlinuz $cmdline
initrd /initrd.img
boot
GRUB

# Where the env goes when there is no credential: root's alone from the
# start, also for cloud-init, which may write it before systemd-tmpfiles
# (etc/tmpfiles.d/agentvm-env.conf) has run.
install -d -m 0700 -o root -g root "$root/etc/agentvm"

# systemd-resolved's postinst points /etc/resolv.conf at its stub resolver.
ln -sfn ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"

units=(systemd-networkd.service systemd-resolved.service ssh.service
	agentvm-env.service agentvm-env.path agentvm-ssh-hostkeys.service)
[[ $variant == plain ]] && units+=(agentvm-growroot.service)
in_root systemctl enable "${units[@]}"
# Periodic jobs a short-lived VM does not want (masked: first-boot presets
# must not bring them back).
masked=()
for u in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
	e2scrub_all.timer e2scrub_reap.service fstrim.timer man-db.timer \
	systemd-repart.service; do
	[[ -e $root/lib/systemd/system/$u ]] && masked+=("$u")
done
((${#masked[@]} == 0)) || in_root systemctl mask "${masked[@]}"

# What makes a machine unique is created at its first boot.
rm -f "$root"/etc/ssh/ssh_host_*
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id" "$root/var/lib/systemd/random-seed"
rm -rf "$root"/var/lib/cloud/*

{
	printf 'variant=%s\nfs_uuid=%s\n' "$variant" "$uuid"
	in_root dpkg-query -W -f='${Package} ${Version}\n'
} >"$root/etc/agentvm-image"
