#!/usr/bin/env bash
# Fills fuzz/corpus/{dockerfile,shell} with seed inputs. The corpus directories are
# gitignored (**/fuzz/corpus): run this before fuzzing, never commit its output.
#
#   crates/kiln-dockerfile/fuzz/seed-corpus.sh [SHARED_DIR]
#
# SHARED_DIR defaults to ../shared next to the repository (the BuildKit conformance data
# lives in SHARED_DIR/conformance/buildkit-dockerfile).
set -euo pipefail

fuzz_dir=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$fuzz_dir/../../.." && pwd)
shared=${1:-$repo/../shared}
conf=$shared/conformance/buildkit-dockerfile

mkdir -p "$fuzz_dir/corpus/dockerfile" "$fuzz_dir/corpus/shell"

# dockerfile: BuildKit's parser cases and the repository's own fixtures.
n=0
for f in "$conf"/parser-cases/*/Dockerfile; do
    [ -f "$f" ] || continue
    cp "$f" "$fuzz_dir/corpus/dockerfile/buildkit-$(basename "$(dirname "$f")")"
    n=$((n + 1))
done
for f in "$repo"/tests/fixtures/*/Dockerfile; do
    [ -f "$f" ] || continue
    cp "$f" "$fuzz_dir/corpus/dockerfile/fixture-$(basename "$(dirname "$f")")"
    n=$((n + 1))
done
echo "dockerfile: $n seeds"

# shell: every 8th case of BuildKit's envVarTest, as flags byte + word + the environment
# BuildKit's TestShellParser4EnvVars uses. The flags byte alternates between 0x00 (Vec
# env) and 0x03 (BTreeMap env, process_word_with_unmatched too).
n=0
i=0
if [ -f "$conf/shell-envVarTest" ]; then
    while IFS= read -r line; do
        case $line in '#'* | '') continue ;; esac
        i=$((i + 1))
        [ $((i % 8)) -eq 1 ] || continue
        word=$(printf '%s' "$line" | cut -d'|' -f2 | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//')
        if [ $((n % 2)) -eq 0 ]; then flags='\000'; else flags='\003'; fi
        printf "$flags%s\nPWD=/home\nSHELL=bash\nKOREAN=한국어\nNULL=" "$word" >"$fuzz_dir/corpus/shell/envVarTest-$i"
        n=$((n + 1))
    done <"$conf/shell-envVarTest"
fi
echo "shell: $n seeds"
