#!/usr/bin/env bash
# shoal's local multi-host test bed: N "hosts" as network namespaces on one bridge.
#
#   testbed.sh up N [--prefix shoal-h] [--subnet 10.77.0]
#   testbed.sh down [--prefix P] | down --all
#   testbed.sh exec HOST CMD...             run CMD in HOST's network namespace
#   testbed.sh agent HOST [ARGS...]         start `shoal agent` in HOST, in the background
#   testbed.sh kill HOST [-TERM|-9|-KILL|-STOP|-CONT]   signal HOST's agent (default TERM)
#   testbed.sh addr HOST                    print HOST's address
#   testbed.sh ls                           list test beds, hosts, addresses and agents
#   testbed.sh tmpfs HOST SIZE              mount a SIZE tmpfs on HOST's data dir (disk-full faults)
#   testbed.sh partition G1 G2 [...]        drop traffic between groups (G = h1,h2 or 1,2)
#   testbed.sh partition-one-way FROM TO    drop traffic from FROM to TO only
#   testbed.sh heal [--prefix P]            remove every partition rule
#
# HOST is a full host name (shoal-h2) or its number (2, h2) under --prefix. Options may come
# before the command (for exec and agent they must: what follows HOST is the command's).
# `agent` adds --hostname HOST unless ARGS name one, appends to the host's agent.log and prints
# the agent's pid. Commands that change things take one lock (flock on /run/shoal-testbed).
#
# Layout. Host i of prefix P is the network namespace P<i> (shoal-h1, shoal-h2, ...) with one
# veth: `eth0` inside (address <subnet>.<i>/24, default route via <subnet>.254, lo up), its
# peer P<i> in the root namespace enslaved to the bridge ("${P%-h}-br0", shoal-br0 by default)
# which holds <subnet>.254/24. Hosts reach each other over the bridge; the root namespace
# reaches every host directly (the /24 is on-link). Nothing is routed or NATed anywhere: the
# root namespace's default route, ip_forward and NAT tables are never touched, so traffic stays
# between these hosts and the root namespace.
#
# Hosts share the file system (no mount namespace of their own); each has its own directory
# /run/shoal-testbed/<host>/ with data/ (SHOAL_DATA_DIR), shoal.sock (SHOAL_SOCKET), agent.log,
# agent.pid and addr. `exec` and `agent` enter only the network namespace (nsenter --net),
# because `ip netns exec` remounts /sys and so hides /sys/fs/cgroup from the agent.
#
# State. /run/shoal-testbed/<prefix>.state records the prefix, subnet, bridge and host count
# before anything is made. `down` does not need it: it also finds the namespaces, links and
# host directories by name, so it works after a crash or a lost state file. `down` kills every
# process in each host's namespace and their descendants (and anything still carrying the
# host's SHOAL_TESTBED_HOST marker, and the processes in the cgroups shoal/<id> of containers
# under the host's data dir), unmounts everything under the host's directory, removes those
# container cgroups, the namespaces, the veths, the bridge, the firewall rules it added and the
# host directories. Both `up` and `down` are idempotent; `up 5` after `up 3` adds h4 and h5.
#
# Firewall. If the bridge netfilter hook is on (br_netfilter, net.bridge.bridge-nf-call-iptables
# =1), bridged traffic passes the root namespace's FORWARD chain, where a DROP policy (Docker
# sets one) would cut the hosts apart; an INPUT DROP policy would cut them off the bridge
# address. When iptables exists, `up` inserts ACCEPT rules for this bridge only (INPUT from it;
# FORWARD in and out of it when the hook is on), tagged with a comment, and `down` removes
# exactly those. The global sysctl is left alone: other bridges on the machine may rely on it.
# A pure nftables ruleset with a drop policy is not adjusted: hosts then cannot reach each
# other until such a ruleset accepts the bridge.
#
# Partitions are nftables rules inside the hosts' namespaces (table inet shoal_testbed), so the
# root namespace is never filtered; hosts named in no group keep talking to everyone. Rules
# drop established connections' packets too (a real cut, not a reset). They add up; `heal`
# removes them all. Needs `nft`
# (Debian package nftables).
#
# The shoal binary is $SHOAL_BIN, else target/debug/shoal, else target/release/shoal (relative
# to the repository holding this script).
set -euo pipefail

readonly STATE_ROOT=/run/shoal-testbed
readonly AGENT_PORT=4242
readonly NFT_TABLE=shoal_testbed
# Bounds of the waits below, in tenths of a second.
readonly KILL_WAIT_TENTHS=100
readonly LINK_GONE_WAIT_TENTHS=50
readonly PIDFILE_WAIT_TENTHS=50
# Rounds of kill-and-look in `down`: processes may fork while they are being killed.
readonly KILL_ROUNDS=10
readonly MAX_HOSTS=253

prog=testbed.sh
die() {
	echo "$prog: $*" >&2
	exit 1
}
usage() {
	echo "$prog: $* (see: $prog help)" >&2
	exit 2
}
help() {
	sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

prefix=shoal-h
subnet=10.77.0
subnet_given=0

bridge_of() { echo "${1%-h}-br0"; }
host_dir() { echo "$STATE_ROOT/$1"; }
state_file() { echo "$STATE_ROOT/$1.state"; }

valid_prefix() {
	[[ $1 =~ ^[a-z][a-z0-9-]*[a-z-]$ ]] && ((${#1} <= 11))
}

valid_subnet() {
	[[ $1 =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] || return 1
	local o
	for o in "${BASH_REMATCH[@]:1}"; do ((10#$o <= 255)) || return 1; done
}

# Serialises the commands that change things (two `up`s, `down` racing `agent`), across all
# prefixes: a lock on the state directory itself, so no lock file is left behind.
take_lock() {
	mkdir -p "$STATE_ROOT"
	exec 9<"$STATE_ROOT"
	flock 9
}

netns_exists() { [[ -e /run/netns/$1 ]]; }
link_exists() { ip link show dev "$1" >/dev/null 2>&1; }

# A host argument: a full name, or a number (2, h2) under the current prefix.
resolve_host() {
	local h=$1
	if [[ $h =~ ^h?([0-9]+)$ ]]; then
		h="$prefix$((10#${BASH_REMATCH[1]}))"
	fi
	[[ $h =~ ^[a-z][a-z0-9-]*[0-9]$ ]] || die "bad host name '$1'"
	echo "$h"
}

require_host() {
	netns_exists "$1" || die "no test host $1 (run: $prog up N)"
}

host_addr() {
	local a
	a=$(ip -n "$1" -4 -o addr show dev eth0 2>/dev/null | awk '{split($4, p, "/"); print p[1]; exit}')
	[[ -n $a ]] || die "test host $1 has no address on eth0"
	echo "$a"
}

shoal_bin() {
	if [[ -n ${SHOAL_BIN:-} ]]; then
		[[ -x $SHOAL_BIN ]] || die "SHOAL_BIN=$SHOAL_BIN is not an executable"
		echo "$SHOAL_BIN"
		return
	fi
	local repo b
	repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
	for b in "$repo/target/debug/shoal" "$repo/target/release/shoal"; do
		[[ -x $b ]] && {
			echo "$b"
			return
		}
	done
	die "no shoal binary: set SHOAL_BIN or run cargo build -p shoal-node-agent"
}

# True while pid is a live process (a zombie is not: it only waits to be reaped).
alive() {
	proc_state "$1" && [[ $REPLY != Z && $REPLY != X ]]
}

# The state letter of a process (R, S, T, Z...) in REPLY; false when there is no such process.
proc_state() {
	local line
	read -r line 2>/dev/null <"/proc/$1/stat" || return 1
	line=${line##*) }
	REPLY=${line%% *}
	[[ -n $REPLY ]]
}

# The agent's pid, if one recorded is alive and still in the host's namespace.
agent_pid() {
	local pf pid
	pf="$(host_dir "$1")/agent.pid"
	[[ -r $pf ]] || return 1
	pid=$(<"$pf")
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	alive "$pid" || return 1
	ip netns identify "$pid" 2>/dev/null | grep -qx "$1" || return 1
	echo "$pid"
}

# ---------------------------------------------------------------- firewall of the root namespace

bridge_nf_on() {
	[[ -r /proc/sys/net/bridge/bridge-nf-call-iptables ]] &&
		[[ "$(</proc/sys/net/bridge/bridge-nf-call-iptables)" == 1 ]]
}

fw_rules() {
	local br=$1
	echo "INPUT -i $br"
	echo "FORWARD -i $br -o $br"
}

fw_open() {
	local br=$1 chain match
	command -v iptables >/dev/null || return 0
	while read -r chain match; do
		[[ $chain == FORWARD ]] && ! bridge_nf_on && continue
		# shellcheck disable=SC2086 # match is a list of words
		iptables -w -C "$chain" $match -m comment --comment "shoal-testbed $br" -j ACCEPT 2>/dev/null ||
			iptables -w -I "$chain" 1 $match -m comment --comment "shoal-testbed $br" -j ACCEPT ||
			die "adding the iptables $chain accept rule for $br"
	done < <(fw_rules "$br")
}

fw_close() {
	local br=$1 chain match
	command -v iptables >/dev/null || return 0
	while read -r chain match; do
		# shellcheck disable=SC2086
		while iptables -w -C "$chain" $match -m comment --comment "shoal-testbed $br" -j ACCEPT 2>/dev/null; do
			iptables -w -D "$chain" $match -m comment --comment "shoal-testbed $br" -j ACCEPT || break
		done
	done < <(fw_rules "$br")
}

# ---------------------------------------------------------------- up

cmd_up() {
	local n=${1:-}
	if ! [[ $n =~ ^[0-9]+$ ]] || ((10#$n < 1 || 10#$n > MAX_HOSTS)); then
		usage "up needs a host count 1..$MAX_HOSTS"
	fi
	n=$((10#$n))
	valid_prefix "$prefix" || usage "bad prefix '$prefix' (a-z, 0-9, '-', not ending in a digit, at most 11 characters)"
	valid_subnet "$subnet" || usage "bad subnet '$subnet' (three octets, like 10.77.0)"
	take_lock
	local br sf old_subnet="" old_n=0
	br=$(bridge_of "$prefix")
	sf=$(state_file "$prefix")
	if [[ -r $sf ]]; then
		old_subnet=$(sed -n 's/^subnet=//p' "$sf")
		old_n=$(sed -n 's/^hosts=//p' "$sf")
		[[ $old_n =~ ^[0-9]+$ ]] || old_n=0
		if [[ -n $old_subnet && $old_subnet != "$subnet" ]]; then
			((subnet_given)) && die "test bed $prefix is up on $old_subnet.0/24, not $subnet.0/24 (down it first)"
			subnet=$old_subnet
		fi
	fi
	# Another device owning this /24 would get half our traffic.
	local owner
	owner=$(ip -4 route show exact "$subnet.0/24" 2>/dev/null | awk '{for (i = 1; i < NF; i++) if ($i == "dev") print $(i + 1)}' | grep -vx "$br" | head -n1 || true)
	[[ -z $owner ]] || die "subnet $subnet.0/24 is already routed via $owner"

	((n > old_n)) || n=$old_n
	mkdir -p "$STATE_ROOT"
	printf 'prefix=%s\nsubnet=%s\nbridge=%s\nhosts=%s\n' "$prefix" "$subnet" "$br" "$n" >"$sf.tmp"
	mv "$sf.tmp" "$sf"

	if ! link_exists "$br"; then
		ip link add "$br" type bridge
	fi
	ip addr replace "$subnet.254/24" dev "$br"
	ip link set "$br" up
	fw_open "$br"

	local i
	for ((i = 1; i <= n; i++)); do
		host_up "$prefix$i" "$subnet.$i" "$br" "$subnet.254"
		echo "$prefix$i $subnet.$i"
	done
}

host_up() {
	local h=$1 addr=$2 br=$3 gw=$4 dir
	dir=$(host_dir "$h")
	mkdir -p "$dir/data"
	netns_exists "$h" || ip netns add "$h"
	if link_exists "$h" && ! ip -d link show dev "$h" | grep -qw veth; then
		die "a link named $h exists and is not this test bed's veth"
	fi
	if ! link_exists "$h" || ! ip -n "$h" link show dev eth0 >/dev/null 2>&1; then
		link_exists "$h" && ip link del "$h"
		ip -n "$h" link del eth0 2>/dev/null || true
		ip link add "$h" type veth peer name eth0 netns "$h"
	fi
	ip link set "$h" master "$br"
	ip link set "$h" up
	ip -n "$h" link set lo up
	ip -n "$h" addr replace "$addr/24" dev eth0
	ip -n "$h" link set eth0 up
	ip -n "$h" route replace default via "$gw" dev eth0
	echo "$addr" >"$dir/addr"
}

# ---------------------------------------------------------------- down

# Hosts of a prefix: from the state file, the namespaces, the root-side links and the dirs.
hosts_of() {
	local p=$1 sf n i
	{
		sf=$(state_file "$p")
		if [[ -r $sf ]]; then
			n=$(sed -n 's/^hosts=//p' "$sf")
			if [[ $n =~ ^[0-9]+$ ]]; then
				for ((i = 1; i <= n && i <= MAX_HOSTS; i++)); do echo "$p$i"; done
			fi
		fi
		ip netns list 2>/dev/null | awk '{print $1}'
		ip -o link show 2>/dev/null | awk -F': ' '{sub(/@.*/, "", $2); print $2}'
		for d in "$STATE_ROOT"/*/; do
			[[ -d $d ]] && basename "$d"
		done
	} | grep -E "^${p//./\\.}[0-9]+$" | sort -u || true
}

# pid -> children, for every process (from /proc/*/stat's ppid).
declare -A CHILDREN
load_tree() {
	CHILDREN=()
	local f line rest pid ppid
	for f in /proc/[0-9]*/stat; do
		read -r line 2>/dev/null <"$f" || continue
		pid=${line%% *}
		rest=${line##*) }
		read -r _ ppid _ <<<"$rest"
		CHILDREN[$ppid]+=" $pid"
	done
}

descendants() {
	local pid=$1 c
	for c in ${CHILDREN[$pid]:-}; do
		echo "$c"
		descendants "$c"
	done
}

# Container ids under a host's data dir (containers/<id> at any of the first levels, and the
# runtime's state dirs containers/.tasks/<id> and containers/.runtime/<id>, which outlive a
# container dir whose removal was cut short).
container_ids() {
	local dir=$1
	[[ -d $dir ]] || return 0
	{
		find "$dir" -mindepth 2 -maxdepth 4 -type d -path '*/containers/*' -prune -printf '%f\n'
		find "$dir" -mindepth 3 -maxdepth 5 -type d \( -path '*/containers/.tasks/*' \
			-o -path '*/containers/.runtime/*' \) -prune -printf '%f\n'
	} 2>/dev/null | grep -E '^[A-Za-z0-9][A-Za-z0-9_.-]*$' | sort -u || true
}

container_cgroups() {
	local id=$1 d
	for d in /sys/fs/cgroup/shoal/"$id" /sys/fs/cgroup/*/shoal/"$id"; do
		[[ -d $d ]] && echo "$d"
	done
}

# Every live process that belongs to host h.
host_pids() {
	local h=$1 dir pid id cg
	dir=$(host_dir "$h")
	{
		if netns_exists "$h"; then
			for pid in $(ip netns pids "$h" 2>/dev/null); do
				echo "$pid"
				descendants "$pid"
			done
		fi
		grep -lzx "SHOAL_TESTBED_HOST=$h" /proc/[0-9]*/environ 2>/dev/null | awk -F/ '{print $3}'
		for id in $(container_ids "$dir"); do
			for cg in $(container_cgroups "$id"); do
				find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null
			done
		done
	} | sort -un | while read -r pid; do
		# An `if`, not `&&`: a last pid that is not alive (a zombie) must not make the loop,
		# and so this function, fail (under set -e the caller would stop without a word).
		if [[ $pid != "$$" && $pid != "$BASHPID" ]] && alive "$pid"; then
			echo "$pid"
		fi
	done
}

kill_host() {
	local h=$1 round pids t
	for ((round = 0; round < KILL_ROUNDS; round++)); do
		load_tree
		pids=$(host_pids "$h")
		[[ -z $pids ]] && return 0
		# shellcheck disable=SC2086
		kill -KILL $pids 2>/dev/null || true
		for ((t = 0; t < KILL_WAIT_TENTHS; t++)); do
			local left=0 p
			for p in $pids; do alive "$p" && left=1 && break; done
			((left)) || break
			sleep 0.1
		done
	done
	load_tree
	pids=$(host_pids "$h")
	[[ -z $pids ]] || die "processes of $h survive SIGKILL: ${pids//$'\n'/ }"
}

unmount_under() {
	local dir=$1 m
	[[ -d $dir ]] || return 0
	# Deepest first; the mount table escapes spaces as \040, our paths have none.
	awk -v d="$dir" '$5 == d || index($5, d "/") == 1 {print $5}' /proc/self/mountinfo |
		awk '{print length, $0}' | sort -rn | cut -d' ' -f2- | while read -r m; do
		umount "$m" 2>/dev/null || umount -l "$m" || die "cannot unmount $m"
	done
}

# The cgroups of the containers IDS (taken before the data dir was unmounted: a data dir on
# its own file system, as the disk-fault hosts have, holds the only record of them).
remove_container_cgroups() {
	local ids=$1 id cg
	for id in $ids; do
		for cg in $(container_cgroups "$id"); do
			find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
		done
	done
}

wait_link_gone() {
	local l=$1 t
	for ((t = 0; t < LINK_GONE_WAIT_TENTHS; t++)); do
		link_exists "$l" || return 0
		ip link del "$l" 2>/dev/null || true
		sleep 0.1
	done
	link_exists "$l" && die "link $l does not go away"
	return 0
}

# The network namespaces shoal made for the host's containers live under /run/shoal/netns (an
# nsfs mount and an owner file naming the container's dir): unmount and remove those of this
# host. The rest of a container's network goes with the host's namespace.
remove_container_netns() {
	local dir=$1 owner ns
	for owner in /run/shoal/netns/*.json; do
		[[ -f $owner ]] || continue
		grep -qF "\"$dir/" "$owner" || continue
		ns=${owner%.json}
		umount -l "$ns" 2>/dev/null || true
		rm -f "$ns" "$owner"
	done
}

host_down() {
	local h=$1 dir ids
	dir=$(host_dir "$h")
	ids=$(container_ids "$dir")
	kill_host "$h"
	# Containers a create still in flight made while the host was being killed.
	ids=$(printf '%s\n%s\n' "$ids" "$(container_ids "$dir")" | sort -u)
	unmount_under "$dir"
	remove_container_cgroups "$ids"
	remove_container_netns "$dir"
	if netns_exists "$h"; then
		# shoal's bridge and overlay records of this namespace (keyed by its inode).
		local ino
		ino=$(stat -L -c %i "/run/netns/$h" 2>/dev/null || true)
		[[ -n $ino ]] && rm -rf /run/shoal/net/*@"$ino"
		ip netns del "$h" 2>/dev/null || {
			umount -l "/run/netns/$h" 2>/dev/null || true
			rm -f "/run/netns/$h"
		}
	fi
	wait_link_gone "$h"
	if [[ -d $dir ]]; then
		# --one-file-system: never follow into a mount that refused to go.
		rm -rf --one-file-system "$dir"
	fi
}

down_prefix() {
	local p=$1 br sf h
	valid_prefix "$p" || usage "bad prefix '$p'"
	take_lock
	sf=$(state_file "$p")
	br=$(sed -n 's/^bridge=//p' "$sf" 2>/dev/null || true)
	[[ -n $br ]] || br=$(bridge_of "$p")
	for h in $(hosts_of "$p"); do
		host_down "$h"
	done
	link_exists "$br" && ip link del "$br"
	wait_link_gone "$br"
	fw_close "$br"
	rm -f "$sf" "$sf.tmp"
}

cmd_down() {
	if [[ ${1:-} == --all ]]; then
		local sf
		for sf in "$STATE_ROOT"/*.state; do
			[[ -e $sf ]] || continue
			(down_prefix "$(basename "$sf" .state)")
		done
		return 0
	fi
	[[ $# -eq 0 ]] || usage "down takes no arguments besides --prefix or --all"
	down_prefix "$prefix"
}

# ---------------------------------------------------------------- hosts

host_env() {
	local h=$1 dir
	dir=$(host_dir "$h")
	echo "SHOAL_DATA_DIR=$dir/data"
	echo "SHOAL_SOCKET=$dir/shoal.sock"
	echo "SHOAL_TESTBED_HOST=$h"
}

cmd_exec() {
	[[ $# -ge 2 ]] || usage "exec needs HOST and a command"
	local h
	h=$(resolve_host "$1")
	shift
	require_host "$h"
	local -a envs
	mapfile -t envs < <(host_env "$h")
	exec nsenter --net="/run/netns/$h" -- env "${envs[@]}" "$@"
}

cmd_agent() {
	[[ $# -ge 1 ]] || usage "agent needs HOST"
	local h
	h=$(resolve_host "$1")
	shift
	require_host "$h"
	take_lock
	local dir addr bin pid t
	dir=$(host_dir "$h")
	addr=$(host_addr "$h")
	bin=$(shoal_bin)
	if pid=$(agent_pid "$h"); then
		die "an agent already runs in $h (pid $pid)"
	fi
	local -a args=(agent --data-dir "$dir/data" --socket "$dir/shoal.sock"
		--listen-addr "$addr:$AGENT_PORT" --advertise-addr "$addr:$AGENT_PORT")
	[[ " $* " == *" --hostname "* || " $* " == *" --hostname="* ]] || args+=(--hostname "$h")
	local -a envs
	mapfile -t envs < <(host_env "$h")
	mkdir -p "$dir/data"
	rm -f "$dir/agent.pid"
	# The inner shell records its own pid, then execs into the agent: the pid is the agent's.
	# setsid: the agent outlives this script and the terminal or test that started it.
	# shellcheck disable=SC2016 # $$ and $0 belong to the inner shell
	setsid bash -c 'echo $$ >"$0.tmp" && mv "$0.tmp" "$0" && exec "$@"' "$dir/agent.pid" \
		nsenter --net="/run/netns/$h" -- env "${envs[@]}" "$bin" "${args[@]}" "$@" \
		</dev/null >>"$dir/agent.log" 2>&1 9>&- &
	for ((t = 0; t < PIDFILE_WAIT_TENTHS; t++)); do
		[[ -s $dir/agent.pid ]] && break
		sleep 0.1
	done
	[[ -s $dir/agent.pid ]] || die "the agent in $h did not start (see $dir/agent.log)"
	cat "$dir/agent.pid"
}

cmd_kill() {
	[[ $# -ge 1 && $# -le 2 ]] || usage "kill needs HOST and at most one signal"
	local h sig=${2:--TERM} pid
	h=$(resolve_host "$1")
	case $sig in
	-9 | -KILL | -SIGKILL) sig=KILL ;;
	-15 | -TERM | -SIGTERM) sig=TERM ;;
	-STOP | -SIGSTOP | -19) sig=STOP ;;
	-CONT | -SIGCONT | -18) sig=CONT ;;
	-INT | -SIGINT | -2) sig=INT ;;
	*) usage "unknown signal '$sig' (use -TERM, -9, -STOP, -CONT or -INT)" ;;
	esac
	pid=$(agent_pid "$h") || die "no agent runs in $h"
	kill "-$sig" "$pid"
}

cmd_addr() {
	[[ $# -eq 1 ]] || usage "addr needs HOST"
	local h
	h=$(resolve_host "$1")
	require_host "$h"
	host_addr "$h"
}

cmd_tmpfs() {
	[[ $# -eq 2 ]] || usage "tmpfs needs HOST and SIZE (like 16m)"
	local h size=$2 dir
	[[ $size =~ ^[0-9]+[kmgKMG]?$ ]] || usage "bad size '$size'"
	h=$(resolve_host "$1")
	require_host "$h"
	dir=$(host_dir "$h")/data
	mkdir -p "$dir"
	mountpoint -q "$dir" && die "$dir is already a mount point"
	mount -t tmpfs -o "size=$size,mode=0700" "shoal-testbed-$h" "$dir"
}

cmd_ls() {
	local sf p sub br h pid st
	for sf in "$STATE_ROOT"/*.state; do
		[[ -e $sf ]] || continue
		p=$(sed -n 's/^prefix=//p' "$sf")
		sub=$(sed -n 's/^subnet=//p' "$sf")
		br=$(sed -n 's/^bridge=//p' "$sf")
		echo "$p subnet=$sub.0/24 bridge=$br$(link_exists "$br" || echo ' (missing)')"
		for h in $(hosts_of "$p"); do
			if ! netns_exists "$h"; then
				echo "  $h (no namespace)"
				continue
			fi
			if pid=$(agent_pid "$h"); then
				st="agent $pid"
				proc_state "$pid" && [[ $REPLY == T ]] && st+=" stopped"
			else
				st="no agent"
			fi
			echo "  $h $(host_addr "$h" 2>/dev/null || echo '?') $st"
		done
	done
}

# ---------------------------------------------------------------- partitions

nft_host() {
	local h=$1
	shift
	command -v nft >/dev/null || die "partitions need nft (apt-get install nftables)"
	nsenter --net="/run/netns/$h" -- nft "$@"
}

nft_table() {
	nft_host "$1" -f - <<EOF
table inet $NFT_TABLE {
	chain input { type filter hook input priority -10; policy accept; }
	chain output { type filter hook output priority -10; policy accept; }
}
EOF
}

# Drop everything host `to` receives from host `from` (and what `from` sends to `to`).
drop_from() {
	local from=$1 to=$2 fa ta
	fa=$(host_addr "$from")
	ta=$(host_addr "$to")
	nft_table "$from"
	nft_table "$to"
	nft_host "$from" add rule inet "$NFT_TABLE" output ip daddr "$ta" drop
	nft_host "$to" add rule inet "$NFT_TABLE" input ip saddr "$fa" drop
}

parse_group() {
	local g=$1 x
	[[ -n $g ]] || usage "empty group"
	IFS=, read -ra xs <<<"$g"
	for x in "${xs[@]}"; do
		x=$(resolve_host "$x")
		require_host "$x"
		echo "$x"
	done
}

cmd_partition() {
	[[ $# -ge 2 ]] || usage "partition needs at least two groups (h1,h2 h3)"
	local -a groups=("$@")
	local i j a b
	for ((i = 0; i < ${#groups[@]}; i++)); do
		for ((j = i + 1; j < ${#groups[@]}; j++)); do
			for a in $(parse_group "${groups[i]}"); do
				for b in $(parse_group "${groups[j]}"); do
					[[ $a != "$b" ]] || die "$a is in two groups"
					drop_from "$a" "$b"
					drop_from "$b" "$a"
				done
			done
		done
	done
}

cmd_partition_one_way() {
	[[ $# -eq 2 ]] || usage "partition-one-way needs FROM and TO"
	local from to
	from=$(resolve_host "$1")
	to=$(resolve_host "$2")
	require_host "$from"
	require_host "$to"
	[[ $from != "$to" ]] || usage "FROM and TO are the same host"
	# Only at the receiver: FROM's packets leave and are lost on the way, TO's still arrive.
	local fa
	fa=$(host_addr "$from")
	nft_table "$to"
	nft_host "$to" add rule inet "$NFT_TABLE" input ip saddr "$fa" drop
}

cmd_heal() {
	[[ $# -eq 0 ]] || usage "heal takes no arguments besides --prefix"
	local h
	for h in $(hosts_of "$prefix"); do
		netns_exists "$h" || continue
		if nsenter --net="/run/netns/$h" -- nft list table inet "$NFT_TABLE" >/dev/null 2>&1; then
			nft_host "$h" delete table inet "$NFT_TABLE"
		fi
	done
}

# ---------------------------------------------------------------- main

# Options before the command, and (for all but exec/agent, whose arguments are a command's)
# anywhere after it.
take_opts() {
	rest=()
	while [[ $# -gt 0 ]]; do
		case $1 in
		--prefix)
			[[ $# -ge 2 ]] || usage "--prefix needs a value"
			prefix=$2
			shift 2
			;;
		--prefix=*)
			prefix=${1#--prefix=}
			shift
			;;
		--subnet)
			[[ $# -ge 2 ]] || usage "--subnet needs a value"
			subnet=$2
			subnet_given=1
			shift 2
			;;
		--subnet=*)
			subnet=${1#--subnet=}
			subnet_given=1
			shift
			;;
		*)
			rest+=("$1")
			shift
			;;
		esac
	done
}

main() {
	local -a pre=()
	while [[ $# -gt 0 && $1 == --* ]]; do
		pre+=("$1")
		[[ $1 == *=* ]] || {
			[[ $# -ge 2 ]] && pre+=("$2") && shift
		}
		shift
	done
	take_opts "${pre[@]}"
	((${#rest[@]} == 0)) || usage "unknown option ${rest[0]}"
	[[ $# -ge 1 ]] || usage "no command"
	local cmd=$1
	shift
	case $cmd in -h | --help | help)
		help
		return
		;;
	esac
	[[ $(id -u) == 0 ]] || die "must run as root (network namespaces)"
	case $cmd in
	exec | agent) ;;
	*)
		take_opts "$@"
		set -- "${rest[@]}"
		local a
		for a in "$@"; do
			[[ $a != --* || $a == --all ]] || usage "unknown option $a"
		done
		;;
	esac
	case $cmd in
	up) [[ $# -eq 1 ]] || usage "up needs exactly one host count"; cmd_up "$@" ;;
	down) cmd_down "$@" ;;
	exec) cmd_exec "$@" ;;
	agent) cmd_agent "$@" ;;
	kill) cmd_kill "$@" ;;
	addr) cmd_addr "$@" ;;
	ls) [[ $# -eq 0 ]] || usage "ls takes no arguments"; cmd_ls ;;
	tmpfs) cmd_tmpfs "$@" ;;
	partition) cmd_partition "$@" ;;
	partition-one-way) cmd_partition_one_way "$@" ;;
	heal) cmd_heal "$@" ;;
	-h | --help | help) help ;;
	*) usage "unknown command '$cmd'" ;;
	esac
}

main "$@"
