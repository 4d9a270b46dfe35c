#!/usr/bin/env bash
# demo.sh [up|down]: a local one-node shoal cluster with a real service on it.
#   up (default)  build shoal, start `shoal agent` on 127.0.0.1:4242 with its data under
#                 $SHOAL_DEMO_DIR (default /tmp/shoal-demo), init the cluster, import a busybox
#                 image, create a web service published on port 8080 (curl answers) and a
#                 3-replica service, and show their tasks
#   down          remove the service, stop the agent this script started (by pid), delete the dir
# Needs root (containers: namespaces, cgroups, overlayfs) and Debian's busybox-static.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${SHOAL_DEMO_DIR:-/tmp/shoal-demo}
bin=$PWD/target/release/shoal
export SHOAL_DATA_DIR=$dir/data SHOAL_SOCKET=$dir/shoal.sock

down() {
  local tasks=$SHOAL_DATA_DIR/containers/.tasks
  if [[ -S $SHOAL_SOCKET ]]; then "$bin" service rm web ticker >/dev/null 2>&1 || true; fi
  # The agent stops the service's containers (SIGTERM, then SIGKILL after the grace period):
  # wait for that, bounded, before the agent goes.
  for _ in $(seq 150); do
    [[ -z $("$bin" runtime --root "$tasks" list -q 2>/dev/null) ]] && break
    sleep 0.1
  done
  if [[ -f $dir/agent.pid ]]; then
    pid=$(cat "$dir/agent.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  # Anything the agent did not get to (it was killed, say) is removed here, cgroups included.
  for id in $("$bin" runtime --root "$tasks" list -q 2>/dev/null); do
    "$bin" runtime --root "$tasks" delete -f "$id" >/dev/null 2>&1 || true
  done
  rm -rf "$dir"
}

up() {
  [[ $(id -u) == 0 ]] || { echo "demo.sh: run as root (containers need it)" >&2; exit 1; }
  if [[ ! -x /bin/busybox ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null
  fi
  cargo build --release -p shoal
  [[ -e $dir ]] && down
  mkdir -p "$dir/rootfs"/{bin,etc,proc,sys,dev,tmp,root}
  "$bin" agent --listen-addr 127.0.0.1:4242 --advertise-addr 127.0.0.1:4242 >"$dir/agent.log" 2>&1 &
  echo $! >"$dir/agent.pid"
  for _ in $(seq 100); do [[ -S $SHOAL_SOCKET ]] && break; sleep 0.1; done
  "$bin" cluster init --advertise-addr 127.0.0.1:4242

  # A one-layer busybox image in the node's image store.
  cp /bin/busybox "$dir/rootfs/bin/busybox"
  for a in $(/bin/busybox --list); do [[ $a == busybox ]] || ln -sf busybox "$dir/rootfs/bin/$a"; done
  echo 'root:x:0:0:root:/root:/bin/sh' >"$dir/rootfs/etc/passwd"
  tar -C "$dir/rootfs" -cf "$dir/busybox.tar" .
  "$bin" image import "$dir/busybox.tar" busybox:latest

  # A web server published on port 8080 through the routing mesh, and three workers.
  "$bin" service create --name web --stop-grace-period 2s \
    --publish 8080:80 busybox:latest \
    sh -c 'echo "hello from $(hostname)" >/tmp/index.html; exec httpd -f -p 80 -h /tmp'
  "$bin" service create --name ticker --replicas 3 --stop-grace-period 2s busybox:latest \
    sh -c 'while true; do echo "tick from $(hostname)"; sleep 5; done'
  "$bin" service ls
  "$bin" service ps web
  "$bin" node ls
  echo
  echo "curl http://127.0.0.1:8080/ answers:"
  for _ in $(seq 50); do
    if command -v curl >/dev/null; then curl -fsS --max-time 2 http://127.0.0.1:8080/ && break
    else busybox wget -q -T 2 -O - http://127.0.0.1:8080/ 2>/dev/null && break; fi
    sleep 0.1
  done
  echo
  echo "The cluster is up. Try: SHOAL_SOCKET=$SHOAL_SOCKET $bin service scale ticker=5"
  echo "Agent log: $dir/agent.log. Stop everything with: $0 down"
}

case ${1:-up} in
up) up ;;
down) down ;;
*) sed -n '2,8p' "$0"; exit 2 ;;
esac
