#!/usr/bin/env bash
# Runs the README's tour exactly as written against a fresh `runed --dev-mode`, so that the README
# and the behaviour cannot drift apart.
#
# Usage: scripts/readme-tour.sh [--print] [README]   (binaries from $RUNE_BIN_DIR, default
#        target/debug; --print shows the steps extracted from the README and runs nothing)
#
# What runs: every fenced block opened with ```sh tour, in order, in one shell (variables, the
# working directory and background jobs carry over from block to block), in a scratch directory
# with its own $HOME. Before the first block opened with ```sh tour-stopped, the harness deletes
# what the tour cast and stops runed with Ctrl-C (SIGINT), as the README tells the reader to.
#
# What is checked, from each command's trailing comment (the part after " # "):
#   cmd   # prose → text            exits 0 and its output (stdout and stderr) contains text
#   cmd   # prose → exit N: text    exits N and its output contains text
#   cmd   # ... Ctrl-C ... → text   runs until its output contains text, then gets Ctrl-C
#   cmd   # prose                   exits 0
# A read-only command (rune get|logs|health|deps|whoami|policy, curl, dig) whose check fails is
# run again until it passes or 60 s go by: a person typing is slower than a script, and
# projections follow the log a moment later.
#
# The tour uses dev mode's documented ports (7861, 7863, 9100, 8080, 8443, 127.0.0.123:53), the
# first proxy port (30000) and the ones it names; the harness refuses to start when one is taken rather than test another
# runed.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
print=0
if [[ "${1:-}" == --print ]]; then print=1; shift; fi
readme=${1:-$repo/README.md}
bin=${RUNE_BIN_DIR:-$repo/target/debug}
for b in rune runed; do
    [[ -x "$bin/$b" ]] || { echo "readme-tour: $bin/$b is missing (cargo build --bins)" >&2; exit 1; }
done

work=$(mktemp -d /tmp/rune-tour.XXXXXX)
steps=$work/.steps
mkdir -p "$work/home" "$steps"
script=$steps/tour.sh

# --- extraction: README blocks → calls of `block` and `step` --------------------------------
awk '
BEGIN { inblk = 0; n = 0 }
/^```sh tour(-stopped)?[ \t]*$/ {
    kind = $2; inblk = 1
    printf "block %s\n", kind
    next
}
inblk && /^```[ \t]*$/ { inblk = 0; next }
!inblk { next }
{
    line = $0
    if (pending != "") {                      # continuation of a command
        cmd = cmd "\n" line
        if (heredoc != "") {
            t = line; if (strip) sub(/^\t+/, "", t)
            if (t == heredoc) { heredoc = ""; }
            if (heredoc == "" && cmd !~ /\\$/) { emit(); }
            next
        }
        if (line !~ /\\$/) { note(line); emit(); }
        else note(line)
        next
    }
    if (line ~ /^[ \t]*$/ || line ~ /^[ \t]*#/) next
    cmd = line; pending = 1; comment = ""
    note(line)
    if (match(line, "<<-?[ \t]*[\047\"]?[A-Za-z_]+[\047\"]?")) {
        h = substr(line, RSTART, RLENGTH)
        strip = (h ~ /^<<-/)
        gsub(/^<<-?[ \t]*/, "", h); gsub("[\047\"]", "", h)
        heredoc = h
        next
    }
    if (line ~ /\\$/) next
    emit()
}
function note(l,   i) {
    i = index(l, " # ")
    if (i > 0) comment = substr(l, i + 3)
}
function emit(   want, rc, mode, parts, k, ro, first, i, j, p) {
    want = ""; rc = 0; mode = "once"
    if ((i = index(comment, "→ ")) > 0) {
        want = comment
        while ((i = index(want, "→ ")) > 0) want = substr(want, i + length("→ "))
        if (match(want, /^exit [0-9]+:/)) {
            rc = substr(want, 6, RLENGTH - 6) + 0
            want = substr(want, RLENGTH + 1)
        } else if (match(want, /^exit [0-9]+$/)) {
            rc = substr(want, 6) + 0; want = ""
        }
        sub(/^[ \t]+/, "", want); sub(/[ \t]+$/, "", want)
    }
    first = cmd; sub(/\n.*/, "", first)
    if (comment ~ /Ctrl-C/) mode = "interrupt"
    else if ((want != "" || rc != 0) && first !~ /&[ \t]*(#.*)?$/) {
        ro = 1
        k = split(first, parts, /&&/)
        for (j = 1; j <= k; j++) {
            p = parts[j]; sub(/^[ \t]+/, "", p); sub(/[ \t]#.*$/, "", p)
            if (p !~ /^(rune (get|logs|health|deps|whoami|policy|version)|curl|dig)( |$)/ || p ~ /[^>]>[^&]/) ro = 0
        }
        if (ro) mode = "retry"
    }
    n++
    printf "want=$(cat <<\047__RUNE_WANT__\047\n%s\n__RUNE_WANT__\n)\n", want
    printf "step %d %s %d \"$want\" <<\047__RUNE_CMD__\047\n%s\n__RUNE_CMD__\n", n, mode, rc, cmd
    pending = ""; cmd = ""; comment = ""
}
END {
    if (inblk) { print "echo \"readme-tour: an unclosed tour block\" >&2; exit 1" }
    printf "finish %d\n", n
}
' "$readme" >"$script"

if ((print)); then cat "$script"; rm -rf "$work"; exit 0; fi
if ! grep -q '^step ' "$script"; then
    echo "readme-tour: no \`\`\`sh tour blocks in $readme" >&2
    exit 1
fi

# Taken ports would make the tour talk to someone else's runed.
for p in 7861 7863 9100 8080 8443 8081 8000 30000; do
    if ss -Htln "sport = :$p" | grep -q .; then
        echo "readme-tour: port $p is in use (a dev runed?); the tour needs the README's ports" >&2
        exit 1
    fi
done
if ss -Huln 'sport = :53' | grep -q '127.0.0.123:53'; then
    echo "readme-tour: 127.0.0.123:53 is in use; the tour needs the README's DNS address" >&2
    exit 1
fi

"$repo/scripts/test-images.sh" >/dev/null

# --- the run ---------------------------------------------------------------------------------
cat >"$steps/lib.sh" <<'LIB'
set -m                       # background jobs get their own process group and a working Ctrl-C
runed_pid=
stopped=0
fail() {
    echo "readme-tour: step $1 failed: $2" >&2
    echo "---- command:" >&2; printf '%s\n' "$3" >&2
    echo "---- output:" >&2; tail -n 40 "$4" >&2 || true
    echo "---- runed (last lines):" >&2; tail -n 20 "$TOUR_WORK/.steps/runed.log" >&2 || true
    exit 1
}
start_runed() {
    # Forked off (setsid -f): not a child or a job of this shell, so the tour's `kill %1` means
    # the tour's own job and no `wait` can wait for runed.
    (cd "$TOUR_WORK" && setsid -f sh -c 'echo $$ >"$1"; exec runed --dev-mode' _ "$TOUR_WORK/.steps/runed.pid" \
        >"$TOUR_WORK/.steps/runed.log" 2>&1 </dev/null)
    local deadline=$((SECONDS + 60))
    until curl -fs http://127.0.0.1:7861/healthz >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then
            echo "readme-tour: runed did not become healthy" >&2; tail -n 30 "$TOUR_WORK/.steps/runed.log" >&2; exit 1
        fi
        sleep 0.2
    done
    runed_pid=$(cat "$TOUR_WORK/.steps/runed.pid")
}
# Polls the check `$3` until it fails, for at most a minute; then says `$1` and shows `$2`.
within_a_minute() {
    local deadline=$((SECONDS + 60))
    while $3; do
        if ((SECONDS > deadline)); then
            echo "readme-tour: $1 a minute after their services were deleted:" >&2
            $2 >&2
            return 1
        fi
        sleep 0.5
    done
}
# Deletes every service the tour cast, through the API, and waits for their instances to go.
teardown() {
    local token=$TOUR_WORK/home/.rune/root.token
    [[ -f "$token" ]] || return 0
    local r="rune --api-server 127.0.0.1:7863 --token-file $token"
    instances_left() { [[ -n "$($r get instances -A 2>/dev/null)" ]]; }
    volumes_in_use() { $r volume list -A 2>/dev/null | awk 'NR > 1 && $NF == "yes" { found = 1 } END { exit !found }'; }
    # Kept for the last resort of cleanup: what to remove if runed cannot.
    $r get instances -A -o json >"$TOUR_WORK/.steps/instances.json" 2>/dev/null || true
    local ns name
    while read -r ns name; do
        $r delete service "$name" -n "$ns" --force >/dev/null || return 1
    done < <($r get services -A 2>/dev/null | awk 'NR > 1 { print $1, $2 }')
    within_a_minute "instances left" "$r get instances -A" instances_left || return 1
    # Volumes outlive their services by design: the tour's go by name once nothing uses them
    # (the last container may go a moment after its instance's record).
    within_a_minute "volumes still in use" "$r volume list -A" volumes_in_use || return 1
    while read -r ns name; do
        $r volume delete "$name" -n "$ns" >/dev/null || return 1
    done < <($r volume list -A 2>/dev/null | awk 'NR > 1 { print $1, $2 }')
}
stop_runed() {
    [[ -n "$runed_pid" ]] || return 0
    kill -INT "$runed_pid" 2>/dev/null || true
    local deadline=$((SECONDS + 30))
    while kill -0 "$runed_pid" 2>/dev/null; do
        if ((SECONDS > deadline)); then kill -KILL "$runed_pid" 2>/dev/null || true; break; fi
        sleep 0.2
    done
    runed_pid=
}
block() {
    if [[ "$1" == tour-stopped && $stopped == 0 ]]; then
        teardown || exit 1
        stop_runed
        stopped=1
    fi
}
# step N MODE RC WANT <<< command
step() {
    local n=$1 mode=$2 rc_want=$3 want=$4 cmd out rc deadline
    cmd=$(cat)
    out=$TOUR_WORK/.steps/step-$n.out
    printf '\033[2m$ %s\033[0m\n' "${cmd%%$'\n'*}"
    deadline=$((SECONDS + 60))
    case $mode in
    interrupt)
        eval "$cmd" >"$out" 2>&1 &
        local pid=$!
        until grep -qF -- "$want" "$out"; do
            if ((SECONDS > deadline)) || ! kill -0 "$pid" 2>/dev/null; then
                kill -INT -- -"$pid" 2>/dev/null || true
                wait "$pid" || true
                fail "$n" "never printed '$want' before Ctrl-C" "$cmd" "$out"
            fi
            sleep 0.2
        done
        kill -INT -- -"$pid" 2>/dev/null || true
        # A shell started in the background without job control starts its children with
        # SIGINT ignored, and a Ctrl-C then ends nothing: say so instead of waiting for ever.
        deadline=$((SECONDS + 20))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS <= deadline)); do sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM -- -"$pid" 2>/dev/null || true
            wait "$pid" || true
            fail "$n" "still running 20 s after Ctrl-C (is SIGINT ignored? run the tests from a foreground shell, not under 'nohup ... &')" "$cmd" "$out"
        fi
        rc=0
        wait "$pid" || rc=$?
        # Ctrl-C ends it: 0 or 130 (interrupted), nothing else.
        [[ $rc == 0 || $rc == 130 ]] || fail "$n" "exit code $rc after Ctrl-C" "$cmd" "$out"
        ;;
    *)
        while :; do
            rc=0
            eval "$cmd" >"$out" 2>&1 </dev/null || rc=$?
            if [[ $rc == "$rc_want" ]] && { [[ -z "$want" ]] || grep -qF -- "$want" "$out"; }; then
                break
            fi
            if [[ $mode != retry ]] || ((SECONDS > deadline)); then
                if [[ $rc != "$rc_want" ]]; then
                    fail "$n" "exit code $rc, the README says $rc_want" "$cmd" "$out"
                fi
                fail "$n" "the output lacks '$want'" "$cmd" "$out"
            fi
            sleep 0.5
        done
        ;;
    esac
}
finish() {
    echo "readme-tour: all $1 commands of the tour ran as written"
}
LIB

cleanup() {
    local rc=$?
    set +e
    jobs -p | xargs -r kill 2>/dev/null
    if [[ -f "$steps/runed.pid" ]] && kill -0 "$(cat "$steps/runed.pid")" 2>/dev/null; then
        runed_pid=$(cat "$steps/runed.pid")
        teardown || rc=1
        stop_runed
    fi
    # The last resort, when the tour failed and runed may not have removed them (instances
    # outlive runed by design): its containers by id, its processes by pid (if still one).
    if [[ $rc != 0 && -f "$steps/instances.json" ]]; then
        local id cluster=
        for id in $(sed -n 's/.*"runtimeId": "\([^"]*\)".*/\1/p' "$steps/instances.json"); do
            if [[ "$id" =~ ^[0-9]+$ ]]; then
                tr '\0' '\n' <"/proc/$id/environ" 2>/dev/null | grep -q '^RUNE_INSTANCE_ID=' && kill -KILL "$id"
            else
                cluster=$(docker inspect -f '{{index .Config.Labels "rune.cluster"}}' "$id" 2>/dev/null)
                docker rm -f "$id" >/dev/null 2>&1
            fi
        done
        [[ -n "${cluster:-}" ]] && docker network ls -q --filter "label=rune.cluster=$cluster" | xargs -r docker network rm >/dev/null 2>&1
    fi
    if [[ $rc == 0 ]]; then rm -rf "$work"; else echo "readme-tour: the scratch directory is kept: $work" >&2; fi
}
trap cleanup EXIT

cd "$work"
export PATH="$bin:$PATH" HOME="$work/home" TOUR_WORK="$work"
unset RUNE_API_SERVER RUNE_TOKEN RUNE_TLS_CA RUNE_ADMIN_SOCKET
# shellcheck disable=SC1091
source "$steps/lib.sh"
start_runed
# The tour runs as a person's shell would: no errexit, nounset or pipefail.
set +euo pipefail
# shellcheck disable=SC1090
source "$script"
