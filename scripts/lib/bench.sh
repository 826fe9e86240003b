# What the benchmark scripts share (scripts/bench-wrk, bench-layer-instr, bench-pg-bound,
# bench-store-cpu, bench-proxy-spread, bench-floor, bench-wire):
# sourced, not run. The functions that write files write them in $dir, which the sourcing
# script makes; count_run reads $counter and $instr_duration.

# install_missing PACKAGE...: installs the Debian packages named, if any; the package lists are
# updated only when installing without that fails.
install_missing() {
  [ $# -gt 0 ] || return 0
  echo "== installing $*" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "$@" >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq "$@" >/dev/null; }
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The median of the numbers on standard input, one a line.
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# The newest installed PostgreSQL's own bin directory (initdb, postgres, pgbench and psql side
# by side); empty when there is none.
pg_bin_dir() {
  local initdb
  initdb=$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$initdb" ] && dirname "$initdb"
  return 0
}

# Runs a command as the postgres user when root (the server refuses root).
as_pg() { if [ "$(id -u)" = 0 ]; then setpriv --reuid=postgres --regid=postgres --init-groups "$@"; else "$@"; fi; }

# pg_start BIN DIR PORT [SERVER ARGS...]: a new cluster in DIR/data, served on 127.0.0.1:PORT
# (socket in DIR, log in DIR/log) with the arguments given (`-c fsync=off`, ...); returns
# once it accepts connections. Stop it with pg_stop DIR.
pg_start() {
  local bin=$1 d=$2 port=$3
  shift 3
  mkdir -p "$d"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$d"
  as_pg "$bin/initdb" -D "$d/data" -U postgres -A trust -E UTF8 --locale=C --no-sync >/dev/null
  as_pg "$bin/postgres" -D "$d/data" -p "$port" -k "$d" -c listen_addresses=127.0.0.1 "$@" \
    >"$d/log" 2>&1 &
  for _ in $(seq 100); do
    "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" && return 0
    sleep 0.1
  done
  echo "PostgreSQL did not start: $(tail -5 "$d/log")" >&2
  return 1
}

# pg_stop DIR: a fast shutdown of the server pg_start started in DIR, by the postmaster's own
# pid (not the shell's that started it), waiting until it is gone.
pg_stop() {
  local pm
  pm=$(head -1 "$1/data/postmaster.pid" 2>/dev/null || true)
  [ -n "$pm" ] || return 0
  kill -INT "$pm" 2>/dev/null || return 0
  for _ in $(seq 100); do
    kill -0 "$pm" 2>/dev/null || return 0
    sleep 0.1
  done
}

# write_lua: the wrk scripts in $dir. keyless.lua sends the order without a key; fresh.lua a
# new Idempotency-Key each request, tagged by thread and by the `run` global that wrk_run puts
# first; replay.lua one of the 1000 keys `seed` completes.
write_lua() {
  cat >"$dir/keyless.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"product":"Teapot","quantity":2}'
wrk.headers["Content-Type"] = "application/json"
LUA
  cat >"$dir/fresh.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"product":"Teapot","quantity":2}'
wrk.headers["Content-Type"] = "application/json"
local n, thread_id = 0, 0
function setup(thread) thread_id = thread_id + 1; thread:set("tid", thread_id) end
function request()
  n = n + 1
  wrk.headers["Idempotency-Key"] = string.format('"f-%s-%d-%d"', run, tid, n)
  return wrk.format()
end
LUA
  cat >"$dir/replay.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"product":"Teapot","quantity":2}'
wrk.headers["Content-Type"] = "application/json"
local n = 0
function request()
  n = n + 1
  wrk.headers["Idempotency-Key"] = string.format('"r-%d"', n % 1000)
  return wrk.format()
end
LUA
}

# seed PORT: completes the replay keys once, before any replay row.
seed() {
  for i in $(seq 0 999); do
    curl -fsS -o /dev/null -X POST -H 'Content-Type: application/json' -H "Idempotency-Key: \"r-$i\"" \
      -d '{"product":"Teapot","quantity":2}' "http://127.0.0.1:$1/orders"
  done
}

# wrk_run PORT SCRIPT DURATION [CONNECTIONS]: one wrk run of $dir/SCRIPT.lua against
# /orders (32 connections unless told); its output in $dir/wrk.out. For fresh keys, Lua's
# `run` global tags each run, so that no run repeats another's keys.
wrk_run() {
  local script=$2 conns=${4:-32}
  if [ "$script" = fresh ]; then
    { echo "run = \"$1-$RANDOM$RANDOM\""; cat "$dir/fresh.lua"; } >"$dir/fresh-run.lua"
    script=fresh-run
  fi
  wrk "-t$((conns < 2 ? 1 : 2))" "-c$conns" -d"$3" --latency -s "$dir/$script.lua" \
    "http://127.0.0.1:$1/orders" >"$dir/wrk.out" 2>&1
}

# The answers of the last run that were not 2xx, and its socket errors (time-outs included).
errors() {
  awk '/Non-2xx/ {n += $NF} /Socket errors/ {gsub(",", ""); n += $4 + $6 + $8 + $10} END {print n + 0}' "$dir/wrk.out"
}

# What counts instructions here: `perf` where the machine has hardware counters, `callgrind`
# otherwise (the server then runs under valgrind_wrapper).
instr_counter() {
  if perf stat -x, -e instructions true 2>&1 >/dev/null | grep -q '^[0-9]'; then
    echo perf
  else
    echo callgrind
  fi
}

# Sets `wrapper`, the command a server runs under for $counter: valgrind's callgrind, writing
# $dir/cg.out.PID.*, or none for perf.
set_wrapper() {
  wrapper=()
  if [ "$counter" = callgrind ]; then
    wrapper=(valgrind --tool=callgrind --dump-instr=no "--callgrind-out-file=$dir/cg.out.%p")
  fi
}

# count_run PORT ROW PID: instructions of PID per request over one run of $instr_duration,
# one request at a time, after a second of warm-up. With callgrind, the run's profile stays in
# $dir/cg.out.PID.* until the next count_run.
count_run() {
  local port=$1 row=$2 pid=$3 ir n
  wrk_run "$port" "$row" 1s
  if [ "$counter" = perf ]; then
    perf stat -x, -e instructions -p "$pid" -o "$dir/perf.out" &
    local perf_pid=$!
    sleep 0.2
    wrk_run "$port" "$row" "$instr_duration" 1
    kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true
    ir=$(awk -F, '/instructions/ {print $1}' "$dir/perf.out")
  else
    rm -f "$dir"/cg.out.*
    callgrind_control -z "$pid" >/dev/null 2>&1
    wrk_run "$port" "$row" "$instr_duration" 1
    callgrind_control -d "$pid" >/dev/null 2>&1
    ir=$(cat "$dir"/cg.out."$pid".* | awk '/^(summary|totals):/ {print $2; exit}')
  fi
  n=$(awk '/requests in/ {print $1}' "$dir/wrk.out")
  if [ "$(errors)" != 0 ]; then echo "wrk: errors while counting $row: $(cat "$dir/wrk.out")" >&2; exit 1; fi
  echo $((ir / n))
}

# nginx_conf NAME WORKERS SERVER_BLOCK [MAIN_LINES]: $dir/NAME.conf, an nginx with WORKERS
# worker processes, its pid, logs and temporary files in $dir.
nginx_conf() {
  cat >"$dir/$1.conf" <<CONF
${4:-}
worker_processes $2;
pid $dir/$1.pid;
error_log $dir/$1.error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/$1-body;
  proxy_temp_path $dir/$1-proxy;
  $3
}
CONF
}

# upstream_block PORT: the server block of the upstream every proxy is measured in front of,
# nginx answering `return 201` on 127.0.0.1:PORT.
upstream_block() {
  echo "server { listen 127.0.0.1:$1; location / { return 201 '{\"id\":1,\"product\":\"Teapot\"}'; } }"
}

# peer_block PORT UPSTREAM_PORT: the server block of the peer, nginx `proxy_pass` on
# 127.0.0.1:PORT to the upstream, with a keep-alive pool of 64.
peer_block() {
  echo "upstream app { server 127.0.0.1:$2; keepalive 64; }
  server { listen 127.0.0.1:$1; location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
}

# ticks PID...: the CPU clock ticks (user + system) the processes named have spent so far, all
# their threads.
ticks() { local s=0 p; for p in "$@"; do s=$((s + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$s"; }

# serving PORT: the processes that serve a port (nginx: its workers; ours: the proxy).
serving() { ss -ltnpH "sport = :$1" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u | tr '\n' ' '; }

# p99_ms: the p99 in ms of the last wrk run, from its latency distribution.
p99_ms() {
  awk '$1 == "99%" { v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v);
    if (u == "us") v /= 1000; else if (u == "s") v *= 1000; else if (u == "m") v *= 60000; print v }' "$dir/wrk.out"
}

# measure PORT ROW: "req/s p99-ms cpu-µs-per-request errors" of one wrk run of $duration, the
# CPU time being that of the processes serving PORT.
measure() {
  local procs t0 t1 n
  procs=$(serving "$1")
  # shellcheck disable=SC2086
  t0=$(ticks $procs)
  wrk_run "$1" "$2" "$duration"
  # shellcheck disable=SC2086
  t1=$(ticks $procs)
  n=$(awk '/requests in/ {print $1}' "$dir/wrk.out")
  echo "$(awk '/Requests\/sec/ {print $2}' "$dir/wrk.out") $(p99_ms) $(echo "($t1 - $t0) * 1000000 / $(getconf CLK_TCK) / $n" | bc -l) $(errors)"
}

# col N: the Nth column of standard input.
col() { awk -v c="$1" '{print $c}'; }
