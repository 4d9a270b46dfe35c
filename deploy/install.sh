#!/bin/sh
# Installs shoal on a Debian/Ubuntu machine (any systemd Linux, really):
#
#   install.sh [--binary PATH] [--root DIR]     install, or update in place
#   install.sh --uninstall [--root DIR]          remove the binary and the unit (data is kept)
#
# Puts the binary in /usr/local/bin/shoal and deploy/shoal.service in
# /etc/systemd/system/shoal.service, creates /var/lib/shoal (mode 0700) and, the first time,
# /etc/default/shoal (per-host options for the unit). When systemd runs, it enables the unit
# and starts it, or restarts it if the binary or the unit changed; otherwise it says what to
# run. Running it again changes nothing that is already in place.
#
# --binary  the shoal binary to install (default: ./shoal next to this script, else
#           ../target/release/shoal from it, as `cargo build --release -p shoal` leaves it)
# --root    install under DIR instead of / (packaging, tests); systemd is left alone
set -eu

usage() {
    echo "usage: install.sh [--binary PATH] [--root DIR] | --uninstall [--root DIR]" >&2
    exit 2
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

here=$(cd "$(dirname "$0")" && pwd)
root=""
binary=""
uninstall=false
while [ $# -gt 0 ]; do
    case "$1" in
    --binary)
        [ $# -ge 2 ] || usage
        binary=$2
        shift 2
        ;;
    --root)
        [ $# -ge 2 ] || usage
        root=${2%/}
        shift 2
        ;;
    --uninstall)
        uninstall=true
        shift
        ;;
    -h | --help) usage ;;
    *)
        echo "install.sh: unknown argument $1" >&2
        usage
        ;;
    esac
done

bin_path="$root/usr/local/bin/shoal"
unit_path="$root/etc/systemd/system/shoal.service"
defaults_path="$root/etc/default/shoal"
data_dir="$root/var/lib/shoal"

# systemd is ours to drive only on a real install on a machine booted with it.
use_systemd=false
if [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    use_systemd=true
fi

if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
    die "must run as root (it writes /usr/local/bin, /etc/systemd/system and /var/lib/shoal)"
fi

# Replaces $2 with $1 (mode $3) by a rename in the target directory, so a running binary is
# never written over. Prints "changed" when it did anything.
place() {
    src=$1
    dst=$2
    mode=$3
    if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
        chmod "$mode" "$dst"
        return 0
    fi
    tmp="$dst.install.$$"
    if ! { mkdir -p "$(dirname "$dst")" && cp "$src" "$tmp" && chmod "$mode" "$tmp" &&
        mv -f "$tmp" "$dst"; }; then
        rm -f "$tmp"
        return 1
    fi
    echo changed
}

if $uninstall; then
    if $use_systemd; then
        if systemctl is-enabled --quiet shoal.service 2>/dev/null ||
            systemctl is-active --quiet shoal.service 2>/dev/null; then
            # KillMode=process: containers and their monitors keep running.
            systemctl disable --now shoal.service
        fi
    fi
    removed=false
    for f in "$unit_path" "$bin_path"; do
        if [ -e "$f" ]; then
            rm -f "$f"
            echo "removed $f"
            removed=true
        fi
    done
    if $use_systemd && $removed; then
        systemctl daemon-reload
    fi
    echo "kept $data_dir (the node's cluster state, images and containers) and $defaults_path;"
    echo "leave the cluster first (shoal cluster leave) and remove them by hand if the node is done."
    exit 0
fi

if [ -z "$binary" ]; then
    if [ -f "$here/shoal" ]; then
        binary="$here/shoal"
    else
        binary="$here/../target/release/shoal"
    fi
fi
[ -f "$binary" ] || die "no shoal binary at $binary: build it (cargo build --release -p shoal) or pass --binary PATH"
[ -x "$binary" ] || die "$binary is not executable"
unit_src="$here/shoal.service"
[ -f "$unit_src" ] || die "no unit file at $unit_src"

bin_changed=$(place "$binary" "$bin_path" 0755) || die "could not install $bin_path"
[ -n "$bin_changed" ] && echo "installed $bin_path"
unit_changed=$(place "$unit_src" "$unit_path" 0644) || die "could not install $unit_path"
[ -n "$unit_changed" ] && echo "installed $unit_path"

if [ ! -e "$defaults_path" ]; then
    mkdir -p "$(dirname "$defaults_path")"
    cat >"$defaults_path" <<'EOF'
# Options of `shoal agent` on this host (see `shoal agent --help`), read by shoal.service.
# The address other nodes reach this one on, when the host has more than one:
#SHOAL_AGENT_OPTS="--advertise-addr 10.0.0.11"
EOF
    chmod 0644 "$defaults_path"
    echo "created $defaults_path"
fi

mkdir -p "$data_dir"
chmod 0700 "$data_dir"

if $use_systemd; then
    if [ -n "$unit_changed" ]; then
        systemctl daemon-reload
    fi
    if ! systemctl is-enabled --quiet shoal.service 2>/dev/null; then
        systemctl enable shoal.service
    fi
    if ! systemctl is-active --quiet shoal.service; then
        systemctl start shoal.service
        echo "started shoal.service"
    elif [ -n "$bin_changed$unit_changed" ]; then
        # Containers live on (KillMode=process); the restarted daemon adopts them.
        systemctl restart shoal.service
        echo "restarted shoal.service"
    fi
    echo "shoal is running: see \`systemctl status shoal\` and \`journalctl -u shoal\`."
elif [ -z "$root" ]; then
    echo "systemd is not running here: start the daemon yourself, e.g."
    echo "  nohup /usr/local/bin/shoal agent >/var/log/shoal.log 2>&1 &"
fi
echo "next: shoal cluster init --advertise-addr <this host's address> (first manager),"
echo "      or shoal cluster join --token <token> <manager address> (every other node)."
