#!/usr/bin/env bash
# End-to-end test of the installed package on a real systemd: a Debian 12 guest booted with
# systemd-nspawn in its own network namespace (recipe: shared/reference/vm-rig.md). The
# controller runs on the host side of a veth pair; the agent is installed with dpkg -i,
# started by systemd (Type=notify), reboots the guest for real (post_finish: reboot makes
# nspawn exit 133; the loop below boots it again), and must report exactly once.
#
# Usage (root): tests/e2e/run.sh [DEB_DIR]    (default: target/packages, built if missing)
#               tests/e2e/run.sh --image-only (build or refresh the cached guest image)
#               tests/e2e/run.sh --qemu [DEB_DIR] (the same in a full VM with a real kernel reboot)
# Env: E2E_CACHE (guest image cache, default ~/.cache/fieldhand-e2e), BOOT_TIMEOUT (s, 120).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DEBS=${1:-$ROOT/target/packages}
CACHE_ROOT=${E2E_CACHE:-$HOME/.cache/fieldhand-e2e}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-120}
SUITE=bookworm
PASS=0
FAIL=0

log() { printf '[e2e %(%H:%M:%S)T +%ss] %s\n' -1 "$SECONDS" "$*" >&2; }
die() { log "FAIL: $*"; FAIL=$((FAIL + 1)); exit 1; }
ok() { log "ok: $*"; PASS=$((PASS + 1)); }

apt_mirror() {
    # Only live entries (URIs: lines and deb lines), never comments.
    { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true; } \
        | grep -E '^(URIs:|deb )' | grep -oE 'https?://[^ ]+/debian/?' | grep -v security | head -1 \
        | sed 's:/*$::' || true
}
MIRROR=${MIRROR:-$(apt_mirror)}

need() {
    local missing=()
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
    command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
    command -v mke2fs >/dev/null || missing+=(e2fsprogs)
    command -v ip >/dev/null || missing+=(iproute2)
    command -v curl >/dev/null || missing+=(curl)
    command -v python3 >/dev/null || missing+=(python3)
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
}

# ------------------------------------------------------------------ guest image (cached)
build_into() {  # $1 = output dir; the text of this function is part of the cache key
    local out=$1 root=$1/rootfs.tmp
    mkdir -p "$out"; rm -rf "$root"
    mmdebstrap --mode=root --variant=minbase \
        --include="systemd,systemd-sysv,dbus,iproute2,procps,adduser,init-system-helpers" \
        --customize-hook='echo e2e-guest > "$1/etc/hostname"' \
        --customize-hook='printf "127.0.1.1 e2e-guest\n" >> "$1/etc/hosts"' \
        --customize-hook=': > "$1/etc/fstab"' \
        --customize-hook='chroot "$1" systemctl mask e2scrub_reap.service e2scrub_all.timer systemd-networkd.service systemd-resolved.service || true' \
        --customize-hook='chroot "$1" passwd -d root' \
        --customize-hook='mkdir -p "$1/var/log/journal"' \
        "$SUITE" "$root" "$MIRROR"
    rm -f "$out/base.raw"
    mke2fs -q -t ext4 -L root -d "$root" "$out/base.raw" 1G
    rm -rf "$root"
}
image() {
    local key; key=$({ declare -f build_into; echo "$SUITE $MIRROR"; } | sha256sum | cut -c1-16)
    CACHE=$CACHE_ROOT/img-$key
    if [ -f "$CACHE/.complete" ]; then log "guest image cached: $CACHE"; return; fi
    log "building the guest image into $CACHE"
    build_into "$CACHE.tmp" && rm -rf "$CACHE" && mv "$CACHE.tmp" "$CACHE"
    touch "$CACHE/.complete"
}

# ------------------------------------------------------------------ cleanup (by PID)
RUN=
NS=
WRAP=
CTL_PID=
cleanup() {
    set +e
    local l; l=$(leader)
    [ -n "$l" ] && { nsenter -t "$l" -m -p -- systemctl poweroff >/dev/null 2>&1 || kill -9 "$l"; }
    for _ in $(seq 1 20); do [ -n "$WRAP" ] && kill -0 "$WRAP" 2>/dev/null || break; sleep 0.5; done
    [ -n "$WRAP" ] && kill "$WRAP" 2>/dev/null
    [ -n "$CTL_PID" ] && kill "$CTL_PID" 2>/dev/null
    ip link del fhe2e0 2>/dev/null
    [ -n "$NS" ] && ip netns del "$NS" 2>/dev/null
    if [ -n "$RUN" ]; then
        mountpoint -q "$RUN/root" && umount "$RUN/root"
        mountpoint -q "$RUN/lower" && umount "$RUN/lower"
        rm -rf "$RUN"
    fi
    echo "e2e: $PASS passed, $FAIL failed"
}
trap cleanup EXIT

leader() {  # PID 1 of the guest
    local np; np=$(cat "$RUN/nspawn.pid" 2>/dev/null) || return 0
    kill -0 "$np" 2>/dev/null || return 0
    pgrep -P "$np" | head -1
}
gx() {  # run a shell command inside the guest
    local l; l=$(leader); [ -n "$l" ] || return 255
    timeout 60 nsenter -t "$l" -m -u -i -n -p -- /bin/sh -c "$*"
}
HOST_BOOT_ID=$(cat /proc/sys/kernel/random/boot_id)
wait_guest() {  # $1 = a boot id that must no longer be current ("" = any)
    local old=$1 deadline=$((SECONDS + BOOT_TIMEOUT)) b st
    while [ $SECONDS -lt $deadline ]; do
        # Early in an nspawn boot (before nspawn mounts the container's own boot_id, before
        # systemd runs) the guest's namespaces still show the host's boot id: not up yet.
        if b=$(gx 'cat /proc/sys/kernel/random/boot_id' 2>/dev/null) && [ -n "$b" ] && [ "$b" != "$old" ] \
            && [ "$b" != "$HOST_BOOT_ID" ]; then
            st=$(gx 'systemctl is-system-running --wait' 2>/dev/null) || true
            case $st in
                running | degraded)
                    [ "$(gx 'cat /proc/sys/kernel/random/boot_id' 2>/dev/null)" = "$b" ] && { echo "$b"; return 0; } ;;
            esac
        fi
        sleep 0.5
    done
    die "guest not up within ${BOOT_TIMEOUT}s; see $RUN/console.log"
}

# ------------------------------------------------------------------ controller API
api() {  # api METHOD PATH [JSON]
    curl -sS --fail-with-body --cacert "$PKI/ca.pem" --cert "$PKI/operators/e2e.pem" \
        --key "$PKI/operators/e2e-key.pem" -X "$1" -H 'content-type: application/json' \
        ${3:+--data "$3"} "$URL$2"
}
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }

# Enrollment (used by both variants): the guest gets only ca.pem and a token; the agent
# makes its own key and enrolls. new_token prints a token for pool e2e.
new_token() { api POST /v1/enrollment-tokens '{"pool_id": "e2e"}' | json 'd["token"]'; }
ENROLLED_SERIAL=
enrolled_check() {  # $1 = the machine id the agent must have enrolled as
    local id=$1 deadline=$((SECONDS + 90)) st="" phase="" m="" serial=""
    while [ $SECONDS -lt $deadline ]; do
        st=$(gx 'fieldhand status --json' 2>/dev/null) || st=""
        phase=$(json 'd["identity"]["phase"]' <<<"$st" 2>/dev/null) || phase=""
        [ "$phase" = enrolled ] && break; sleep 0.5
    done
    [ "$phase" = enrolled ] || die "the agent did not enroll (phase ${phase:-?}): $st"
    [ "$(json 'd["machine_id"]' <<<"$st")" = "$id" ] || die "the agent enrolled under another id: $st"
    serial=$(json 'd["identity"]["certificate_serial"]' <<<"$st")
    [ -n "$serial" ] && [ "$serial" != None ] || die "enrolled without a certificate serial: $st"
    while [ $SECONDS -lt $deadline ]; do
        m=$(api GET "/v1/machines/$id" 2>/dev/null) || m=""
        [ "$(json 'd["certificate_serial"]' <<<"$m" 2>/dev/null)" = "$serial" ] && break; sleep 0.5
    done
    [ "$(json 'd["pool_id"]' <<<"$m" 2>/dev/null)" = e2e ] || die "the controller does not have $id in pool e2e: $m"
    [ "$(json 'd["certificate_serial"]' <<<"$m" 2>/dev/null)" = "$serial" ] \
        || die "the controller does not show the enrolled certificate $serial: $m"
    [ "$(gx 'stat -c %a /etc/fieldhand/tls/agent-key.pem')" = 600 ] || die "agent-key.pem is not mode 600"
    gx 'test -s /etc/fieldhand/tls/agent.pem' || die "enrollment wrote no agent.pem"
    ENROLLED_SERIAL=$serial
    ok "enrolled with a token as $id in pool e2e (certificate $serial, key mode 600)"
}

# An image push (used by both variants): staged, switched in by its activate hook in boot
# $1, a real reboot, the health check in the new boot, committed.
image_push_check() {
    local prev=$1 img_dir="$RUN/image" image_id sha task t
    mkdir -p "$img_dir/fieldhand" "$img_dir/etc"
    echo e2e-image > "$img_dir/etc/image-name"
    cat > "$img_dir/fieldhand/activate" <<'HOOK'
#!/bin/sh
cat /proc/sys/kernel/random/boot_id > "$FIELDHAND_IMAGE_DIR/activated-in"
env | grep '^FIELDHAND_' | sort > "$FIELDHAND_IMAGE_DIR/activate.env"
HOOK
    cat > "$img_dir/fieldhand/health-check" <<'HOOK'
#!/bin/sh
# Healthy only in a boot other than the one that activated the image.
now=$(cat /proc/sys/kernel/random/boot_id)
[ "$now" != "$(cat "$FIELDHAND_IMAGE_DIR/activated-in")" ] || exit 1
echo "$now" > "$FIELDHAND_IMAGE_DIR/healthy-in"
HOOK
    chmod 0755 "$img_dir/fieldhand/activate" "$img_dir/fieldhand/health-check"
    tar -C "$img_dir" -czf "$RUN/image.tar.gz" .
    sha=$(curl -sS --fail-with-body --cacert "$PKI/ca.pem" --cert "$PKI/operators/e2e.pem" \
        --key "$PKI/operators/e2e-key.pem" --data-binary @"$RUN/image.tar.gz" \
        -H 'content-type: application/octet-stream' "$URL/v1/blobs" | json 'd["sha256"]')
    image_id=$(api POST /v1/images "{\"name\": \"e2e\", \"version\": \"1\", \"os_type\": \"linux\", \"gpu\": false, \"sha256\": \"$sha\"}" \
        | json 'd["image_id"]')
    task=$(api POST /v1/pools/e2e/push-image "{\"image_id\": \"$image_id\"}" | json 'd["task_id"]')
    log "image $image_id pushed (task $task)"
    local b3; b3=$(wait_guest "$prev")
    log "guest rebooted into the image: boot $b3"
    local op=""
    for _ in $(seq 1 240); do
        op=$(api GET /v1/pools/e2e/provisioning-status | json 'd["operation"]')
        [ "$op" = NONE ] && break; sleep 0.5
    done
    local ps; ps=$(api GET /v1/pools/e2e/provisioning-status)
    [ "$op" = NONE ] || die "the push did not end: $ps"
    [ "$(json 'd["current_image_id"]' <<<"$ps")" = "$image_id" ] || die "not committed: $ps"
    [ "$(json 'd["current_image_state"]' <<<"$ps")" = READY ] || die "current image not READY: $ps"
    t=$(api GET "/v1/tasks/$task")
    [ "$(json 'd["machines"][0]["state"]' <<<"$t")" = SUCCEEDED ] || die "push task: $t"
    [ "$(json 'd["machines"][0]["power_state"]' <<<"$t")" = REBOOTED ] || die "no REBOOTED step: $t"
    [ "$(gx 'readlink /var/lib/fieldhand/images/current')" = "$image_id" ] || die "current does not point at the image"
    [ "$(gx "cat /var/lib/fieldhand/images/$image_id/activated-in")" = "$prev" ] || die "activate did not run before the reboot"
    [ "$(gx "cat /var/lib/fieldhand/images/$image_id/healthy-in")" = "$b3" ] || die "the health check did not run in the new boot"
    gx "grep -qx FIELDHAND_IMAGE_ID=$image_id /var/lib/fieldhand/images/$image_id/activate.env" || die "activate env"
    [ "$(gx 'fieldhand status --json' | json 'd["image"]["current_image_id"]')" = "$image_id" ] || die "fieldhand status: no current image"
    ok "push-image: staged, activated in boot $prev, health-checked in boot $b3 after a real reboot, committed"
}

main() {
    [ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 2; }
    need
    if ! ls "$DEBS"/fieldhand_*.deb >/dev/null 2>&1; then
        "$ROOT/packaging/build.sh"
    fi
    local deb cdeb; deb=$(ls "$DEBS"/fieldhand_*.deb | head -1); cdeb=$(ls "$DEBS"/fieldhand-controller_*.deb | head -1)
    image

    RUN=$(mktemp -d /tmp/fieldhand-e2e.XXXX)
    PKI=$RUN/pki
    local CTL=$ROOT/target/release/fieldhand-controller
    "$CTL" pki init --dir "$PKI" --san 10.77.0.1 >/dev/null
    "$CTL" pki issue --dir "$PKI" --operator e2e >/dev/null

    # Network: veth pair; the guest side lives in the guest's namespace.
    NS=fhe2e-$$
    ip netns add "$NS"
    ip link add fhe2e0 type veth peer name host0 netns "$NS"
    ip addr add 10.77.0.1/24 dev fhe2e0; ip link set fhe2e0 up
    ip -n "$NS" addr add 10.77.0.2/24 dev host0; ip -n "$NS" link set host0 up; ip -n "$NS" link set lo up

    # Controller on the host side.
    mkdir -p "$RUN/ctl"
    cat > "$RUN/ctl/controller.toml" <<TOML
listen = "10.77.0.1:0"
data_dir = "$RUN/ctl"
offline_after_seconds = 30
[tls]
ca = "$PKI/ca.pem"
cert = "$PKI/controller.pem"
key = "$PKI/controller-key.pem"
[enrollment]
issuing_cert = "$PKI/issuing-ca.pem"
issuing_key = "$PKI/issuing-ca-key.pem"
TOML
    "$CTL" serve --config "$RUN/ctl/controller.toml" > "$RUN/ctl/controller.log" 2>&1 &
    CTL_PID=$!
    for _ in $(seq 1 100); do [ -s "$RUN/ctl/listen-addr" ] && break; sleep 0.1; done
    URL="https://$(cat "$RUN/ctl/listen-addr")"
    log "controller at $URL (pid $CTL_PID)"
    local token; token=$(new_token) || die "cannot create an enrollment token"

    # Guest root: the cached image, read-only, under a per-run overlay.
    mkdir -p "$RUN/lower" "$RUN/upper" "$RUN/work" "$RUN/root"
    mount -o loop,ro "$CACHE/base.raw" "$RUN/lower"
    mount -t overlay overlay -o "lowerdir=$RUN/lower,upperdir=$RUN/upper,workdir=$RUN/work" "$RUN/root"
    ( set +e; n=0
      while :; do
          n=$((n + 1)); echo "=== boot $n $(date +%s.%N)"
          systemd-nspawn -b -D "$RUN/root" --register=no --keep-unit --console=passive \
              -M e2e-guest --network-namespace-path="/run/netns/$NS" &
          echo $! > "$RUN/nspawn.pid"; wait $!; rc=$?
          echo "=== nspawn exit $rc"
          [ $rc -eq 133 ] || break   # 133: the guest rebooted
      done ) > "$RUN/console.log" 2>&1 &
    WRAP=$!
    local b1 b2
    b1=$(wait_guest "")
    log "guest up, boot $b1"

    # Install both packages; the CA certificate and an enrollment token as an operator would
    # drop them in (no agent certificate: the agent enrolls itself).
    cp "$deb" "$cdeb" "$RUN/root/root/"
    install -d -m 0750 "$RUN/root/etc/fieldhand/tls"
    cp "$PKI/ca.pem" "$RUN/root/etc/fieldhand/tls/ca.pem"
    ( umask 077; printf '%s\n' "$token" > "$RUN/root/etc/fieldhand/enrollment-token" )
    chmod 0600 "$RUN/root/etc/fieldhand/enrollment-token"
    gx "dpkg -i /root/$(basename "$deb") /root/$(basename "$cdeb")" > "$RUN/dpkg.log" 2>&1 \
        || { cat "$RUN/dpkg.log" >&2; die "dpkg -i failed"; }
    ok "dpkg -i installed both packages"
    gx 'systemd-analyze verify /lib/systemd/system/fieldhand.service /lib/systemd/system/fieldhand-controller.service' \
        || die "systemd-analyze verify"
    ok "systemd-analyze verify passes on both units"
    [ "$(gx 'systemctl is-enabled fieldhand.service' || true)" = enabled ] || die "fieldhand.service not enabled"
    [ "$(gx 'systemctl is-active fieldhand-controller.service' || true)" != active ] \
        || die "the controller started without a certificate"
    [ "$(gx 'systemctl is-active fieldhand.service' || true)" != active ] \
        || die "the agent started before its configuration was in place"
    # The packaged config lists the replicas (controller_urls); this one controller replaces it.
    sed -i -e "s#^controller_urls\? = .*#controller_urls = [\"$URL\"]\nmachine_id = \"e2e-guest\"#" \
        "$RUN/root/etc/fieldhand/agent.toml"
    gx 'test ! -e /etc/fieldhand/tls/agent.pem' || die "an agent certificate is already in place"
    gx 'systemctl start fieldhand.service' || die "systemctl start fieldhand"
    [ "$(gx 'systemctl is-active fieldhand.service')" = active ] || die "fieldhand not active"
    grep -q 'Type=notify' <<<"$(gx 'systemctl show -p Type,NotifyAccess,WatchdogUSec fieldhand.service')" \
        || die "not Type=notify"
    ok "the service reached active through Type=notify"
    local status; status=$(gx 'systemctl show -p StatusText --value fieldhand.service')
    [ -n "$status" ] || die "no STATUS= text"
    ok "STATUS=: $status"
    enrolled_check e2e-guest
    for _ in $(seq 1 50); do
        grep -q '"online":true' <<<"$(api GET /v1/machines)" && break; sleep 0.2
    done
    grep -q e2e-guest <<<"$(api GET /v1/machines)" || die "the agent did not reach the controller"
    # Output captured first: `cmd | grep -q` fails under pipefail when grep exits before cmd
    # has written everything (SIGPIPE).
    grep -q 'FIELDHAND_MACHINE_ID=e2e-guest' <<<"$(gx 'journalctl -u fieldhand -o verbose --no-pager')" \
        || die "journal lacks FIELDHAND_MACHINE_ID"
    ok "journalctl -u fieldhand shows structured fields"

    # A real reboot in the middle of a task.
    local task; task=$(api POST /v1/pools/e2e/script-executions \
        '{"command_content": "echo before-reboot", "command_type": "sh", "post_finish": "reboot", "logoff_timeout_seconds": 30}' \
        | json 'd["task_id"]')
    log "task $task submitted"
    b2=$(wait_guest "$b1")
    log "guest rebooted: boot $b2"
    local state=""
    for _ in $(seq 1 240); do
        state=$(api GET "/v1/tasks/$task" | json 'd["state"]')
        [ "$state" = SUCCEEDED ] || [ "$state" = FAILED ] && break
        sleep 0.5
    done
    local t; t=$(api GET "/v1/tasks/$task")
    [ "$state" = SUCCEEDED ] || die "task ended $state: $t"
    [ "$(json 'd["machines"][0]["power_state"]' <<<"$t")" = REBOOTED ] || die "no REBOOTED step: $t"
    [ "$(json 'd["machines"][0]["stdout"]' <<<"$t")" = before-reboot ] || die "wrong output: $t"
    [ "$(gx 'journalctl --list-boots --no-pager | grep -c .')" -ge 2 ] || die "journalctl --list-boots shows one boot"
    grep -q "$b2" "$RUN/ctl/controller.log" || die "controller did not record the new boot id"
    local n; n=$(gx 'fieldhand status --json' | json "len([r for r in d['recent_results'] if r['task_id']=='$task'])")
    [ "$n" = 1 ] || die "the agent recorded $n results for the task"
    [ "$(gx 'fieldhand status --json' | json 'd["undelivered_results"]')" = 0 ] || die "results still queued"
    ok "post_finish: reboot rebooted the guest (boot $b1 -> $b2) and reported once, after the reboot"

    image_push_check "$b2"

    # An upgrade while a result waits in the outbox: nothing is lost.
    task=$(api POST /v1/pools/e2e/script-executions \
        '{"command_content": "sleep 2; echo queued", "command_type": "sh"}' | json 'd["task_id"]')
    for _ in $(seq 1 100); do
        [ "$(api GET "/v1/tasks/$task" | json 'd["machines"][0]["state"]')" = RUNNING ] && break; sleep 0.1
    done
    local addr; addr=$(cat "$RUN/ctl/listen-addr")
    kill "$CTL_PID"; wait "$CTL_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do
        [ "$(gx 'fieldhand status --json' | json 'd["undelivered_results"]')" = 1 ] && break; sleep 0.1
    done
    [ "$(gx 'fieldhand status --json' | json 'd["undelivered_results"]')" = 1 ] || die "no result waiting in the outbox"
    local pid_before; pid_before=$(gx 'systemctl show -p MainPID --value fieldhand')
    gx "dpkg -i /root/$(basename "$deb")" > "$RUN/upgrade.log" 2>&1 || { cat "$RUN/upgrade.log" >&2; die "upgrade failed"; }
    [ "$(gx 'systemctl show -p MainPID --value fieldhand')" != "$pid_before" ] || die "the upgrade did not restart the agent"
    sed -i "s#^listen = .*#listen = \"$addr\"#" "$RUN/ctl/controller.toml"
    "$CTL" serve --config "$RUN/ctl/controller.toml" >> "$RUN/ctl/controller.log" 2>&1 &
    CTL_PID=$!
    state=""
    for _ in $(seq 1 200); do
        state=$(api GET "/v1/tasks/$task" 2>/dev/null | json 'd["state"]' 2>/dev/null || true)
        [ "$state" = SUCCEEDED ] && break; sleep 0.2
    done
    [ "$state" = SUCCEEDED ] || die "the queued result did not arrive after the upgrade ($state)"
    [ "$(api GET "/v1/tasks/$task" | json 'd["machines"][0]["stdout"]')" = queued ] || die "wrong output after the upgrade"
    ok "an upgrade restarted the agent and the queued result still arrived"
    # What enrollment wrote belongs to the machine, not to the package: after two reboots and
    # the upgrade the agent still runs on the certificate it enrolled with (no re-enrollment),
    # and the local agent.toml (a conffile) kept its machine_id.
    local st; st=$(gx 'fieldhand status --json')
    [ "$(json 'd["identity"]["phase"]' <<<"$st")" = enrolled ] || die "not enrolled after the upgrade: $st"
    [ "$(json 'd["identity"]["certificate_serial"]' <<<"$st")" = "$ENROLLED_SERIAL" ] \
        || die "the certificate changed (enrolled $ENROLLED_SERIAL): $st"
    [ "$(api GET /v1/machines/e2e-guest | json 'd["certificate_serial"]')" = "$ENROLLED_SERIAL" ] \
        || die "the controller sees another certificate after the upgrade"
    gx 'grep -qx "machine_id = \"e2e-guest\"" /etc/fieldhand/agent.toml' || die "the upgrade lost machine_id in agent.toml"
    [ "$(gx 'stat -c %a /etc/fieldhand/tls/agent-key.pem')" = 600 ] || die "agent-key.pem is not mode 600 after the upgrade"
    ok "the enrolled certificate $ENROLLED_SERIAL survived the reboots and the upgrade"

    # The status socket: group fieldhand only.
    gx 'useradd -M -G fieldhand alice && useradd -M bob'
    grep -q 'machine:' <<<"$(gx 'runuser -u alice -- fieldhand status')" || die "alice (group fieldhand) was refused"
    if gx 'runuser -u bob -- fieldhand status' >/dev/null 2>&1; then die "bob (not in the group) got the status"; fi
    ok "fieldhand status: allowed for group fieldhand, refused to others"

    # The controller package, set up exactly as the README says.
    gx 'fieldhand-controller pki init --dir /etc/fieldhand-controller/pki --san "$(hostname)" >/dev/null &&
        chown -R fieldhand-controller: /etc/fieldhand-controller/pki &&
        systemctl enable --now fieldhand-controller' >/dev/null 2>&1 || die "controller setup as documented failed"
    # The issuing CA that the packaged config's (commented) [enrollment] table names.
    gx 'test -s /etc/fieldhand-controller/pki/issuing-ca.pem && test -s /etc/fieldhand-controller/pki/issuing-ca-key.pem' \
        || die "pki init made no issuing CA where controller.toml says"
    [ "$(gx 'systemctl is-active fieldhand-controller' || true)" = active ] \
        || { gx 'journalctl -u fieldhand-controller --no-pager -n 20' >&2; die "the packaged controller is not active"; }
    gx 'test -s /var/lib/fieldhand-controller/listen-addr' || die "the sandboxed controller could not write its state"
    ok "the packaged controller runs sandboxed (systemctl enable --now, Type=notify)"
    log "PASS"
}
# ------------------------------------------------------------------ qemu variant
# A full VM under software emulation (about 2 minutes): its own kernel, a real reset.
# Run: sudo tests/e2e/run.sh --qemu [DEB_DIR]
need_qemu() {
    if ! command -v qemu-system-x86_64 >/dev/null; then
        if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
            # This machine's qemu-utils comes from backports; qemu-system must match it.
            printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
                "$MIRROR" > /etc/apt/sources.list.d/fieldhand-e2e-backports.sources
        fi
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            -t bookworm-backports qemu-system-x86 qemu-utils
    fi
    command -v ssh >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssh-client
}
build_vm_into() {  # $1 = output dir; the text of this function is part of the cache key
    local out=$1 root=$1/rootfs.tmp
    mkdir -p "$out"; rm -rf "$root"
    [ -f "$out/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C fieldhand-e2e -f "$out/id_ed25519"
    mmdebstrap --mode=root --variant=minbase \
        --include="systemd,systemd-sysv,udev,dbus,linux-image-cloud-amd64,initramfs-tools,zstd,openssh-server,iproute2,procps,kmod,adduser" \
        --setup-hook='mkdir -p "$1/etc/initramfs-tools/conf.d"' \
        --setup-hook='printf "MODULES=list\nCOMPRESS=zstd\n" > "$1/etc/initramfs-tools/conf.d/e2e.conf"' \
        --setup-hook='printf "virtio_pci\nvirtio_blk\nvirtio_net\next4\n" > "$1/etc/initramfs-tools/modules"' \
        --customize-hook='echo e2e-vm > "$1/etc/hostname"' \
        --customize-hook='printf "/dev/vda / ext4 rw,errors=remount-ro 0 1\n" > "$1/etc/fstab"' \
        --customize-hook='mkdir -p "$1/etc/systemd/network" && printf "[Match]\nName=en* eth*\n[Network]\nDHCP=ipv4\n" > "$1/etc/systemd/network/20-wired.network"' \
        --customize-hook='chroot "$1" systemctl enable systemd-networkd' \
        --customize-hook='chroot "$1" systemctl mask e2scrub_reap.service e2scrub_all.timer' \
        --customize-hook='install -d -m700 "$1/root/.ssh"' \
        --customize-hook="install -m600 '$out/id_ed25519.pub' \"\$1/root/.ssh/authorized_keys\"" \
        --customize-hook='mkdir -p "$1/var/log/journal"' \
        --customize-hook="cp -L \"\$1/vmlinuz\" \"\$1/initrd.img\" '$out/'" \
        "$SUITE" "$root" "$MIRROR"
    rm -f "$out/base.raw"
    mke2fs -q -t ext4 -L root -d "$root" "$out/base.raw" 2G
    rm -rf "$root"
}
QEMU_PID=
qemu_main() {
    [ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 2; }
    need; need_qemu
    if ! ls "$DEBS"/fieldhand_*.deb >/dev/null 2>&1; then "$ROOT/packaging/build.sh"; fi
    local deb; deb=$(ls "$DEBS"/fieldhand_*.deb | head -1)
    local key; key=$({ declare -f build_vm_into; echo "$SUITE $MIRROR"; } | sha256sum | cut -c1-16)
    local VM=$CACHE_ROOT/vm-$key
    if [ ! -f "$VM/.complete" ]; then
        log "building the VM image into $VM"
        build_vm_into "$VM.tmp" && rm -rf "$VM" && mv "$VM.tmp" "$VM" && touch "$VM/.complete"
    fi
    RUN=$(mktemp -d /tmp/fieldhand-e2e.XXXX)
    PKI=$RUN/pki
    local CTL=$ROOT/target/release/fieldhand-controller
    # The guest reaches the controller at 10.0.2.2, user-mode networking's alias for the
    # host's loopback.
    "$CTL" pki init --dir "$PKI" --san 10.0.2.2 >/dev/null
    "$CTL" pki issue --dir "$PKI" --operator e2e >/dev/null
    mkdir -p "$RUN/ctl"
    printf 'listen = "127.0.0.1:0"\ndata_dir = "%s"\n[tls]\nca = "%s"\ncert = "%s"\nkey = "%s"\n[enrollment]\nissuing_cert = "%s"\nissuing_key = "%s"\n' \
        "$RUN/ctl" "$PKI/ca.pem" "$PKI/controller.pem" "$PKI/controller-key.pem" \
        "$PKI/issuing-ca.pem" "$PKI/issuing-ca-key.pem" > "$RUN/ctl/controller.toml"
    "$CTL" serve --config "$RUN/ctl/controller.toml" > "$RUN/ctl/controller.log" 2>&1 &
    CTL_PID=$!
    for _ in $(seq 1 100); do [ -s "$RUN/ctl/listen-addr" ] && break; sleep 0.1; done
    URL="https://$(cat "$RUN/ctl/listen-addr")"
    local cport=${URL##*:}
    ( umask 077; new_token > "$RUN/enrollment-token" ) || die "cannot create an enrollment token"
    local port; port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
    qemu-img create -q -f qcow2 -b "$VM/base.raw" -F raw "$RUN/disk.qcow2"
    local accel=tcg cpu=max
    if [ ! -d /sys/module/kvm_pvm ] && [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; then accel=kvm; cpu=host; fi
    qemu-system-x86_64 -accel "$accel" -cpu "$cpu" -machine q35 -smp 2 -m 1024 \
        -kernel "$VM/vmlinuz" -initrd "$VM/initrd.img" -append "root=/dev/vda rw console=ttyS0" \
        -drive "file=$RUN/disk.qcow2,if=virtio,format=qcow2,cache=unsafe" \
        -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:22" \
        -device virtio-net-pci,netdev=n0 -nographic -nodefaults -serial "file:$RUN/serial.log" \
        -pidfile "$RUN/qemu.pid" -daemonize
    QEMU_PID=$(cat "$RUN/qemu.pid")
    gx() {
        ssh -i "$VM/id_ed25519" -p "$port" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
            -o ConnectTimeout=3 -o ServerAliveInterval=2 -o ServerAliveCountMax=3 -o LogLevel=ERROR \
            -o BatchMode=yes root@127.0.0.1 "$@"
    }
    BOOT_TIMEOUT=${BOOT_TIMEOUT:-300}
    local b1 b2
    b1=$(wait_guest "")
    log "VM up, boot $b1"
    gx 'mkdir -p /etc/fieldhand/tls'
    # Only the CA certificate and an enrollment token: the agent enrolls itself.
    scp -q -i "$VM/id_ed25519" -P "$port" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
        "$deb" "$PKI/ca.pem" "$RUN/enrollment-token" root@127.0.0.1:/root/
    gx 'cp /root/ca.pem /etc/fieldhand/tls/ca.pem &&
        install -m 0600 /root/enrollment-token /etc/fieldhand/enrollment-token && rm /root/enrollment-token &&
        dpkg -i /root/fieldhand_*.deb' >/dev/null
    gx 'test ! -e /etc/fieldhand/tls/agent.pem' || die "an agent certificate is already in place"
    gx "sed -i -e 's#^controller_urls\\? = .*#controller_urls = [\"https://10.0.2.2:$cport\"]\nmachine_id = \"e2e-vm\"#' /etc/fieldhand/agent.toml && systemctl start fieldhand"
    [ "$(gx 'systemctl is-active fieldhand')" = active ] || die "fieldhand not active in the VM"
    ok "installed and active in the VM"
    enrolled_check e2e-vm
    for _ in $(seq 1 120); do grep -q '"online":true' <<<"$(api GET /v1/machines)" && break; sleep 0.5; done
    if ! grep -q e2e-vm <<<"$(api GET /v1/machines)"; then
        gx 'journalctl -u fieldhand --no-pager -n 30' >&2 || true
        die "the agent in the VM did not reach the controller"
    fi
    local task; task=$(api POST /v1/pools/e2e/script-executions \
        '{"command_content": "echo before-reboot", "command_type": "sh", "post_finish": "reboot", "logoff_timeout_seconds": 30}' \
        | json 'd["task_id"]')
    b2=$(wait_guest "$b1")
    log "VM rebooted: boot $b2"
    local state=""
    for _ in $(seq 1 240); do
        state=$(api GET "/v1/tasks/$task" | json 'd["state"]')
        [ "$state" = SUCCEEDED ] || [ "$state" = FAILED ] && break
        sleep 1
    done
    [ "$state" = SUCCEEDED ] || die "task ended $state"
    [ "$(api GET "/v1/tasks/$task" | json 'd["machines"][0]["power_state"]')" = REBOOTED ] || die "no REBOOTED step"
    [ "$(gx 'fieldhand status --json' | json "len([r for r in d['recent_results'] if r['task_id']=='$task'])")" = 1 ] \
        || die "not exactly one result"
    ok "a real kernel reboot (boot $b1 -> $b2); the result was reported once"
    image_push_check "$b2"
    [ "$(gx 'fieldhand status --json' | json 'd["identity"]["certificate_serial"]')" = "$ENROLLED_SERIAL" ] \
        || die "the agent re-enrolled across the reboots"
    ok "the enrolled certificate $ENROLLED_SERIAL survived two kernel reboots"
    gx 'systemctl poweroff' || true
    for _ in $(seq 1 30); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 1; done
    kill "$QEMU_PID" 2>/dev/null || true
    QEMU_PID=
    log "PASS (qemu)"
}

if [ "${1:-}" = "--qemu" ]; then
    shift
    DEBS=${1:-$ROOT/target/packages}
    trap 'set +e; [ -n "$QEMU_PID" ] && kill "$QEMU_PID" 2>/dev/null; cleanup' EXIT
    qemu_main
    exit 0
fi

if [ "${1:-}" = "--image-only" ]; then
    trap - EXIT
    need
    image
    exit 0
fi
main "$@"
