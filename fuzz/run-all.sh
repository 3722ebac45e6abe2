#!/usr/bin/env bash
# Runs every fuzz target for a bounded time; exits non-zero if any target crashes (or fails
# to build).
#
#   fuzz/run-all.sh            # 30 s per target
#   fuzz/run-all.sh 300        # 5 min per target
#   fuzz/run-all.sh 60 config  # only the named targets
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). cargo-fuzz passes nightly-only
# flags (-Zsanitizer, ...) to rustc; on a stable toolchain RUSTC_BOOTSTRAP=1 lets it. Set it
# here only, for this build (fuzz/target), never for the normal build or the test suite.
#
# New inputs go to fuzz/corpus/<target>/ (gitignored; kept between runs so coverage grows),
# fuzz/seeds/<target>/ is read only. A crash leaves its input in fuzz/artifacts/<target>/;
# replay it with `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <that file>`.
set -uo pipefail

seconds="${1:-30}"
shift || true
case "$seconds" in
'' | *[!0-9]*)
    echo "usage: $0 [seconds per target] [target...]" >&2
    exit 2
    ;;
esac

cd "$(dirname "$0")/.." || exit 2
export RUSTC_BOOTSTRAP=1

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

echo "== building ${targets[*]}"
cargo fuzz build || exit 1

failed=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    dict=()
    case "$t" in
    config) dict=(-dict=fuzz/dicts/config.dict) ;;
    issue_body | admin_issue | stored_record | restore) dict=(-dict=fuzz/dicts/json.dict) ;;
    esac
    echo "== $t: ${seconds}s"
    # -timeout: one input taking over 10 s is a hang, reported like a crash.
    # -rss_limit_mb: libFuzzer's default (2048); an input needing more is reported too.
    if ! cargo fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "${dict[@]}"; then
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "== FAILED: ${failed[*]} (inputs in fuzz/artifacts/<target>/)" >&2
    exit 1
fi
echo "== all ${#targets[@]} targets ran ${seconds}s without a crash"
