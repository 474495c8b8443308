#!/usr/bin/env bash
# Copies the shared libraries that BINARIES load (the whole `ldd` closure) and are not already
# in the base image into DEST, at the paths the dynamic loader finds them by, so that a final
# image stage can be the bare base plus `COPY --from=... DEST/ /`: only the .so files that are
# really loaded, not the whole Debian packages around them (their data, plugins, docs, tools,
# and the ~200 packages that apt pulls in beside them).
#
# Usage: scripts/collect-runtime-libs.sh --base-files LIST --dest DIR BINARY...
#   --base-files LIST  the files of the base image, one per line: path<TAB>size<TAB>mtime
#                      (`find / -xdev -printf '%p\t%s\t%Ts\n'` in the base before apt-get); a
#                      library whose real path, size and mtime are in it is skipped (one that
#                      apt-get upgraded beside the packages is copied over the base's)
#   --dest DIR         where to put the tree (DIR/usr/lib/..., DIR/usr/share/doc/<pkg>/copyright)
#
# For each library: its real file (symlinks resolved) is copied to its real path, and when the
# path ldd printed differs (SONAME symlinks, Debian alternatives such as libblas.so.3 ->
# /etc/alternatives -> openblas-openmp/libblas.so.3) a symlink from that path (merged /usr:
# /lib/... becomes /usr/lib/...) to the real file is made. The copyright file of each owning
# package comes along (the licenses travel with the binaries). Prints a table of bytes per
# owning package, largest first, and writes it to DEST/usr/share/doc/vtw-serve/runtime-libs.txt.
# Exit status: 0 done; 1 a library ldd cannot find; 2 usage error.
set -euo pipefail

die() { echo "[collect-runtime-libs] ERROR: $*" >&2; exit 2; }
BASE_FILES="" DEST=""
BINARIES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --base-files) [ $# -ge 2 ] || die "--base-files needs a file"; BASE_FILES=$2; shift 2 ;;
    --dest) [ $# -ge 2 ] || die "--dest needs a directory"; DEST=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) BINARIES+=("$1"); shift ;;
  esac
done
[ -n "$BASE_FILES" ] && [ -f "$BASE_FILES" ] || die "--base-files LIST is required (a file)"
[ -n "$DEST" ] || die "--dest DIR is required"
[ ${#BINARIES[@]} -gt 0 ] || die "no binaries given"

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
sort -u "$BASE_FILES" > "$TMP/base"

# Usr-merged form of a path: /lib/x -> /usr/lib/x (the final image's /lib is a symlink).
usr_path() { case "$1" in /lib/*|/lib64/*|/lib32/*|/bin/*|/sbin/*) echo "/usr$1" ;; *) echo "$1" ;; esac; }

: > "$TMP/libs"
for b in "${BINARIES[@]}"; do
  [ -f "$b" ] || die "no file $b"
  out=$(ldd "$b" 2>&1) || die "ldd $b failed: $out"
  if printf '%s\n' "$out" | grep -q 'not found'; then
    echo "[collect-runtime-libs] $b: libraries not found:" >&2
    printf '%s\n' "$out" | grep 'not found' >&2
    exit 1
  fi
  printf '%s\n' "$out" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' >> "$TMP/libs"
done
sort -u "$TMP/libs" -o "$TMP/libs"

# Real paths (one readlink for all), then the ones the base image does not have.
mapfile -t reals < <(xargs -r readlink -f < "$TMP/libs")
mapfile -t paths < "$TMP/libs"
n=0 skipped=0
: > "$TMP/copied"
for i in "${!paths[@]}"; do
  printf '%s\t%s\t%s\n' "${paths[$i]}" "${reals[$i]}" "$(stat --printf '%s\t%Y' "${reals[$i]}")"
done > "$TMP/pairs"
awk -F'\t' 'FNR == NR { base[$1 "\t" $2 "\t" $3] = 1; next } !(($2 "\t" $3 "\t" $4) in base) { print $1 "\t" $2 }' \
  "$TMP/base" "$TMP/pairs" > "$TMP/new"
skipped=$(( ${#paths[@]} - $(wc -l < "$TMP/new") ))
while IFS=$'\t' read -r path real; do
  mkdir -p "$DEST$(dirname "$real")"
  [ -e "$DEST$real" ] || cp -p "$real" "$DEST$real"
  link=$(usr_path "$path")
  if [ "$link" != "$real" ] && [ ! -e "$DEST$link" ] && [ ! -L "$DEST$link" ]; then
    mkdir -p "$DEST$(dirname "$link")"
    ln -s "$real" "$DEST$link"
  fi
  echo "$real" >> "$TMP/copied"
  n=$((n + 1))
done < "$TMP/new"
sort -u "$TMP/copied" -o "$TMP/copied"

# Owning packages (dpkg's file lists, as `dpkg -S` would say; merged-/usr aliases included)
# and bytes per package.
awk '{ print; if ($0 ~ /^\/usr\//) print substr($0, 5) }' "$TMP/copied" | sort -u > "$TMP/cands"
grep -H -F -x -f "$TMP/cands" /var/lib/dpkg/info/*.list 2>/dev/null \
  | awk '{ i = index($0, ".list:"); f = substr($0, 1, i - 1); sub(/.*\//, "", f); sub(/:.*/, "", f)
           p = substr($0, i + 6); if (p !~ /^\/usr\//) p = "/usr" p; print p "\t" f }' \
  | sort -u > "$TMP/owners" || true
xargs -r stat -c '%s %n' < "$TMP/copied" > "$TMP/sizes"
awk -F'\t' 'FNR == NR { if (!($1 in own)) own[$1] = $2; next }
             { i = index($0, " "); p = substr($0, i + 1)
               print ((p in own) ? own[p] : "(no package)") "\t" substr($0, 1, i - 1) "\t" p }' \
  "$TMP/owners" "$TMP/sizes" > "$TMP/owned"
for pkg in $(cut -f1 "$TMP/owned" | sort -u); do
  c=/usr/share/doc/$pkg/copyright
  if [ -f "$c" ]; then mkdir -p "$DEST/usr/share/doc/$pkg"; cp -p "$(readlink -f "$c")" "$DEST$c"; fi
done

mkdir -p "$DEST/usr/share/doc/vtw-serve"
report=$DEST/usr/share/doc/vtw-serve/runtime-libs.txt
{
  echo "# Shared libraries copied into the vtw-serve runtime image, by owning Debian package"
  echo "# (scripts/collect-runtime-libs.sh; libraries already in the base image are not listed)."
  awk -F'\t' '{ b[$1] += $2; c[$1]++; t += $2 }
    END { for (p in b) printf "%12d\t%d\t%s\n", b[p], c[p], p
          printf "%12d\t%d\t%s\n", t, NR, "TOTAL" > "/dev/stderr" }' "$TMP/owned" 2> "$TMP/total" \
    | sort -rn | awk -F'\t' '{ printf "%8.1f MB  %3d libs  %s\n", $1 / 1e6, $2, $3 }'
  awk -F'\t' '{ printf "%8.1f MB  %3d libs  %s\n", $1 / 1e6, $2, $3 }' "$TMP/total"
} > "$report"
echo "[collect-runtime-libs] copied $n libraries ($skipped already in the base image) into $DEST" >&2
head -25 "$report" >&2
tail -1 "$report" >&2
