#!/bin/sh
# keyagent for real: a real agent process talks HTTPS to a local Conduce emulator (a real
# TLS server with a throw-away CA, standing in for app.conduce.com). The password goes to
# the agent once; every later step uses the session or a key the agent holds, and no key
# is ever written to a file. Run with: make demo
set -eu

workdir=$(mktemp -d)
CONDUCE_EMULATOR_PID=
cleanup() {
  keyagent -k >/dev/null 2>&1 || true
  [ -n "$CONDUCE_EMULATOR_PID" ] && kill "$CONDUCE_EMULATOR_PID" 2>/dev/null || true
  rm -rf "$workdir"
}
trap cleanup EXIT INT TERM
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

# A stand-in for the Conduce service, on 127.0.0.1: it serves in the background once ready
# and exports CONDUCE_HOST, CONDUCE_CA_BUNDLE, CONDUCE_USER and CONDUCE_EMULATOR_PID.
# (Assigned first: `eval "$(...)"` alone would hide a failure from set -e.)
step 'eval "$(python3 -m keyagent.testing serve --background)"'
emulator_env=$(python3 -m keyagent.testing serve --background)
eval "$emulator_env"
echo "Conduce emulator on https://$CONDUCE_HOST (user $CONDUCE_USER)"

step "eval \"\$(keyagent -a \$workdir/agent.sock -t 8h --ca-bundle \$CONDUCE_CA_BUNDLE)\""
eval "$(keyagent -a "$workdir/agent.sock" -t 8h --ca-bundle "$CONDUCE_CA_BUNDLE")"
export KEYAGENT_HOST="$CONDUCE_HOST" KEYAGENT_USER="$CONDUCE_USER"

step 'keyagent-ctl login --password-stdin    # once; the agent keeps the session, not the password'
printf '%s\n' 'demo-password' | keyagent-ctl login --password-stdin

step 'keyagent-ctl create --description "demo laptop"'
keyagent-ctl create --description "demo laptop"

step 'keyagent-ctl list --remote             # what the service has, masked'
keyagent-ctl list --remote

step 'keyagent-ctl list                      # what the agent holds'
keyagent-ctl list

step 'keyagent-ctl exec -- sh -c '\''echo "tool got a ${#CONDUCE_API_KEY}-character key"'\'''
keyagent-ctl exec -- sh -c 'echo "tool got a ${#CONDUCE_API_KEY}-character key"'

step "python3 -c 'import keyagent; keyagent.get_key()'   # the client library"
python3 -c 'import keyagent; print("python got a %d-character key" % len(keyagent.get_key()))'

step "python3 -c '...keyagent.http_session(host).get(url)...'   # a call made for the tool"
# Through the agent's HTTP socket: the agent adds the credentials, so this process makes
# a Conduce call without ever holding a key or the session (an HTTP worker of the agent
# makes it; status below lists it).
python3 -c '
import os, keyagent
host = os.environ["CONDUCE_HOST"]
answer = keyagent.http_session(host).get(f"https://{host}/conduce/api/v1/user/list-teams")
print(answer.status_code, answer.text.strip(), "- and no key in this process")
'

step 'keyagent-ctl status'
keyagent-ctl status

step 'echo s3cret | keyagent-ctl lock && keyagent-ctl get'
echo s3cret | keyagent-ctl lock
keyagent-ctl get || echo "(exit status $?: the agent is locked)"
echo s3cret | keyagent-ctl unlock

step 'keyagent-ctl remove KEY_ID                 # delete on the service, then forget'
keyagent-ctl remove "$(keyagent-ctl list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["keys"][0]["key_id"])')"
keyagent-ctl list --remote

step 'keyagent-ctl logout && eval "$(keyagent -k)"'
keyagent-ctl logout
eval "$(keyagent -k)"
