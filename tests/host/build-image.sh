#!/usr/bin/env bash
# Build the test-host VM's root image (called by scripts/test-host; the image is cached and
# rebuilt when this file, scripts/setup.sh or pyproject.toml changes).
#   tests/host/build-image.sh PROJECT_DIR OUT_DIR WORK_DIR
# OUT_DIR gets root.img (ext4, made from a directory by mkfs.ext4 -d: no loop device, no
# mount), vmlinuz and initrd.img: Debian 12's own kernel (linux-image-amd64), installed in the
# root by apt so its modules (wireguard.ko, nf_flow_table*.ko, mac80211_hwsim.ko) and the
# initramfs (virtio_blk and ext4 are modules in Debian's kernel) come from Debian's packages.
# The project is installed by the README's own set-up step, scripts/setup.sh, run in the root
# with chroot (it fetches its packages and the venv's wheels then, so the VM needs no network).
# What this relies on (initramfs, disk order, the proxy CA, mkfs.ext4 -d) was measured:
# docs/field-notes.md, "qemu and Debian's kernel".
set -euo pipefail
project=$1 out=$2 work=$3
mkdir -p "$work"
root="$work/root"
mirror=http://deb.debian.org/debian
# the kernel and what a systemd boot needs; setup.sh installs the rest
inc=systemd,systemd-sysv,udev,kmod,dbus,linux-image-amd64,initramfs-tools,zstd,iproute2,procps,python3,ca-certificates,tar
customize="$work/customize.sh"
cat >"$customize" <<'HOOK'
#!/usr/bin/env bash
set -euo pipefail
r=$1 project=$2
install -d "$r/opt/netstack"
git -C "$project" archive HEAD | tar -x -C "$r/opt/netstack"
# the README's set-up step, in the root (mmdebstrap has mounted /proc, /sys, /dev there).
# While it runs the root trusts what the host trusts (a host whose HTTPS goes through an
# intercepting proxy has that CA in its bundle: pip needs it); Debian's bundle is put back.
bundle=etc/ssl/certs/ca-certificates.crt
cp "$r/$bundle" "$r/$bundle.debian"
cp /"$bundle" "$r/$bundle"
chroot "$r" /opt/netstack/scripts/setup.sh
mv "$r/$bundle.debian" "$r/$bundle"
printf 'LABEL=nstroot / ext4 rw,noatime 0 1\n' >"$r/etc/fstab"
# the boot runner: extracts the run's input disk (a tar of the project at HEAD) and runs
# tests/host/vm-run.sh from it, so a change of the tests needs no new image
cat >"$r/usr/local/sbin/netstack-test-host-boot" <<'EOS'
#!/bin/sh
echo "NETSTACK-TEST-HOST: booted $(uname -r) pid1=$(cat /proc/1/comm)" >/dev/ttyS0
udevadm settle -t 30 || true
mkdir -p /run/nst-in
tar -x -C /run/nst-in -f /dev/disk/by-id/virtio-nstin
exec /bin/sh /run/nst-in/netstack/tests/host/vm-run.sh
EOS
chmod 755 "$r/usr/local/sbin/netstack-test-host-boot"
cat >"$r/etc/systemd/system/netstack-test-host.service" <<'EOS'
[Unit]
Description=netstack test-host runner (scripts/test-host)
ConditionKernelCommandLine=netstack.test=1
After=basic.target systemd-udev-settle.service
# [Unit] settings (in [Service] systemd 252 ignored them: docs/field-notes.md); vm-run.sh
# powers off itself too, and turns these off for a boot that reboots
FailureAction=poweroff-force
SuccessAction=poweroff-force
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/netstack-test-host-boot
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TimeoutStartSec=infinity
[Install]
WantedBy=multi-user.target
EOS
chroot "$r" systemctl enable netstack-test-host.service
# a quiet, quick boot: no login on the console, no timers fetching anything
chroot "$r" systemctl mask serial-getty@ttyS0.service getty@tty1.service \
  apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer
HOOK
chmod 755 "$customize"
mmdebstrap --mode=root --variant=apt --include="$inc" \
  --customize-hook="\"$customize\" \"\$1\" \"$project\"" \
  bookworm "$root" \
  "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
  "deb http://deb.debian.org/debian-security bookworm-security main"
# mmdebstrap copies the host's hostname and resolv.conf in; the VM has its own (a host
# always has a resolv.conf: `ip netns exec` binds /etc/netns/NS/resolv.conf over it)
echo netstack-vm >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 netstack-vm\n' >"$root/etc/hosts"
printf '# scripts/test-host: the VM has no network\n' >"$root/etc/resolv.conf"
cp "$root"/boot/vmlinuz-* "$out/vmlinuz"
cp "$root"/boot/initrd.img-* "$out/initrd.img"
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*_Packages
used=$(du -sm "$root" | cut -f1)
truncate -s "$(( (used * 2 + 2048) ))M" "$out/root.img"
mkfs.ext4 -q -F -L nstroot -d "$root" "$out/root.img"
