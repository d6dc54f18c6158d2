#!/usr/bin/env bash
# Run a command next to a private `systemd --user` manager, on a machine whose PID 1 is not
# systemd (a container, a CI runner). Needs root: it uses mount, cgroup and PID namespaces.
#
#   contrib/systemd/user-manager.sh [--user NAME] CMD [ARGS...]
#
# CMD runs with XDG_RUNTIME_DIR=/run/user/$UID and a user manager answering
# `systemctl --user`; the script exits with CMD's status. Then the manager is told to exit
# (its units are stopped as at logout) and everything started inside is gone: the script is
# PID 1 of its own PID namespace, so no process outlives it. HOME and the rest of the
# environment are passed through, so the manager loads units from $HOME/.config/systemd/user.
# With --user, the manager and CMD run as that user (HOME must be theirs), as they would
# after a login; without it, as root (root's own user manager, user@0.service).
#
# What it sets up, and why (each was needed here; tests/test_systemd.py runs it):
# * A cgroup of its own (a child of the current one in the cgroup2 hierarchy), a cgroup
#   namespace rooted there, and cgroup2 mounted on /sys/fs/cgroup. A user manager started
#   in the root cgroup takes it for its own and moves EVERY process of the machine into its
#   init.scope; confined like this it only sees its own. With --user the cgroup is
#   delegated (chowned) to the user, as user@.service does.
# * A tmpfs on /run with what PID 1 would have made: /run/systemd/system ("booted with
#   systemd"), /run/systemd/unit-root (where services' mount namespaces are assembled: an
#   unprivileged manager cannot create it, PrivateUsers= services fail with 226/NAMESPACE
#   without it), and /run/user/$UID, a 0700 tmpfs owned by the user (logind's job). /run
#   itself must be a tmpfs: with /run/user on the root file system, ProcSubset= services
#   lose sight of /run/user and so of $NOTIFY_SOCKET.
# * A fresh /proc for the PID namespace: the manager reads /proc/PID of its children.
# D-Bus is not needed: systemctl --user falls back to the manager's private socket (with
# dbus-user-session installed, the session bus is started on demand at $XDG_RUNTIME_DIR/bus).
# The manager logs to $XDG_RUNTIME_DIR/manager.log, not to the kernel log.
#
# Environment: USER_MANAGER_TIMEOUT (seconds, default 20) bounds the start and the exit.
set -euo pipefail

timeout_s=${USER_MANAGER_TIMEOUT:-20}

die() {
	echo "user-manager.sh: $*" >&2
	exit 1
}

inside() {
	# PID 1 of new PID, mount and cgroup namespaces (mount propagation private, /proc fresh).
	local user=$1
	shift
	local uid gid
	uid=$(id -u "$user")
	gid=$(id -g "$user")
	local as=()
	if [ "$uid" -ne 0 ]; then
		as=(setpriv "--reuid=$uid" "--regid=$gid" --init-groups)
		export USER=$user LOGNAME=$user
	fi

	mount -t cgroup2 cgroup2 /sys/fs/cgroup
	if [ "$uid" -ne 0 ]; then
		chown "$uid:$gid" /sys/fs/cgroup /sys/fs/cgroup/cgroup.procs \
			/sys/fs/cgroup/cgroup.subtree_control /sys/fs/cgroup/cgroup.threads
	fi
	mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
	mkdir -p /run/systemd/system /run/user /run/lock
	mkdir -m 0700 /run/systemd/unit-root
	mkdir "/run/user/$uid"
	mount -t tmpfs -o "mode=0700,uid=$uid,gid=$gid,nosuid,nodev" tmpfs "/run/user/$uid"
	export XDG_RUNTIME_DIR=/run/user/$uid
	unset DBUS_SESSION_BUS_ADDRESS NOTIFY_SOCKET LISTEN_PID LISTEN_FDS LISTEN_FDNAMES
	local systemd=/lib/systemd/systemd
	[ -x "$systemd" ] || systemd=/usr/lib/systemd/systemd
	local log=$XDG_RUNTIME_DIR/manager.log
	: >"$log"
	chown "$uid:$gid" "$log"

	# Everything runs with the caller's environment (its HOME included) and nothing more.
	local environment=()
	while IFS= read -r -d '' assignment; do
		environment+=("$assignment")
	done < <(env -0)
	run_as() {
		"${as[@]}" env -i "${environment[@]}" "$@"
	}

	run_as "$systemd" --user --log-target=console </dev/null >>"$log" 2>&1 &
	local manager=$!
	# The private socket appears once the manager listens; then wait for start-up to end.
	local deadline=$((SECONDS + timeout_s))
	until [ -S "$XDG_RUNTIME_DIR/systemd/private" ]; do
		if ! kill -0 "$manager" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
			cat "$log" >&2
			die "the user manager did not come up"
		fi
		sleep 0.02
	done
	run_as timeout "$timeout_s" systemctl --user is-system-running --wait >/dev/null || true

	local status=0
	run_as "$@" || status=$?

	run_as systemctl --user exit 2>/dev/null || kill -TERM "$manager"
	(
		sleep "$timeout_s"
		kill -KILL "$manager" 2>/dev/null
	) &
	local watchdog=$!
	wait "$manager" || true
	kill "$watchdog" 2>/dev/null || true
	exit "$status"
}

if [ "${1:-}" = "--inside" ]; then
	shift
	inside "$@"
fi

user=root
if [ "${1:-}" = "--user" ]; then
	[ "$#" -ge 2 ] || die "--user needs a user name"
	user=$2
	shift 2
	id -u "$user" >/dev/null || die "no user $user"
fi
[ "$#" -gt 0 ] || die "usage: $0 [--user NAME] CMD [ARGS...]"
[ "$(id -u)" -eq 0 ] || die "needs root (namespaces and cgroups)"

# The cgroup2 hierarchy: /sys/fs/cgroup (unified) or /sys/fs/cgroup/unified (hybrid).
if [ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ]; then
	hierarchy=/sys/fs/cgroup
elif [ -d /sys/fs/cgroup/unified ] && [ "$(stat -f -c %T /sys/fs/cgroup/unified)" = cgroup2fs ]; then
	hierarchy=/sys/fs/cgroup/unified
else
	die "no cgroup2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified"
fi
current=$(sed -n 's/^0:://p' /proc/self/cgroup)
home_cgroup=$hierarchy${current%/}
own_cgroup=$home_cgroup/keyagent-user-manager.$$
mkdir "$own_cgroup"

cleanup() {
	echo $$ >"$home_cgroup/cgroup.procs" 2>/dev/null || true
	# The PID namespace is gone once unshare returns; its processes may still be reaped.
	local deadline=$((SECONDS + 5))
	while grep -q '^populated 1' "$own_cgroup/cgroup.events" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
		sleep 0.02
	done
	find "$own_cgroup" -depth -type d -exec rmdir {} + 2>/dev/null || true
}
trap cleanup EXIT
echo $$ >"$own_cgroup/cgroup.procs"

# unshare forks the PID namespace's init and SIGKILLs it (and so the whole namespace) if
# unshare itself dies. unshare blocks TERM and INT while it waits, so on TERM, INT or HUP
# this script kills it outright: an interrupted run is torn down, not shut down.
unshare --mount --propagation private --cgroup --pid --fork --mount-proc --kill-child \
	"$0" --inside "$user" "$@" &
child=$!
trap 'kill -KILL "$child" 2>/dev/null || true' TERM INT HUP
status=0
wait "$child" || status=$?
# A signal interrupts the first wait; wait again for unshare itself to be gone.
while kill -0 "$child" 2>/dev/null; do
	wait "$child" || status=$?
done
exit "$status"
