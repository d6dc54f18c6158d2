#!/bin/sh
# A walk through keyagent with a real agent process: start it, hand it a key, use the key
# without ever writing it to a file, lock it, and stop it. Run with: make demo
set -eu

workdir=$(mktemp -d)
trap 'keyagent -k >/dev/null 2>&1 || true; rm -rf "$workdir"' EXIT
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

step 'eval "$(keyagent -a $workdir/agent.sock -t 1h)"'
eval "$(keyagent -a "$workdir/agent.sock" -t 1h)"

step 'keyagent-ctl status'
keyagent-ctl status

step "printf %s 'demo-key-…' | keyagent-ctl add --host app.conduce.com --user me@example.com -D demo"
printf %s "demo-key-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')" |
  keyagent-ctl add --host app.conduce.com --user me@example.com -D demo

step 'keyagent-ctl list'
keyagent-ctl list

step 'keyagent-ctl exec -- sh -c '\''echo "the tool sees a key of ${#CONDUCE_API_KEY} characters"'\'''
keyagent-ctl exec -- sh -c 'echo "the tool sees a key of ${#CONDUCE_API_KEY} characters"'

step "python3 -c 'import keyagent; print(len(keyagent.get_key(host=\"app.conduce.com\")))'"
python3 -c 'import keyagent; print(len(keyagent.get_key(host="app.conduce.com")))'

step 'echo s3cret | keyagent-ctl lock; keyagent-ctl get'
echo s3cret | keyagent-ctl lock
keyagent-ctl get || echo "(exit status $?: locked)"

step 'echo s3cret | keyagent-ctl unlock'
echo s3cret | keyagent-ctl unlock

step 'eval "$(keyagent -k)"'
eval "$(keyagent -k)"
