#!/usr/bin/env bash
# Check the Debian packages for real (CI runs this from .ci/run; needs root):
#
#   bash packaging/check.sh target/debian/lorastream_*_amd64.deb [arm64.deb armhf.deb]
#
# 1. Every package: its control fields, its file list (dpkg-deb -c), the binary's architecture
#    (and `--version` of the ARM ones under qemu-user), maintainer scripts identical for all
#    architectures.
# 2. The amd64 package in a throw-away Debian bookworm root (debootstrap, cached in
#    $LORASTREAM_PKG_ROOT_CACHE): dpkg runs the maintainer scripts for real: install, upgrade
#    to a bumped version (an edited config and the store survive), remove (config and store
#    kept), purge (both gone), install again.
# 3. The amd64 package under systemd as PID 1 (systemd-nspawn boots that root): the service is
#    enabled and active (Type=notify: READY=1 arrived), `lorastream simulate` puts uplinks into
#    the journal through the hardened unit, `systemctl reload` keeps it running, a stopped
#    daemon (SIGSTOP) misses its watchdog keep-alives and systemd restarts it, and
#    `systemd-analyze security` rates the installed unit at most 2.0.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
[ "$(id -u)" -eq 0 ] || { echo "packaging/check.sh needs root (chroot, dpkg, nspawn)" >&2; exit 1; }
[ "$#" -ge 1 ] || { echo "usage: $0 AMD64.deb [OTHER.deb ...]" >&2; exit 2; }

step() { printf '\n---- %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }
fail() { echo "packaging/check.sh: FAIL: $*" >&2; exit 1; }
check() { local what="$1"; shift; if "$@"; then echo "ok: $what"; else fail "$what"; fi; }

amd64=""
for deb in "$@"; do
  [ -f "$deb" ] || fail "$deb: no such file"
  [ "$(dpkg-deb -f "$deb" Architecture)" = amd64 ] && amd64="$(readlink -f "$deb")"
done
[ -n "$amd64" ] || fail "no amd64 package among: $*"

# ---- 1. static checks ------------------------------------------------------------------------
work="$(mktemp -d /var/tmp/lorastream-pkgcheck.XXXXXX)"
cleanup() {
  [ -n "${nspawn_pid:-}" ] && kill "$nspawn_pid" 2>/dev/null && wait "$nspawn_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

first_scripts=""
for deb in "$@"; do
  arch="$(dpkg-deb -f "$deb" Architecture)"
  step "package $(basename "$deb"): $(stat -c %s "$deb") bytes"
  dpkg-deb -f "$deb" Package Version Architecture Depends Installed-Size
  dpkg-deb -c "$deb" | awk '{print $1, $2, $NF}' | tee "$work/contents-$arch"
  for f in ./usr/bin/lorastream ./etc/lorastream/lorastream.toml ./usr/lib/systemd/system/lorastream.service \
           ./usr/share/doc/lorastream/config.example.toml ./usr/share/doc/lorastream/README.md; do
    check "$arch: $f in the package" grep -q " $f\$" "$work/contents-$arch"
  done
  check "$arch: binary mode 0755" grep -Eq '^-rwxr-xr-x (root/root|0/0) ./usr/bin/lorastream$' "$work/contents-$arch"
  check "$arch: config not world-readable (0640)" grep -Eq '^-rw-r----- (root/root|0/0) ./etc/lorastream/lorastream.toml$' "$work/contents-$arch"
  check "$arch: nothing under /var/lib (the store is made by postinst, removed by purge)" \
    bash -c "! grep -q ' ./var/lib' '$work/contents-$arch'"
  mkdir -p "$work/ctl-$arch" "$work/fs-$arch"
  dpkg-deb -e "$deb" "$work/ctl-$arch"
  dpkg-deb -x "$deb" "$work/fs-$arch"
  check "$arch: conffile" grep -qx /etc/lorastream/lorastream.toml "$work/ctl-$arch/conffiles"
  for s in postinst prerm postrm; do
    check "$arch: $s has the systemd part" grep -q deb-systemd "$work/ctl-$arch/$s"
    check "$arch: $s is valid sh" sh -n "$work/ctl-$arch/$s"
  done
  if [ -z "$first_scripts" ]; then
    first_scripts="$work/ctl-$arch"
  else
    for s in postinst prerm postrm conffiles; do
      check "$arch: $s identical to the other architectures'" cmp -s "$first_scripts/$s" "$work/ctl-$arch/$s"
    done
  fi
  bin="$work/fs-$arch/usr/bin/lorastream"
  desc="$(file -b "$bin")"
  echo "binary: $desc; $(stat -c %s "$bin") bytes"
  case "$arch" in
    amd64) check "amd64: x86-64 ELF" grep -q x86-64 <<<"$desc"
           "$bin" --version ;;
    arm64) check "arm64: aarch64 ELF" grep -q aarch64 <<<"$desc"
           if command -v qemu-aarch64-static >/dev/null; then
             qemu-aarch64-static -L /usr/aarch64-linux-gnu "$bin" --version
           fi ;;
    armhf) check "armhf: 32-bit ARM EABI5 hard-float ELF" grep -q "ARM, EABI5" <<<"$desc"
           if command -v qemu-arm-static >/dev/null; then
             qemu-arm-static -L /usr/arm-linux-gnueabihf "$bin" --version
           fi ;;
    *) fail "unexpected architecture $arch" ;;
  esac
done

# ---- the throw-away root ----------------------------------------------------------------------
cache="${LORASTREAM_PKG_ROOT_CACHE:-/var/cache/lorastream-ci/bookworm-root}"
include=systemd,systemd-sysv,dbus,adduser,init-system-helpers,procps,ca-certificates
if [ ! -x "$cache/usr/bin/dpkg" ] || [ "$(cat "$cache/.complete" 2>/dev/null || true)" != "$include" ]; then
  step "debootstrap bookworm (minbase + systemd) into $cache"
  command -v debootstrap >/dev/null || apt-get install -y -q --no-install-recommends debootstrap
  rm -rf "$cache"
  mkdir -p "$(dirname "$cache")"
  debootstrap --variant=minbase \
    --include="$include" \
    bookworm "$cache" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 ||
    { tail -n 30 "$work/debootstrap.log"; fail "debootstrap"; }
  echo "$include" >"$cache/.complete"
fi
fresh_root() { rm -rf "$work/root"; cp -a "$cache" "$work/root"; echo "$work/root"; }

# ---- 2. maintainer scripts in a chroot ------------------------------------------------------
step "install, upgrade, remove, purge in a chroot (dpkg runs the maintainer scripts)"
R="$(fresh_root)"
cp "$amd64" "$R/tmp/lorastream.deb"
# The same package with a bumped version: the upgrade path.
mkdir -p "$work/bump"
dpkg-deb -R "$amd64" "$work/bump/pkg"
v="$(dpkg-deb -f "$amd64" Version)"
sed -i "s/^Version: .*/Version: ${v}+bump1/" "$work/bump/pkg/DEBIAN/control"
dpkg-deb -b --root-owner-group "$work/bump/pkg" "$R/tmp/lorastream-bump.deb" >/dev/null
in_root() { chroot "$R" "$@"; }
# Mode and owner as names of the root's own users (the host's may differ).
mode() {
  local m u g
  read -r m u g < <(stat -c '%a %u %g' "$R$1")
  echo "$m $(chroot "$R" getent passwd "$u" | cut -d: -f1):$(chroot "$R" getent group "$g" | cut -d: -f1)"
}

in_root dpkg -i /tmp/lorastream.deb
check "installed" test "$(in_root dpkg-query -W -f='${db:Status-Abbrev}' lorastream)" = "ii "
check "binary runs" in_root /usr/bin/lorastream --version
check "system user lorastream" in_root getent passwd lorastream
check "user has no login shell" bash -c "chroot '$R' getent passwd lorastream | grep -q ':/usr/sbin/nologin$'"
check "config root:lorastream 0640" test "$(mode /etc/lorastream/lorastream.toml)" = "640 root:lorastream"
check "/etc/lorastream root:lorastream 0750" test "$(mode /etc/lorastream)" = "750 root:lorastream"
check "store dir lorastream:lorastream 0750" test "$(mode /var/lib/lorastream)" = "750 lorastream:lorastream"
check "unit enabled" test -L "$R/etc/systemd/system/multi-user.target.wants/lorastream.service"
check "config is a conffile" bash -c "chroot '$R' dpkg-query -W -f='\${Conffiles}' lorastream | grep -q /etc/lorastream/lorastream.toml"
check "packaged config valid" in_root /usr/bin/lorastream check

echo "# edited by the admin" >>"$R/etc/lorastream/lorastream.toml"
echo "queued data" >"$R/var/lib/lorastream/marker"
in_root dpkg -i /tmp/lorastream-bump.deb
check "upgraded" test "$(in_root dpkg-query -W -f='${Version}' lorastream)" = "${v}+bump1"
check "upgrade kept the edited config" grep -q "edited by the admin" "$R/etc/lorastream/lorastream.toml"
check "upgrade kept the store" grep -q "queued data" "$R/var/lib/lorastream/marker"
check "upgrade kept the config's mode" test "$(mode /etc/lorastream/lorastream.toml)" = "640 root:lorastream"
check "still enabled" test -L "$R/etc/systemd/system/multi-user.target.wants/lorastream.service"

in_root dpkg -r lorastream
check "remove: binary gone" test ! -e "$R/usr/bin/lorastream"
check "remove: unit gone" test ! -e "$R/usr/lib/systemd/system/lorastream.service"
check "remove: config kept" grep -q "edited by the admin" "$R/etc/lorastream/lorastream.toml"
check "remove: store kept" grep -q "queued data" "$R/var/lib/lorastream/marker"
check "remove: state rc" test "$(in_root dpkg-query -W -f='${db:Status-Abbrev}' lorastream)" = "rc "

in_root dpkg -P lorastream
check "purge: config gone" test ! -e "$R/etc/lorastream"
check "purge: store gone" test ! -e "$R/var/lib/lorastream"
check "purge: not enabled" test ! -e "$R/etc/systemd/system/multi-user.target.wants/lorastream.service"
check "purge: no mask left" test ! -L "$R/etc/systemd/system/lorastream.service"
check "purge: dpkg forgot it" bash -c "! chroot '$R' dpkg-query -W lorastream >/dev/null 2>&1"

in_root dpkg -i /tmp/lorastream.deb
check "reinstall after purge: fresh config" bash -c "! grep -q 'edited by the admin' '$R/etc/lorastream/lorastream.toml'"
check "reinstall after purge: enabled" test -L "$R/etc/systemd/system/multi-user.target.wants/lorastream.service"

# ---- 3. under systemd ------------------------------------------------------------------------
step "boot the root with systemd-nspawn and install the package under systemd"
command -v systemd-nspawn >/dev/null || apt-get install -y -q --no-install-recommends systemd-container
R="$(fresh_root)"
# Not /tmp: systemd mounts a tmpfs over it in the container.
cp "$amd64" "$R/root/lorastream.deb"
systemd-nspawn --register=no --keep-unit --quiet --console=pipe -D "$R" -b >"$work/nspawn.log" 2>&1 &
nspawn_pid=$!
# The container's PID 1: nspawn's child that runs systemd. Looked up again on every try: right
# after the start, nspawn's child can still be a short-lived helper that is not PID 1 yet (one
# CI run entered that one and saw no systemd for the whole wait).
find_leader() {
  pgrep -P "$nspawn_pid" -x systemd 2>/dev/null | head -n 1 ||
    true
}
leader=""
ns() { nsenter -t "$leader" -a "$@"; }
state=""
for _ in $(seq 1 300); do
  leader="$(find_leader)"
  if [ -n "$leader" ]; then
    state="$(ns systemctl is-system-running 2>/dev/null || true)"
    case "$state" in running|degraded) break ;; esac
  fi
  kill -0 "$nspawn_pid" 2>/dev/null || break
  sleep 0.2
done
[ -n "$leader" ] || { cat "$work/nspawn.log"; pgrep -a -P "$nspawn_pid" || true; fail "systemd-nspawn did not start systemd"; }
echo "container systemd: $state"
case "$state" in running|degraded) ;; *) cat "$work/nspawn.log"; fail "systemd in the container did not come up" ;; esac

ns dpkg -i /root/lorastream.deb
active() { [ "$(ns systemctl is-active lorastream 2>/dev/null || true)" = active ]; }
wait_active() { for _ in $(seq 1 100); do active && return 0; sleep 0.2; done; return 1; }
journal() { ns journalctl -u lorastream --no-pager -o cat 2>/dev/null || true; }
check "service started by postinst and active (READY=1)" wait_active
check "enabled" test "$(ns systemctl is-enabled lorastream)" = enabled
ns systemctl show lorastream -p Type -p NotifyAccess -p WatchdogUSec -p StatusText -p User -p MemoryMax
check "status text from the daemon" bash -c "nsenter -t $leader -a systemctl show -p StatusText --value lorastream | grep -q '^running: UDP 127.0.0.1:1700'"
check "journal: first line names version and commit" bash -c "nsenter -t $leader -a journalctl -u lorastream -o cat --no-pager | grep -q 'lorastream .* (commit .*) starting'"
check "journal: no colour codes" bash -c "! nsenter -t $leader -a journalctl -u lorastream -o cat --no-pager | grep -q $'\x1b'"
check "journal: priorities from the <N> prefixes (info lines at priority 6)" \
  bash -c "nsenter -t $leader -a journalctl -u lorastream -p 6..6 -o cat --no-pager | grep -q 'lorastream started'"

ns lorastream simulate --device example-1 --count 3
got=0
for _ in $(seq 1 50); do
  got="$(journal | grep -c '"uplink_message"' || true)"
  [ "$got" -ge 3 ] && break
  sleep 0.2
done
check "3 simulated uplinks in the journal through the hardened unit (UDP, store, stream)" test "$got" -ge 3
check "the store is written in /var/lib/lorastream" test -s "$R/var/lib/lorastream/lorastream.redb"

ns systemctl reload lorastream
for _ in $(seq 1 50); do journal | grep -q "SIGHUP: " && break; sleep 0.2; done
check "reload: SIGHUP logged" bash -c "nsenter -t $leader -a journalctl -u lorastream -o cat --no-pager | grep -q 'SIGHUP: '"
check "reload: still active" active

step "watchdog: a stopped daemon misses its keep-alives and systemd restarts it"
mkdir -p "$R/etc/systemd/system/lorastream.service.d"
printf '[Service]\nWatchdogSec=3s\nTimeoutAbortSec=3s\nRestartSec=1\n' >"$R/etc/systemd/system/lorastream.service.d/test.conf"
ns systemctl daemon-reload
ns systemctl restart lorastream
check "active with WatchdogSec=3s" wait_active
sleep 4   # several keep-alives
check "keep-alives arrive (still active after 4 s with WatchdogSec=3s)" active
pid="$(ns systemctl show -p MainPID --value lorastream)"
ns kill -STOP "$pid"
restarted=""
for _ in $(seq 1 150); do
  newpid="$(ns systemctl show -p MainPID --value lorastream)"
  if [ "$newpid" != "$pid" ] && [ "$newpid" != 0 ] && active; then restarted=1; break; fi
  sleep 0.2
done
check "restarted by systemd after the watchdog timeout" test -n "$restarted"
check "journal: watchdog timeout" bash -c "nsenter -t $leader -a journalctl -u lorastream --no-pager | grep -qi 'watchdog timeout'"
rm -rf "$R/etc/systemd/system/lorastream.service.d"
ns systemctl daemon-reload

step "[log] format = \"journald\": native journal entries with fields"
sed -i 's/^format = "text"/format = "journald"/' "$R/etc/lorastream/lorastream.toml"
ns systemctl restart lorastream
check "active with format = journald" wait_active
for _ in $(seq 1 50); do
  ns journalctl -u lorastream -o verbose --no-pager 2>/dev/null | grep -q "F_UDP=127.0.0.1:1700" && break
  sleep 0.2
done
check "journal fields (F_UDP=...) and priority" bash -c "nsenter -t $leader -a journalctl -u lorastream -o verbose --no-pager | grep -q 'F_UDP=127.0.0.1:1700'"
sed -i 's/^format = "journald"/format = "text"/' "$R/etc/lorastream/lorastream.toml"
ns systemctl restart lorastream
check "active again with format = text" wait_active

step "systemd-analyze security of the installed unit"
ns systemd-analyze security --no-pager lorastream.service | tail -n 1 | tee "$work/score"
score="$(grep -o 'level for lorastream.service: [0-9.]*' "$work/score" | awk '{print $NF}')"
check "exposure $score <= 2.0" awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 2.0) }'

ns systemctl stop lorastream
check "stopped cleanly" bash -c "nsenter -t $leader -a journalctl -u lorastream -o cat --no-pager | grep -q 'lorastream stopped'"
kill "$nspawn_pid"
wait "$nspawn_pid" 2>/dev/null || true
nspawn_pid=""
step "packages OK"
