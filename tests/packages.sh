#!/usr/bin/env bash
# The Debian packages, end to end (run by tests/packages.rs, or alone as root):
#   - builds the three packages (debug binaries, already built by tests/run) with test keys
#     generated here, and checks their minisign signatures (a tampered .deb is refused);
#   - creates a clean Debian root with mmdebstrap, publishes the signed repository in it, and
#     boots it with systemd-nspawn (own network namespace: nothing touches this machine's
#     network, TUN devices or firewall);
#   - apt refuses the repository signed with another key, unsigned, and a tampered .deb;
#   - installs the three packages with apt (signed-by=), checks binaries, man pages, users and
#     groups, `systemd-analyze verify` and `security` for each unit;
#   - runs them for real as their units: gateway (own user, CAP_NET_BIND_SERVICE only,
#     administered as root, without the CA key), CA signer (own user, no capabilities, no
#     network; the gateway's user cannot read the key; enrollment and `account create` go
#     through it), site (enrolls, TUN and nftables table), client (a technician in
#     the group `pinhole` logs in and connects: route on the TUN);
#   - upgrades to a new revision (state kept, services restarted), removes (services stopped,
#     route, TUN and nftables table gone, state kept) and purges (state gone).
# Everything lives in one temporary directory, removed at exit.
# Environment: PINHOLE_PKGTEST_SUITE (default bookworm), PINHOLE_PKGTEST_MIRROR,
# PINHOLE_PKGTEST_KEEP=1 keeps the directory for a look afterwards, PINHOLE_PKGTEST_BASE=DIR
# copies that root (e.g. a kept one's) instead of running mmdebstrap, when iterating.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
step() { printf '==> [%3ss] %s\n' "$(($(date +%s) - t0))" "$*"; }
fail() {
    echo "FAIL: $*" >&2
    exit 1
}
[ "$(id -u)" -eq 0 ] || fail "needs root (mmdebstrap, systemd-nspawn)"

need=()
for pair in mmdebstrap:mmdebstrap minisign:minisign apt-ftparchive:apt-utils gpg:gnupg \
    dpkg-shlibdeps:dpkg-dev systemd-nspawn:systemd-container strip:binutils \
    desktop-file-validate:desktop-file-utils; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    step "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

tmp=$(mktemp -d /tmp/pinhole-pkgtest.XXXXXX)
# On tmpfs: the root's some 20 000 files are written and removed in moments.
mount -t tmpfs -o size=3g,mode=0700 pinhole-pkgtest "$tmp"
root=$tmp/root
nspawn_pid=
leader=
# On a failure once the container runs: the services' state and journals, from inside it.
diagnose() {
    [ -n "$leader" ] && kill -0 "$leader" 2>/dev/null || return 0
    echo "--- diagnostics from the container" >&2
    local env=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 SYSTEMD_COLORS=0)
    nsenter -t "$leader" -a "${env[@]}" systemctl --no-pager --failed >&2 2>&1 || true
    nsenter -t "$leader" -a "${env[@]}" systemctl --no-pager --full status \
        pinhole-ca pinhole-gateway pinhole-site pinholed >&2 2>&1 || true
    nsenter -t "$leader" -a "${env[@]}" journalctl --no-pager -o short-precise \
        -u pinhole-ca -u pinhole-gateway -u pinhole-site -u pinholed >&2 2>&1 || true
}
cleanup() {
    local rc=$?
    [ "$rc" -eq 0 ] || diagnose
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        kill -TERM "$nspawn_pid" 2>/dev/null || true # nspawn powers the container off
        for _ in $(seq 50); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$nspawn_pid" 2>/dev/null || true
    fi
    for home in "$tmp"/gpg-*; do
        [ ! -d "$home" ] || GNUPGHOME=$home gpgconf --kill gpg-agent 2>/dev/null || true
    done
    if [ "${PINHOLE_PKGTEST_KEEP:-0}" = 1 ]; then
        echo "kept $tmp (a tmpfs: umount $tmp && rmdir $tmp)"
    else
        # The killed gpg-agents may take a moment to let go of the tmpfs.
        for _ in $(seq 25); do umount "$tmp" 2>/dev/null && break; sleep 0.2; done
        ! mountpoint -q "$tmp" || umount --lazy "$tmp"
        rmdir "$tmp"
    fi
}
trap cleanup EXIT

step "desktop-file-validate: the tray's .desktop file and autostart entry"
for f in packaging/desktop/*.desktop; do
    out=$(desktop-file-validate "$f" 2>&1) || fail "desktop-file-validate $f: $out"
done

# ---------------------------------------------------------------- keys, packages, minisign
step "test keys: OpenPGP release key, another key, minisign key"
genkey() { # GNUPGHOME UID OUT
    mkdir -m 0700 "$1"
    GNUPGHOME=$1 gpg --batch --quiet --passphrase '' --quick-gen-key "$2" ed25519 sign never
    GNUPGHOME=$1 gpg --batch --quiet --armor --export-secret-keys >"$3"
}
genkey "$tmp/gpg-release" "Pinhole test release <release@pinhole.invalid>" "$tmp/release.sec.asc"
genkey "$tmp/gpg-other" "Someone else <other@pinhole.invalid>" "$tmp/other.sec.asc"
GNUPGHOME=$tmp/gpg-release gpg --batch --quiet --export >"$tmp/release.gpg"
minisign -G -W -p "$tmp/minisign.pub" -s "$tmp/minisign.key" >/dev/null

build() { # REVISION OUT
    packaging/build --profile debug --no-build --revision "$1" --out "$2" \
        --gpg-key-file "$tmp/release.sec.asc" --minisign-key "$tmp/minisign.key" >"$2.log" 2>&1 ||
        { cat "$2.log"; fail "packaging/build --revision $1"; }
}
step "packaging/build --profile debug (revisions 1 and 2)"
build 1 "$tmp/build1"
build 2 "$tmp/build2"
arch=$(dpkg --print-architecture)

step "minisign: the three .debs verify, a tampered one does not"
for p in pinhole pinhole-gateway pinhole-site; do
    deb=$tmp/build1/${p}_0.1.0-1_$arch.deb
    minisign -V -q -p "$tmp/minisign.pub" -m "$deb" || fail "minisign refuses $deb"
done
cmp -s "$tmp/minisign.pub" "$tmp/build1/repo/minisign.pub" || fail "repo/minisign.pub is not the signing key's"
tampered=$tmp/tampered.deb
cp "$tmp/build1/pinhole_0.1.0-1_$arch.deb" "$tampered"
cp "$tmp/build1/pinhole_0.1.0-1_$arch.deb.minisig" "$tampered.minisig"
flip() { # FILE: one byte in the middle changed, size kept
    local off=$(($(stat -c %s "$1") / 2)) b
    b=$(dd if="$1" bs=1 skip=$off count=1 2>/dev/null | od -An -tu1 | tr -d ' ')
    printf "\\$(printf %03o $(((b + 1) % 256)))" | dd of="$1" bs=1 seek=$off conv=notrunc 2>/dev/null
}
flip "$tampered"
if minisign -V -q -p "$tmp/minisign.pub" -m "$tampered" 2>/dev/null; then
    fail "minisign accepted a tampered .deb"
fi

# ---------------------------------------------------------------- the clean root
suite=${PINHOLE_PKGTEST_SUITE:-bookworm}
mirror=${PINHOLE_PKGTEST_MIRROR:-http://deb.debian.org/debian}
step "mmdebstrap $suite (variant apt, with systemd, iproute2, man-db and the packages' dependencies)"
# The dependencies come from Debian here, as they would on any machine; the container then
# runs without a network, so apt installs Pinhole from the published repository alone.
# What the three packages depend on, from their control files.
deps=$(for deb in "$tmp"/build1/*.deb; do dpkg-deb -f "$deb" Depends; done |
    tr ',' '\n' | sed 's/|.*//; s/(.*//; s/ //g' | sort -u | paste -sd,)
if [ -n "${PINHOLE_PKGTEST_BASE:-}" ]; then
    cp -a "$PINHOLE_PKGTEST_BASE" "$root" # a root made earlier, when iterating on this test
else
    mmdebstrap --variant=apt --include="systemd,iproute2,man-db,$deps" \
        "$suite" "$root" "$mirror" >"$tmp/mmdebstrap.log" 2>&1 ||
        { tail -30 "$tmp/mmdebstrap.log"; fail mmdebstrap; }
    mv "$root/etc/apt/sources.list" "$root/etc/apt/sources.list.debian"
fi

step "publishing the signed repository in the root (/srv/pinhole-apt), key in /etc/apt/keyrings"
publish() { # BUILD
    rm -rf "$root/srv/pinhole-apt"
    cp -a "$1/repo" "$root/srv/pinhole-apt"
}
publish "$tmp/build1"
install -D -m 0644 "$tmp/release.gpg" "$root/etc/apt/keyrings/pinhole.gpg"
cat >"$root/etc/apt/sources.list.d/pinhole.sources" <<'EOF'
Types: deb
URIs: file:/srv/pinhole-apt
Suites: stable
Components: main
Signed-By: /etc/apt/keyrings/pinhole.gpg
EOF

step "booting the root (systemd-nspawn --boot --private-network)"
systemd-nspawn --quiet --boot --register=no --keep-unit --private-network --console=pipe \
    -D "$root" >"$tmp/console.log" 2>&1 </dev/null &
nspawn_pid=$!
for _ in $(seq 100); do
    for c in $(pgrep -P "$nspawn_pid" 2>/dev/null); do
        [ "$(cat "/proc/$c/comm" 2>/dev/null)" = systemd ] && leader=$c
    done
    [ -n "$leader" ] && break
    sleep 0.1
done
[ -n "$leader" ] || { cat "$tmp/console.log"; fail "the container did not start"; }
ct() { nsenter -t "$leader" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }
state=
for _ in $(seq 150); do # until systemd answers on its socket
    state=$(ct timeout 60 systemctl is-system-running --wait 2>/dev/null) || true
    case $state in running | degraded) break ;; esac
    sleep 0.2
done
case $state in
running | degraded) ;;
*) cat "$tmp/console.log"; fail "container state: $state" ;;
esac
[ "$state" = running ] || ct systemctl --failed --no-pager

# ---------------------------------------------------------------- apt refuses
step "apt refuses the repository signed with another key"
rel=$root/srv/pinhole-apt/dists/stable
cp "$rel/InRelease" "$rel/Release.gpg" "$tmp/"
GNUPGHOME=$tmp/gpg-other gpg --batch --quiet --yes --clearsign -o "$rel/InRelease" "$rel/Release"
GNUPGHOME=$tmp/gpg-other gpg --batch --quiet --yes --armor --detach-sign -o "$rel/Release.gpg" "$rel/Release"
if ct apt-get update >"$tmp/apt.log" 2>&1; then cat "$tmp/apt.log"; fail "apt-get update accepted a foreign signature"; fi
grep -q "NO_PUBKEY\|signatures couldn't be verified\|is not signed" "$tmp/apt.log" ||
    { cat "$tmp/apt.log"; fail "unexpected apt error"; }
! ct apt-cache show pinhole >/dev/null 2>&1 || fail "pinhole became installable"

step "apt refuses the repository unsigned"
rm "$rel/InRelease" "$rel/Release.gpg"
if ct apt-get update >"$tmp/apt.log" 2>&1; then cat "$tmp/apt.log"; fail "apt-get update accepted an unsigned repository"; fi
grep -q "is not signed\|NO_PUBKEY" "$tmp/apt.log" || { cat "$tmp/apt.log"; fail "unexpected apt error"; }
cp "$tmp/InRelease" "$tmp/Release.gpg" "$rel/"

step "apt refuses a tampered .deb from the correctly signed repository"
ct apt-get update >"$tmp/apt.log" 2>&1 || { cat "$tmp/apt.log"; fail "apt-get update of the signed repository"; }
pooldeb=$root/srv/pinhole-apt/pool/main/p/pinhole/pinhole_0.1.0-1_$arch.deb
cp "$pooldeb" "$tmp/pool.deb"
flip "$pooldeb"
if ct apt-get install -y --download-only pinhole >"$tmp/apt.log" 2>&1; then
    cat "$tmp/apt.log"
    fail "apt downloaded a tampered .deb"
fi
grep -qi "hash sum mismatch\|hashes of expected file" "$tmp/apt.log" || { cat "$tmp/apt.log"; fail "unexpected apt error"; }
cp "$tmp/pool.deb" "$pooldeb"
ct apt-get clean

# ---------------------------------------------------------------- install
step "apt-get install pinhole pinhole-gateway pinhole-site"
ct env DEBIAN_FRONTEND=noninteractive apt-get install -y pinhole pinhole-gateway pinhole-site >"$tmp/install.log" 2>&1 ||
    { cat "$tmp/install.log"; fail "apt-get install"; }
grep -q 'sudo adduser USER pinhole' "$tmp/install.log" || { cat "$tmp/install.log"; fail "no hint how to join the group pinhole"; }
for b in pinhole pinholed pinhole-gateway pinhole-site; do
    ct "$b" --version | grep -q "^$b 0.1.0" || fail "$b --version"
    ct "$b" --help >/dev/null || fail "$b --help"
    [ -f "$root/usr/share/man/man1/$b.1.gz" ] || fail "no man page for $b"
    [ -f "$root/usr/share/bash-completion/completions/$b" ] || fail "no bash completion for $b"
    [ -f "$root/usr/share/zsh/vendor-completions/_$b" ] || fail "no zsh completion for $b"
    [ -f "$root/usr/share/fish/vendor_completions.d/$b.fish" ] || fail "no fish completion for $b"
done
[ -f "$root/usr/share/man/man1/pinhole-gateway-account-create.1.gz" ] || fail "no subcommand man page"
# The tray: its man page and completion come from the CLI's clap definition; the .desktop file,
# autostart entry (a conffile: an administrator may switch it off) and icons.
[ -f "$root/usr/share/man/man1/pinhole-tray.1.gz" ] || fail "no man page for pinhole tray"
grep -qw tray "$root/usr/share/bash-completion/completions/pinhole" || fail "no completion for pinhole tray"
ct pinhole tray --help | grep -q "system tray" || fail "pinhole tray --help"
for f in usr/share/applications/pinhole-tray.desktop etc/xdg/autostart/pinhole-tray.desktop \
    usr/share/icons/hicolor/scalable/apps/pinhole.svg \
    usr/share/icons/hicolor/scalable/apps/pinhole-connected.svg \
    usr/share/icons/hicolor/scalable/apps/pinhole-attention.svg; do
    [ -f "$root/$f" ] || fail "no /$f"
done
for f in usr/share/applications/pinhole-tray.desktop etc/xdg/autostart/pinhole-tray.desktop; do
    grep -qx 'Exec=pinhole tray' "$root/$f" || fail "/$f does not start pinhole tray"
done
grep -qx /etc/xdg/autostart/pinhole-tray.desktop "$root/var/lib/dpkg/info/pinhole.conffiles" ||
    fail "the autostart entry is no conffile"
dpkg-deb -f "$tmp"/build1/pinhole_*.deb Recommends | grep -q pinentry || fail "pinhole does not recommend a pinentry"
ct pinhole-site check --config /etc/pinhole-site/site.toml.example >/dev/null || fail "the example site.toml"
grep -q site.toml.example "$root/var/lib/dpkg/info/pinhole-site.conffiles" || fail "site.toml.example is no conffile"
ct getent group pinhole >/dev/null || fail "no group pinhole"
ct getent passwd pinhole-gateway | grep -q ':/var/lib/pinhole-gateway:/usr/sbin/nologin$' || fail "user pinhole-gateway"
[ "$(ct stat -c %U:%a /var/lib/pinhole-gateway)" = pinhole-gateway:700 ] || fail "/var/lib/pinhole-gateway"
ct getent passwd pinhole-ca | grep -q ':/var/lib/pinhole-ca:/usr/sbin/nologin$' || fail "user pinhole-ca"
[ "$(ct stat -c %U:%a /var/lib/pinhole-ca)" = pinhole-ca:700 ] || fail "/var/lib/pinhole-ca"

step "systemd-analyze verify and security"
units=(pinholed.service pinhole-gateway.service pinhole-ca.service pinhole-site.service)
for u in "${units[@]}"; do
    out=$(ct systemd-analyze verify "/lib/systemd/system/$u" 2>&1) || fail "systemd-analyze verify $u: $out"
    [ -z "$out" ] || fail "systemd-analyze verify $u: $out"
done
for u in "${units[@]}"; do
    line=$(ct systemd-analyze security --no-pager "$u" | grep "Overall exposure level")
    echo "    ${line#→ }"
    level=$(sed -n 's/.*: \([0-9.]*\) .*/\1/p' <<<"$line")
    awk -v l="$level" 'BEGIN { exit !(l <= 3.0) }' || fail "$u exposure $level > 3.0"
done
ct systemctl is-active --quiet pinholed || { ct systemctl status --no-pager pinholed; fail "pinholed not started by the install"; }
for u in pinhole-gateway pinhole-site; do
    ct systemctl is-enabled --quiet "$u" || fail "$u not enabled"
    ! ct systemctl is-active --quiet "$u" || fail "$u started before it was configured"
done

mainpid() { ct systemctl show -p MainPID --value "$1"; }
capeff() { ct sed -n 's/^CapEff:\t//p' "/proc/$(mainpid "$1")/status"; }
wait_for() { # SECONDS DESCRIPTION COMMAND...
    local n=$(($1 * 5)) what=$2
    shift 2
    for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    for u in pinhole-ca pinhole-gateway pinhole-site pinholed; do
        echo "--- journal of $u (last lines)" >&2
        ct journalctl --no-pager -u "$u" 2>&1 | tail -n 12 >&2 || true
    done
    fail "timed out: $what"
}

# ---------------------------------------------------------------- gateway
step "gateway: init as root, start, administered as root while it runs"
ct pinhole-gateway init --public-address 127.0.0.1:443 >/dev/null
ct systemctl start pinhole-gateway
wait_for 20 "gateway listening on 443" ct sh -c 'ss -ltn | grep -q ":443 "'
[ "$(ct stat -c %U "/proc/$(mainpid pinhole-gateway)")" = pinhole-gateway ] || fail "gateway not running as pinhole-gateway"
[ "$(capeff pinhole-gateway)" = 0000000000000400 ] || fail "gateway capabilities: $(capeff pinhole-gateway)"
step "CA signer: holds the key the gateway no longer has, no capabilities, no network"
ct systemctl is-active --quiet pinhole-ca || { ct systemctl status --no-pager pinhole-ca; fail "pinhole-ca not started with the gateway"; }
[ "$(ct stat -c %U "/proc/$(mainpid pinhole-ca)")" = pinhole-ca ] || fail "signer not running as pinhole-ca"
[ "$(capeff pinhole-ca)" = 0000000000000000 ] || fail "signer capabilities: $(capeff pinhole-ca)"
[ ! -e "$root/var/lib/pinhole-gateway/ca.key" ] || fail "ca.key still in the gateway's state directory"
[ "$(ct stat -c %U:%G:%a /var/lib/pinhole-ca/ca.key)" = pinhole-ca:pinhole-ca:600 ] || fail "ca.key: $(ct stat -c %U:%G:%a /var/lib/pinhole-ca/ca.key)"
[ "$(ct stat -c %G:%a /run/pinhole-ca/signer.sock)" = pinhole-gateway:660 ] || fail "signer socket: $(ct stat -c %G:%a /run/pinhole-ca/signer.sock)"
# Only the gateway's group may enter the socket's directory; the signer is not in that group
# (the socket is born in it: the directory is set-group-ID).
[ "$(ct stat -c %U:%G:%a /run/pinhole-ca)" = pinhole-ca:pinhole-gateway:2710 ] || fail "/run/pinhole-ca: $(ct stat -c %U:%G:%a /run/pinhole-ca)"
gw_gid=$(ct getent group pinhole-gateway | cut -d: -f3)
ca_groups=$(ct sed -n 's/^Groups:\t*//p' "/proc/$(mainpid pinhole-ca)/status")
! grep -qw "$gw_gid" <<<"$ca_groups" || fail "the signer is in the gateway's group (groups: $ca_groups)"
if ct runuser -u pinhole-gateway -- cat /var/lib/pinhole-ca/ca.key >/dev/null 2>&1; then fail "the gateway's user read the CA key"; fi
# The signer's own network namespace holds nothing but a loopback that is down.
[ "$(ct nsenter -t "$(mainpid pinhole-ca)" -n ip -o link | wc -l)" = 1 ] || fail "the signer sees network interfaces"
echo 'correct horse battery staple' >"$root/root/alice.pw"
ct pinhole-gateway domain create acme.plant-a >/dev/null
token=$(ct pinhole-gateway site-token create acme.plant-a 2>/dev/null | tail -1)
ct pinhole-gateway account create alice --out /root/alice.p12 --password-file /root/alice.pw >/dev/null
ct pinhole-gateway grant alice acme >/dev/null
grep -q ' technician alice serial=' "$root/var/lib/pinhole-ca/issued.log" || fail "account create did not go through the signer"
left=$(ct find /var/lib/pinhole-gateway ! -user pinhole-gateway)
[ -z "$left" ] || fail "root-run administration left files the service cannot own: $left"
ct systemctl is-active --quiet pinhole-gateway || fail "gateway stopped"

# ---------------------------------------------------------------- site
step "site: configured from the example, enrolls, TUN and nftables table"
ct ip link add dev0 type veth peer name dev0-peer # (dummy may be a module the container cannot load)
ct ip addr add 192.168.0.1/24 dev dev0
ct ip link set dev0 up
sed -e 's/^#token = .*/token = "'"$token"'"/' \
    -e 's/^gateway = .*/gateway = ["127.0.0.1:443"]/' \
    -e 's/^device_interface = .*/device_interface = "dev0"/' \
    "$root/etc/pinhole-site/site.toml.example" >"$root/etc/pinhole-site/site.toml"
chmod 600 "$root/etc/pinhole-site/site.toml" # it holds a token: the site refuses a readable one
ct pinhole-site check >/dev/null
ct systemctl start pinhole-site
wait_for 30 "site online" ct sh -c 'pinhole-gateway sites --json | grep -q "\"online\": *true"'
ct nft list table inet pinhole_site >/dev/null || fail "no nftables table"
grep -q ' site plant-a serial=' "$root/var/lib/pinhole-ca/issued.log" || fail "the site's certificate did not come from the signer"
ct ip link show pinhole-site0 >/dev/null || fail "no site TUN"
[ "$(capeff pinhole-site)" = 0000000000001000 ] || fail "site capabilities: $(capeff pinhole-site)"

# ---------------------------------------------------------------- client
step "client: a technician in the group pinhole imports, logs in, connects"
# udev gives /dev/net/tun mode 0666 on every Debian system; this container has no udev.
ct chmod 0666 /dev/net/tun
ct adduser --disabled-password --gecos "" --quiet tech
ct adduser --quiet tech pinhole
ct install -o tech -m 0600 /root/alice.p12 /root/alice.pw /home/tech/
[ "$(ct stat -c %G:%a /run/pinhole/pinholed.sock)" = pinhole:660 ] || fail "control socket: $(ct stat -c %G:%a /run/pinhole/pinholed.sock)"
[ "$(ct stat -c %u "/proc/$(mainpid pinholed)")" != 0 ] || fail "pinholed runs as root"
[ "$(capeff pinholed)" = 0000000000001000 ] || fail "pinholed capabilities: $(capeff pinholed)"
if ct runuser -u nobody -- pinhole status >/dev/null 2>&1; then fail "a user outside the group pinhole used the daemon"; fi
tech() { ct runuser -u tech -- "$@"; }
tech pinhole import /home/tech/alice.p12 --password-file /home/tech/alice.pw >/dev/null
tech pinhole login --password-file /home/tech/alice.pw >/dev/null
tech pinhole connect plant-a/press-4-plc >/dev/null
ct ip route show proto 231 | grep -q "192.168.0.10 dev pinhole0" || fail "no route to the device"

# ---------------------------------------------------------------- upgrade
step "upgrade to revision 2: state kept, services restarted"
before="$(mainpid pinholed) $(mainpid pinhole-gateway) $(mainpid pinhole-site) $(mainpid pinhole-ca)"
publish "$tmp/build2"
ct apt-get update >"$tmp/apt.log" 2>&1 || { cat "$tmp/apt.log"; fail "apt-get update (revision 2)"; }
ct env DEBIAN_FRONTEND=noninteractive apt-get install -y pinhole pinhole-gateway pinhole-site >"$tmp/upgrade.log" 2>&1 ||
    { cat "$tmp/upgrade.log"; fail "upgrade"; }
[ "$(ct dpkg-query -W -f '${Version}' pinhole)" = 0.1.0-2 ] || fail "not upgraded"
for u in pinholed pinhole-gateway pinhole-site pinhole-ca; do
    ct systemctl is-active --quiet "$u" || fail "$u not running after the upgrade"
done
after="$(mainpid pinholed) $(mainpid pinhole-gateway) $(mainpid pinhole-site) $(mainpid pinhole-ca)"
for i in 1 2 3 4; do
    [ "$(cut -d' ' -f$i <<<"$before")" != "$(cut -d' ' -f$i <<<"$after")" ] || fail "service $i not restarted ($before → $after)"
done
ct pinhole-gateway accounts | grep -q alice || fail "gateway state lost"
wait_for 30 "site online again" ct sh -c 'pinhole-gateway sites --json | grep -q "\"online\": *true"'
tech pinhole login --password-file /home/tech/alice.pw >/dev/null || fail "the imported bundle was lost"
tech pinhole connect plant-a/press-4-plc >/dev/null
ct ip route show proto 231 | grep -q "192.168.0.10 dev pinhole0" || fail "no route after the upgrade"

# ---------------------------------------------------------------- remove, purge
step "remove: services stopped, route, TUNs and nftables table gone, state kept"
ct env DEBIAN_FRONTEND=noninteractive apt-get remove -y pinhole pinhole-gateway pinhole-site >"$tmp/remove.log" 2>&1 ||
    { cat "$tmp/remove.log"; fail "apt-get remove"; }
for u in pinholed pinhole-gateway pinhole-site pinhole-ca; do
    ! ct systemctl is-active --quiet "$u" || fail "$u still running"
done
! ct test -e /run/pinhole-ca || fail "/run/pinhole-ca left"
! ct ip link show pinhole0 >/dev/null 2>&1 || fail "client TUN left"
[ -z "$(ct ip route show proto 231)" ] || fail "route left"
! ct ip link show pinhole-site0 >/dev/null 2>&1 || fail "site TUN left"
! ct nft list table inet pinhole_site >/dev/null 2>&1 || fail "nftables table left"
for d in /var/lib/private/pinhole /var/lib/pinhole-gateway /var/lib/pinhole-ca /var/lib/pinhole-site; do
    [ -n "$(ls -A "$root$d")" ] || fail "$d lost on remove"
done

step "purge: state gone"
ct env DEBIAN_FRONTEND=noninteractive apt-get purge -y pinhole pinhole-gateway pinhole-site >"$tmp/purge.log" 2>&1 ||
    { cat "$tmp/purge.log"; fail "apt-get purge"; }
for d in /var/lib/pinhole /var/lib/private/pinhole /var/lib/pinhole-gateway /var/lib/pinhole-ca /var/lib/pinhole-site /etc/pinhole-site; do
    [ ! -e "$root$d" ] || fail "$d left after purge"
done

step "the services' logs: no cleanup failed on the way"
if ct journalctl --no-pager -u pinhole-site | grep "cannot remove the nftables table"; then
    fail "pinhole-site left its table on a stop"
fi
step "packages: all checks passed"
