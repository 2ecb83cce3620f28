#!/bin/sh
# Seeds fuzz/corpus/unpack with small layer tars: plain, gzip, with whiteouts, links and long names.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
corpus="$here/corpus/unpack"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$corpus" "$work/t/dir/sub" "$work/t/$(printf 'long%.0s' $(seq 40))"
echo file > "$work/t/dir/file"
ln -s ../dir/file "$work/t/dir/sub/link"
ln "$work/t/dir/file" "$work/t/dir/hard"
touch "$work/t/dir/.wh.gone" "$work/t/dir/sub/.wh..wh..opq"
for variant in plain gzip; do
    for mode in 0 1; do
        out="$corpus/$variant-$mode"
        printf "\\$(printf '%03o' "$mode")" > "$out"
        if [ "$variant" = gzip ]; then tar -C "$work/t" -czf - . >> "$out"; else tar -C "$work/t" -cf - . >> "$out"; fi
    done
done
echo "seeded $(ls "$corpus" | wc -l) inputs in $corpus"
