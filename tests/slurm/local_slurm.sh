#!/usr/bin/env bash
# local_slurm.sh - bring up a REAL single-node SLURM cluster on a Debian bookworm machine
# (a CI runner, a laptop VM) from Debian packages only, for xmodal's tests (tests/test_slurm.py).
# Adapted from the team's verified recipe; every daemon is started by this script, recorded in
# a pid file under $SLURM_CI_DIR, and `down` stops exactly those (never a daemon it did not start).
#
#   * munged + slurmctld + slurmd (slurm-wlm 22.05.x from Debian), running as root
#   * select/cons_tres, one partition (default "debug", Default=YES)
#   * N fake GPUs as gres/gpu. Slurm 22.05 silently drops a gpu gres with no File=,
#     so File= points at symlinks to /dev/null. Only the scheduler logic is exercised;
#     jobs do get CUDA_VISIBLE_DEVICES=0,1,...
#   * MariaDB + slurmdbd (default ON), so that `sacct` works. Without slurmdbd sacct answers
#     "Slurm accounting storage is disabled", and snakemake-executor-plugin-slurm then needs
#     `slurm-status-command: squeue`.
#   * memory is enforced (JobAcctGatherParams=OverMemoryKill): a job using more than it asked
#     for ends OUT_OF_MEMORY, as on a real cluster.
#   * the configuration goes to /etc/slurm (slurm.conf, gres.conf, slurmdbd.conf, each marked as
#     written by this script; `purge` removes them). It cannot live elsewhere via SLURM_CONF:
#     snakemake-executor-plugin-slurm-jobstep strips SLURM_* variables before the `srun` it runs
#     inside every job, so that srun only finds /etc/slurm/slurm.conf. An existing slurm.conf
#     that this script did not write is never touched (`up` exits 3). The ports below differ
#     from SLURM's defaults.
#
# Usage (as root):
#   local_slurm.sh up       install packages (apt-get), configure, start (idempotent), wait until idle
#   local_slurm.sh env      print `export SLURM_CONF=...` for this cluster
#   local_slurm.sh test     short sbatch/sacct smoke test (after "up")
#   local_slurm.sh status   show the daemons and sinfo
#   local_slurm.sh down     stop only the daemons this script started (by their pid files)
#   local_slurm.sh purge    down, then remove what this script wrote (under $SLURM_CI_DIR, /etc/slurm)
#
# Exit status: 0 ok, 1 error, 3 packages missing and cannot be installed, 4 not root.
#
# Environment (all optional):
#   SLURM_CI_DIR=/tmp/xmodal-slurm   config, state, spool, logs, pid files, fake GPUs, MariaDB data
#                                    (must be traversable by the munge and mysql users)
#   SLURM_CI_DBD=1                1 = also MariaDB + slurmdbd (sacct works); 0 = no accounting
#   SLURM_CI_GPUS=2               number of fake GPUs (0 = no gres)
#   SLURM_CI_GPU_TYPE=            optional GPU type, e.g. "a100" -> Gres=gpu:a100:2
#   SLURM_CI_CPUS=                CPUs to advertise (default: what `slurmd -C` finds)
#   SLURM_CI_MEM_MB=              RealMemory (default: 90% of what `slurmd -C` finds)
#   SLURM_CI_CLUSTER=xmodalci     ClusterName
#   SLURM_CI_PARTITION=debug      partition name
#   SLURM_CI_PORT=26817           slurmctld port; slurmd uses +1, slurmdbd +2
#   SLURM_CI_DB_PORT=26306        TCP port of the private MariaDB (127.0.0.1 only)
#   SLURM_CI_SKIP_APT=0           1 = never run apt-get (packages must be there)
#   SLURM_CI_ETC=/etc/slurm       where the configuration goes (see above before changing it)
#
# Snakemake 9 + snakemake-executor-plugin-slurm 2.8 against this cluster: see docs/cluster.md
# and profiles/slurm/config.yaml; with SLURM_CI_DBD=0 the profile needs `slurm-status-command: squeue`.
set -euo pipefail

BASE=${SLURM_CI_DIR:-/tmp/xmodal-slurm}
WITH_DBD=${SLURM_CI_DBD:-1}
NGPU=${SLURM_CI_GPUS:-2}
GPU_TYPE=${SLURM_CI_GPU_TYPE:-}
CLUSTER=${SLURM_CI_CLUSTER:-xmodalci}
PARTITION=${SLURM_CI_PARTITION:-debug}
DB_PORT=${SLURM_CI_DB_PORT:-26306}
CTLD_PORT=${SLURM_CI_PORT:-26817}
SLURMD_PORT=$((CTLD_PORT + 1))
DBD_PORT=$((CTLD_PORT + 2))
SKIP_APT=${SLURM_CI_SKIP_APT:-0}
DB_PASS=slurmci             # local throw-away database, reachable on 127.0.0.1 only

ETC=${SLURM_CI_ETC:-/etc/slurm}
export SLURM_CONF=$ETC/slurm.conf   # gres.conf and slurmdbd.conf are read from the same folder
RUN=$BASE/run
LOG=$BASE/log
MYSQL_DATA=$BASE/mysql
MYSQL_RUN=$BASE/run/mysqld            # owned by mysql: socket, pid file, error log
MYSQL_SOCK=$MYSQL_RUN/mysqld.sock
MUNGE_PIDFILE=/run/munge/munged.pid   # munged's compiled-in default
NODE=$(hostname -s)

log() { printf '[local_slurm] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

MARK='written by xmodal tests/slurm/local_slurm.sh'
OWNER="$MARK for $BASE"
[ "$(id -u)" = 0 ] || { log "must run as root (use sudo)"; exit 4; }

# ---------------------------------------------------------------- helpers
# pid_alive PIDFILE COMM: true if the pid in PIDFILE runs a process named COMM
pid_alive() {
    local pf=$1 comm=$2 pid
    [ -s "$pf" ] || return 1
    pid=$(cat "$pf" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$comm" ]
}

# stop_pidfile PIDFILE COMM: TERM the daemon named in PIDFILE (only if it is COMM) and wait
stop_pidfile() {
    local pf=$1 comm=$2 pid i
    if pid_alive "$pf" "$comm"; then
        pid=$(cat "$pf")
        log "stopping $comm (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for i in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && { log "$comm did not stop, sending KILL"; kill -9 "$pid" 2>/dev/null || true; }
    fi
    rm -f "$pf"
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.5 s
wait_for() {
    local secs=$1 what=$2 i; shift 2
    for i in $(seq $((secs * 2))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    die "timed out after ${secs}s waiting for: $what"
}

# install_if_changed SRC DEST MODE: returns 0 if DEST was (re)written
install_if_changed() {
    local src=$1 dest=$2 mode=$3
    if [ -f "$dest" ] && cmp -s "$src" "$dest"; then rm -f "$src"; return 1; fi
    install -m "$mode" "$src" "$dest"; rm -f "$src"; return 0
}

# ---------------------------------------------------------------- packages
install_packages() {
    local pkgs="munge slurmctld slurmd slurm-client" missing="" p added_policy=0
    [ "$WITH_DBD" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server mariadb-client"
    for p in $pkgs; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
    done
    [ -z "$missing" ] && { log "packages already installed"; return; }
    if [ "$SKIP_APT" = 1 ]; then log "missing packages:$missing (SLURM_CI_SKIP_APT=1)"; exit 3; fi
    command -v apt-get >/dev/null || { log "missing packages:$missing and no apt-get (not Debian?)"; exit 3; }
    # Keep the packages' init scripts / systemd units from starting daemons during the
    # install (they would fight with ours); Debian's standard mechanism is policy-rc.d.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d
        added_policy=1
    fi
    log "apt-get install:$missing"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing >/dev/null; }; then
        [ "$added_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
        log "apt-get install of$missing failed (no network or no Debian mirror?)"; exit 3
    fi
    [ "$added_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    return 0
}

# ---------------------------------------------------------------- configuration
CHANGED_SLURM=0
CHANGED_DBD=0

# check_config_owner: never overwrite a SLURM configuration this script did not write, nor one
# that belongs to another live cluster of this script (another SLURM_CI_DIR)
check_config_owner() {
    local f=$ETC/slurm.conf other
    [ -e "$f" ] || return 0
    if ! grep -qs "$MARK" "$f"; then
        log "$f exists and was not written by this script (a site SLURM?); not touching it"
        exit 3
    fi
    other=$(sed -n "s|^# $MARK for \(.*\) - single-node CI cluster\$|\1|p" "$f" | head -1)
    if [ -n "$other" ] && [ "$other" != "$BASE" ] && pid_alive "$other/run/slurmctld.pid" slurmctld; then
        log "another local cluster (SLURM_CI_DIR=$other) is running and owns $f; stop it first"
        exit 3
    fi
}

write_configs() {
    check_config_owner
    mkdir -p "$ETC" "$BASE/state/ctld" "$BASE/state/d" "$RUN" "$LOG" "$BASE/fakegpu"

    # hardware as slurmd sees it
    local hw cpus mem
    hw=$(slurmd -C 2>/dev/null | head -1) || true
    cpus=${SLURM_CI_CPUS:-$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")}
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    [ -n "$cpus" ] || cpus=$(nproc)
    [ -n "$mem" ] || mem=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 ))
    mem=${SLURM_CI_MEM_MB:-$(( mem * 9 / 10 ))}

    # fake GPU "devices": slurm only stat()s them (must be char/block devices)
    local i gres_node="" gres_conf="" gres_types=""
    if [ "$NGPU" -gt 0 ]; then
        gres_types="GresTypes=gpu"
        gres_node=" Gres=gpu:${GPU_TYPE:+$GPU_TYPE:}$NGPU"
        for i in $(seq 0 $((NGPU - 1))); do
            ln -sfn /dev/null "$BASE/fakegpu/nvidia$i"
            gres_conf+="NodeName=$NODE Name=gpu${GPU_TYPE:+ Type=$GPU_TYPE} File=$BASE/fakegpu/nvidia$i"$'\n'
        done
    fi

    local acct
    if [ "$WITH_DBD" = 1 ]; then
        acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStorageTRES=gres/gpu
# keep sbatch --comment (snakemake-executor-plugin-slurm writes rule_<rule>_wildcards_... there)
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=1
JobAcctGatherParams=OverMemoryKill"
    else
        acct="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
    fi

    local tmp
    tmp=$(mktemp)
    cat > "$tmp" <<EOF
# $OWNER - single-node CI cluster
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
# no cgroups in containers / sandboxes
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# trust the values below rather than the detected hardware (allows faking a bigger node)
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1000
ReturnToService=2
# keep finished jobs visible to squeue for 5 min (squeue-based status checks need >= 120 s)
MinJobAge=300
$gres_types
$acct
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem$gres_node State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    install_if_changed "$tmp" "$ETC/slurm.conf" 644 && CHANGED_SLURM=1

    tmp=$(mktemp)
    printf '# %s\n%s' "$OWNER" "$gres_conf" > "$tmp"
    install_if_changed "$tmp" "$ETC/gres.conf" 644 && CHANGED_SLURM=1

    if [ "$WITH_DBD" = 1 ]; then
        tmp=$(mktemp)
        cat > "$tmp" <<EOF
# $OWNER
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
        install_if_changed "$tmp" "$ETC/slurmdbd.conf" 600 && CHANGED_DBD=1
    fi
    return 0
}

# ---------------------------------------------------------------- daemons
munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating munge key"
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    fi
    if munge_works; then log "munge already running"; return; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge; chmod 755 /run/munge
    log "starting munged"
    # --force: a stale socket left behind by a killed munged is not fatal
    runuser -u munge -- /usr/sbin/munged --force
    wait_for 20 munged munge_works
    cp "$MUNGE_PIDFILE" "$RUN/munged.pid"   # remember that we started it
}

mysql_ok() { mariadb --protocol=socket --socket="$MYSQL_SOCK" -e 'select 1' >/dev/null 2>&1; }

start_mariadb() {
    if pid_alive "$MYSQL_RUN/mariadbd.pid" mariadbd && mysql_ok; then
        log "mariadbd already running"
    else
        mkdir -p "$MYSQL_DATA" "$MYSQL_RUN"
        chown mysql:mysql "$MYSQL_DATA" "$MYSQL_RUN"
        if [ ! -d "$MYSQL_DATA/mysql" ]; then
            log "initialising MariaDB data directory $MYSQL_DATA"
            mariadb-install-db --no-defaults --user=mysql --datadir="$MYSQL_DATA" \
                --skip-test-db > "$LOG/mariadb-install.log" 2>&1
        fi
        log "starting mariadbd on 127.0.0.1:$DB_PORT"
        nohup mariadbd --no-defaults --user=mysql --datadir="$MYSQL_DATA" \
            --socket="$MYSQL_SOCK" --pid-file="$MYSQL_RUN/mariadbd.pid" \
            --bind-address=127.0.0.1 --port="$DB_PORT" \
            --log-error="$MYSQL_RUN/mariadb.err" \
            --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900 \
            > /dev/null 2>&1 < /dev/null &
        wait_for 60 mariadbd mysql_ok
    fi
    mariadb --protocol=socket --socket="$MYSQL_SOCK" -e "
        CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
        FLUSH PRIVILEGES;"
}

start_slurmdbd() {
    if [ "$CHANGED_DBD" = 1 ]; then stop_pidfile "$RUN/slurmdbd.pid" slurmdbd; fi
    if pid_alive "$RUN/slurmdbd.pid" slurmdbd; then
        log "slurmdbd already running"
    else
        log "starting slurmdbd"
        /usr/sbin/slurmdbd
    fi
    wait_for 60 "slurmdbd (sacctmgr list cluster)" sacctmgr -n list cluster
}

ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

start_slurm() {
    if [ "$CHANGED_SLURM" = 1 ]; then
        stop_pidfile "$RUN/slurmd.pid" slurmd
        stop_pidfile "$RUN/slurmctld.pid" slurmctld
    fi
    if pid_alive "$RUN/slurmctld.pid" slurmctld; then
        log "slurmctld already running"
    else
        log "starting slurmctld"
        /usr/sbin/slurmctld
    fi
    wait_for 60 slurmctld ctld_up
    if pid_alive "$RUN/slurmd.pid" slurmd; then
        log "slurmd already running"
    else
        log "starting slurmd"
        /usr/sbin/slurmd
    fi
    # the node must come up idle; a node drained by an earlier bad config is resumed
    local i st
    for i in $(seq 120); do
        st=$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -1 || true)
        case "$st" in
            idle|mixed|allocated) log "node $NODE is $st"; return 0 ;;
            drain*|down*|inval*|fail*)
                scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    scontrol show node "$NODE" >&2 || true
    die "node $NODE did not become idle (state: ${st:-unknown}); see $LOG/slurmd.log and $LOG/slurmctld.log"
}

# ---------------------------------------------------------------- commands
# port_free PORT: nothing listens on 127.0.0.1:PORT / *:PORT (a foreign daemon would answer us)
port_free() { ! (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; }

check_ports() {
    local p d
    for d in "$CTLD_PORT:slurmctld:$RUN/slurmctld.pid" "$SLURMD_PORT:slurmd:$RUN/slurmd.pid" \
             "$DBD_PORT:slurmdbd:$RUN/slurmdbd.pid" "$DB_PORT:mariadbd:$MYSQL_RUN/mariadbd.pid"; do
        IFS=: read -r p comm pf <<<"$d"
        pid_alive "$pf" "$comm" && continue          # ours, from an earlier `up`
        port_free "$p" || die "port $p (for $comm) is taken by a process this script did not start; set SLURM_CI_PORT / SLURM_CI_DB_PORT"
    done
}

cmd_up() {
    local t0=$SECONDS
    mkdir -p "$BASE"; chmod 755 "$BASE"   # munge and mysql must traverse it
    install_packages
    check_ports
    write_configs
    start_munge
    if [ "$WITH_DBD" = 1 ]; then start_mariadb; start_slurmdbd; fi
    start_slurm
    log "cluster '$CLUSTER' up in $((SECONDS - t0))s (node $NODE, partition $PARTITION, ${NGPU} fake GPU(s), slurmdbd=$WITH_DBD)"
    sinfo -o '%P %a %D %T %N %c %m %G' >&2
}

cmd_down() {
    stop_pidfile "$RUN/slurmd.pid" slurmd
    stop_pidfile "$RUN/slurmctld.pid" slurmctld
    stop_pidfile "$RUN/slurmdbd.pid" slurmdbd
    stop_pidfile "$MYSQL_RUN/mariadbd.pid" mariadbd
    # munged only if we started it (our copy of its pid file)
    if [ -s "$RUN/munged.pid" ] && pid_alive "$RUN/munged.pid" munged; then
        stop_pidfile "$RUN/munged.pid" munged
        rm -f "$MUNGE_PIDFILE"
    fi
    rm -f "$RUN/munged.pid"
}

cmd_purge() {
    cmd_down
    local f
    for f in "$ETC/slurm.conf" "$ETC/gres.conf" "$ETC/slurmdbd.conf"; do
        grep -qs "$OWNER" "$f" && rm -f "$f"
    done
    # only what this script creates; anything else under $BASE is left alone
    rm -rf "$BASE/state" "$BASE/run" "$BASE/log" "$BASE/fakegpu" "$BASE/mysql" "$BASE"/smoke.*
    rmdir "$BASE" 2>/dev/null || true
}

cmd_status() {
    local d
    for d in "$RUN/munged.pid:munged" "$MYSQL_RUN/mariadbd.pid:mariadbd" "$RUN/slurmdbd.pid:slurmdbd" \
             "$RUN/slurmctld.pid:slurmctld" "$RUN/slurmd.pid:slurmd"; do
        if pid_alive "${d%%:*}" "${d##*:}"; then echo "${d##*:}: running (pid $(cat "${d%%:*}"))"
        else echo "${d##*:}: not running (from this script)"; fi
    done
    sinfo -o '%P %a %D %T %N %c %m %G' || true
}

cmd_test() {
    local d out ids fail
    d=$(mktemp -d "$BASE/smoke.XXXX"); cd "$d"
    ids="$(sbatch --parsable -o plain.out --wrap 'hostname')"
    ids+=" $(sbatch --parsable -o gres.out --gres=gpu:1 --wrap 'echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES')"
    ids+=" $(sbatch --parsable -o gpus.out --gpus=1 --wrap 'echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES')"
    fail=$(sbatch --parsable -o /dev/null --wrap 'exit 3')
    # shellcheck disable=SC2086
    wait_for 120 "smoke-test jobs to finish" sh -c "[ -z \"\$(squeue -h -t PD,R,CG -j ${ids// /,},$fail)\" ]"
    for out in plain gres gpus; do echo "$out: $(cat $out.out)"; done
    grep -q 'CUDA_VISIBLE_DEVICES=[0-9]' gpus.out || die "no GPU visible in --gpus=1 job"
    if [ "$WITH_DBD" = 1 ]; then
        wait_for 30 "sacct to report job $fail as FAILED" sh -c "sacct -X -n -P -j $fail -o State | grep -q FAILED"
        sacct -X -j "${ids// /,},$fail" -o JobID,JobName,State,ExitCode,AllocTRES%45
    else
        squeue --states=all -j "${ids// /,},$fail" -o '%i %j %T'
    fi
    echo "smoke test OK"
}

case "${1:-up}" in
    up) cmd_up ;;
    env) echo "export SLURM_CONF=$SLURM_CONF" ;;
    down|stop) cmd_down ;;
    purge) cmd_purge ;;
    status) cmd_status ;;
    test) cmd_test ;;
    *) echo "usage: $0 [up|env|test|status|down|purge]" >&2; exit 2 ;;
esac
