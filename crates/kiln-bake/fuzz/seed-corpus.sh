#!/usr/bin/env bash
# Fills fuzz/corpus/bake with seed inputs: the bake files of the repository's tests and
# docs (a first line of `--set` override, then the file). The corpus directory is gitignored
# (**/fuzz/corpus): run this before fuzzing, never commit its output.
#
#   crates/kiln-bake/fuzz/seed-corpus.sh
set -euo pipefail

fuzz_dir=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$fuzz_dir/../../.." && pwd)
corpus=$fuzz_dir/corpus/bake
mkdir -p "$corpus"

# Raw strings of the unit tests and the cluster test: each r#"..."# literal is one seed.
n=0
for source in "$repo"/crates/kiln-bake/src/tests.rs "$repo"/crates/kiln-daemon/tests/cluster/bake.rs \
    "$repo"/crates/kiln-cli/tests/cli/bake.rs; do
    while IFS= read -r -d '' literal; do
        n=$((n + 1))
        printf '*.platform=linux/arm64\n%s' "$literal" > "$corpus/seed-$n"
    done < <(python3 - "$source" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
for m in re.finditer(r'r#"(.*?)"#', text, re.S):
    if '{' in m.group(1) or 'services' in m.group(1):
        sys.stdout.write(m.group(1) + '\0')
PY
)
done
echo "bake: $n seeds"
