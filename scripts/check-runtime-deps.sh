#!/usr/bin/env bash
# Checks that the Dockerfile's runtime-packages stage installs every shared library the binaries
# need (the runtime stage then takes the loaded ones from it: scripts/collect-runtime-libs.sh).
#
# Usage: scripts/check-runtime-deps.sh [--dockerfile FILE] [--stage NAME] [BINARY_DIR]
#   BINARY_DIR   where vtw-server and vtw were built (default: build/)
#   --dockerfile the Dockerfile to check (default: the repository's; env VTW_DOCKERFILE)
#   --stage      the stage with the runtime apt-get install (default: runtime-packages; the last
#                stage if none has that name)
#
# For every library that `ldd` lists for the binaries (the whole transitive set), the Debian
# package that owns it (as `dpkg -S` would say, following symlinks and the merged-/usr /lib ->
# /usr/lib aliases) must be in the runtime image: one of the packages the runtime stage's
# `apt-get install` lists, a package apt-get installs with them (`apt-get -s` resolves the list
# against a dpkg status that holds only the base image's packages, as the image build does), or
# a base-image package (the Essential packages plus apt and their dependencies, i.e. debootstrap
# minbase / debian:bookworm). Without apt package lists (/var/lib/apt/lists empty), or with
# VTW_DEPS_CLOSURE=installed, the closure follows the Depends of the packages installed here.
#
# Prints one line per library (library -> package -> listed / dependency / base / MISSING).
# Exit status: 0 all covered, 1 something is missing, 2 usage or environment error.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DOCKERFILE=${VTW_DOCKERFILE:-$ROOT/Dockerfile}
STAGE=runtime-packages
BIN_DIR=$ROOT/build
BINARIES=(vtw-server vtw)

die() { echo "[check-runtime-deps] ERROR: $*" >&2; exit 2; }
log() { echo "[check-runtime-deps] $*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dockerfile) [ $# -ge 2 ] || die "--dockerfile needs a file"; DOCKERFILE=$2; shift 2 ;;
    --dockerfile=*) DOCKERFILE=${1#*=}; shift ;;
    --stage) [ $# -ge 2 ] || die "--stage needs a name"; STAGE=$2; shift 2 ;;
    --stage=*) STAGE=${1#*=}; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) BIN_DIR=$1; shift ;;
  esac
done

for tool in ldd dpkg-query apt-get awk; do
  command -v "$tool" >/dev/null || die "'$tool' not found (this check needs a Debian system)"
done
[ -f "$DOCKERFILE" ] || die "no Dockerfile at $DOCKERFILE"
for b in "${BINARIES[@]}"; do
  [ -x "$BIN_DIR/$b" ] || die "no binary $BIN_DIR/$b (build first: scripts/build.sh)"
done

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# --- 1. The runtime stage's apt-get install list. ------------------------------------------
# Joins continuation lines, drops comment lines, finds the stage (`FROM ... AS $STAGE`, else the
# last FROM), and collects the words after `apt-get install` / `apt install` in its RUN lines
# (options, variables and =version / :arch suffixes dropped).
awk -v stage="$STAGE" '
  function flush(   s, nseg, seg, i, nw, w, j, on) {
    s = cur; cur = ""
    if (s ~ /^[ \t]*$/) return
    if (toupper(s) ~ /^[ \t]*FROM[ \t]/) {
      nstage++; named = 0
      if (match(s, /[ \t][Aa][Ss][ \t]+[^ \t]+[ \t]*$/)) {
        name = substr(s, RSTART, RLENGTH); sub(/^[ \t]+[Aa][Ss][ \t]+/, "", name); sub(/[ \t]+$/, "", name)
        if (name == stage) { named = 1; found = nstage }
      }
      return
    }
    if (toupper(s) !~ /^[ \t]*RUN[ \t]/) return
    nseg = split(s, seg, /&&|\|\||;|\|/)
    for (i = 1; i <= nseg; i++) {
      nw = split(seg[i], w, /[ \t]+/); apt = 0; on = 0
      for (j = 1; j <= nw; j++) {
        if (w[j] ~ /^-[otc]$/) { j++; continue }  # apt-get -o X=Y, -t RELEASE, -c FILE
        if (!on) {
          if (w[j] == "apt-get" || w[j] == "apt") apt = 1
          else if (apt && w[j] == "install") on = 1
          else if (w[j] !~ /^-/) apt = 0
          continue
        }
        gsub(/["\047]/, "", w[j])
        if (w[j] == "" || w[j] ~ /^-/ || w[j] ~ /^\$/ || w[j] ~ /^\(/) continue
        sub(/[=:].*/, "", w[j])
        pk[nstage, ++npk[nstage]] = w[j]
      }
    }
  }
  /^[ \t]*#/ && cont { next }
  { line = $0
    if (line ~ /\\[ \t]*$/) { sub(/\\[ \t]*$/, "", line); cur = cur line " "; cont = 1; next }
    cur = cur line; cont = 0; flush() }
  END {
    if (cur != "") flush()
    st = found ? found : nstage
    if (st == 0) exit 3
    for (i = 1; i <= npk[st]; i++) print pk[st, i]
    if (!found) print "stage \"" stage "\" not found; using the last stage (" st ")" > "/dev/stderr"
  }
' "$DOCKERFILE" | sort -u > "$TMP/listed" || die "cannot parse $DOCKERFILE"
[ -s "$TMP/listed" ] || die "no 'apt-get install' packages in the runtime stage of $DOCKERFILE"
log "runtime stage of $DOCKERFILE installs: $(tr '\n' ' ' < "$TMP/listed")"

# --- 2. The libraries ldd shows, and their owners. -----------------------------------------
: > "$TMP/libs"
for b in "${BINARIES[@]}"; do
  out=$(ldd "$BIN_DIR/$b" 2>&1) || die "ldd $BIN_DIR/$b failed: $out"
  # "name => /path (0x..)", "name => not found", "/lib64/ld-linux-x86-64.so.2 (0x..)", vdso.
  printf '%s\n' "$out" | awk -v bin="$b" '
    $2 == "=>" && $3 == "not" { print $1 "\tNOT-FOUND\t" bin; next }
    $2 == "=>" && $3 ~ /^\// { print $1 "\t" $3 "\t" bin; next }
    $1 ~ /^\// { n = $1; sub(/.*\//, "", n); print n "\t" $1 "\t" bin }
  ' >> "$TMP/libs"
done
# One row per library: name, path, binaries that need it.
sort -t$'\t' -k1,1 -k3,3 "$TMP/libs" | awk -F'\t' '
  $1 != prev { if (prev != "") print prev "\t" path "\t" bins; prev = $1; path = $2; bins = $3; next }
  { if (index("," bins ",", "," $3 ",") == 0) bins = bins "," $3 }
  END { if (prev != "") print prev "\t" path "\t" bins }' > "$TMP/libs.u"

# Candidate paths dpkg may know a library by: as ldd printed it, with its directory resolved,
# fully resolved, and each with the merged-/usr alias (/lib <-> /usr/lib, /lib64 <-> /usr/lib64).
: > "$TMP/cands"
declare -A realdir=()
grep -v $'\tNOT-FOUND\t' "$TMP/libs.u" | cut -f1,2 > "$TMP/found" || true
mapfile -t resolved < <(cut -f2 "$TMP/found" | xargs -r readlink -f)
i=0
while IFS=$'\t' read -r name path; do
  dir=${path%/*}; base=${path##*/}
  [ -n "${realdir[$dir]:-}" ] || realdir[$dir]=$(cd "$dir" 2>/dev/null && pwd -P || echo "$dir")
  for c in "$path" "${realdir[$dir]}/$base" "${resolved[$i]}"; do
    printf '%s\t%s\n' "$name" "$c"
    case "$c" in
      /usr/lib/*|/usr/lib64/*|/usr/lib32/*) printf '%s\t%s\n' "$name" "${c#/usr}" ;;
      /lib/*|/lib64/*|/lib32/*) printf '%s\t%s\n' "$name" "/usr$c" ;;
    esac
  done
  i=$((i + 1))
done < "$TMP/found" | awk '!seen[$0]++' > "$TMP/cands"
cut -f2 "$TMP/cands" | sort -u > "$TMP/paths"
# The same lookup as `dpkg -S`, in one pass over dpkg's file lists.
DPKG_INFO=/var/lib/dpkg/info
grep -H -F -x -f "$TMP/paths" "$DPKG_INFO"/*.list 2>/dev/null \
  | awk '{ i = index($0, ".list:"); f = substr($0, 1, i - 1); sub(/.*\//, "", f); sub(/:.*/, "", f)
           print substr($0, i + 6) "\t" f }' | sort -u > "$TMP/owners" || true
# Per library, the owner of its first candidate path that has one.
awk -F'\t' 'FNR == NR { if (!($1 in own)) own[$1] = $2; next }
            !($1 in pkg) && ($2 in own) { pkg[$1] = own[$2] }
            END { for (l in pkg) print l "\t" pkg[l] }' "$TMP/owners" "$TMP/cands" > "$TMP/libpkg"

# --- 3. What the runtime image holds. -------------------------------------------------------
dpkg-query -W -f='${db:Status-Abbrev}\t${Package}\t${Essential}\t${Pre-Depends}\t${Depends}\t${Provides}\n' \
  | awk -F'\t' '$1 ~ /^ii/' | cut -f2- > "$TMP/installed"
# Dependency closure over the packages installed here: the first alternative of each or-group
# that is installed (or provided by an installed package). SEEDS, plus Essential ones if asked.
closure() {  # closure ESSENTIAL SEEDS...
  local ess=$1; shift
  awk -F'\t' -v SEEDS="$*" -v ESSENTIAL="$ess" '
    function clean(s) { gsub(/\([^)]*\)/, "", s); gsub(/\[[^]]*\]/, "", s); gsub(/<[^>]*>/, "", s)
                        gsub(/[ \t]/, "", s); sub(/:.*/, "", s); return s }
    function add(p) { if (p != "" && !(p in inset)) { inset[p] = 1; queue[++qn] = p } }
    { inst[$1] = 1; deps[$1] = $3 ", " $4; if ($2 == "yes") ess[$1] = 1
      n = split($5, pv, ","); for (i = 1; i <= n; i++) { v = clean(pv[i]); if (v != "" && !(v in prov)) prov[v] = $1 } }
    END {
      n = split(SEEDS, s, " "); for (i = 1; i <= n; i++) add(s[i])
      if (ESSENTIAL) for (p in ess) add(p)
      for (qi = 1; qi <= qn; qi++) {
        p = queue[qi]; ng = split(deps[p], g, ",")
        for (j = 1; j <= ng; j++) {
          na = split(g[j], alt, "|"); chosen = ""
          for (k = 1; k <= na && chosen == ""; k++) {
            a = clean(alt[k]); if (a in inst) chosen = a; else if (a in prov) chosen = prov[a] }
          add(chosen)
        }
      }
      for (qi = 1; qi <= qn; qi++) print queue[qi]
    }' "$TMP/installed"
}
# The base image: Essential packages + apt, with their dependencies (what minbase installs).
closure 1 apt | sort -u > "$TMP/base"

CLOSURE=${VTW_DEPS_CLOSURE:-}
if [ -z "$CLOSURE" ]; then
  CLOSURE=installed
  if compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then CLOSURE=apt; else
    log "WARNING: /var/lib/apt/lists has no package lists; using the installed packages' Depends"
  fi
fi
if [ "$CLOSURE" = apt ]; then
  METHOD="apt-get -s against a base-image dpkg status"
  # shellcheck disable=SC2046
  dpkg-query -s $(cat "$TMP/base") > "$TMP/status" 2>/dev/null || true
  : > "$TMP/extended_states"
  # shellcheck disable=SC2046  # one word per package
  if ! apt-get -s -q -o Dir::State::status="$TMP/status" \
        -o Dir::State::extended_states="$TMP/extended_states" -o Debug::NoLocking=1 \
        -o APT::Install-Recommends=false -o APT::Install-Suggests=false \
        install $(cat "$TMP/listed") > "$TMP/sim" 2>&1; then
    echo "[check-runtime-deps] apt-get cannot install the runtime stage's packages:" >&2
    grep -v -e '^Reading' -e '^Building' -e '^NOTE' -e '^  *$' "$TMP/sim" | sed 's/^/  /' >&2
    exit 1
  fi
  awk '$1 == "Inst" { p = $2; sub(/:.*/, "", p); print p }' "$TMP/sim" | sort -u > "$TMP/deps"
elif [ "$CLOSURE" = installed ]; then
  METHOD="Depends of the packages installed here"
  # shellcheck disable=SC2046
  closure 0 $(cat "$TMP/listed") | sort -u > "$TMP/deps"
else
  die "VTW_DEPS_CLOSURE must be apt or installed, not '$CLOSURE'"
fi

# --- 4. Report. ------------------------------------------------------------------------------
nlisted=$(wc -l < "$TMP/listed"); ndeps=$(wc -l < "$TMP/deps"); nbase=$(wc -l < "$TMP/base")
echo "Runtime packages of the Dockerfile's '$STAGE' stage: $nlisted listed, $ndeps installed with"
echo "their dependencies ($METHOD), $nbase in the base image."
echo "Binaries: ${BINARIES[*]/#/$BIN_DIR/}"
echo
awk -F'\t' -v listed="$TMP/listed" -v deps="$TMP/deps" -v base="$TMP/base" -v lp="$TMP/libpkg" '
  BEGIN {
    while ((getline p < listed) > 0) L[p] = 1
    while ((getline p < deps) > 0) D[p] = 1
    while ((getline p < base) > 0) B[p] = 1
    while ((getline line < lp) > 0) { split(line, f, "\t"); P[f[1]] = f[2] }
    printf "%-44s %-28s %-10s %s\n", "LIBRARY", "PACKAGE", "STATUS", "NEEDED BY"
  }
  {
    lib = $1; bins = $3
    if ($2 == "NOT-FOUND") { pkg = "(not found by ldd)"; st = "MISSING" }
    else if (!(lib in P)) { pkg = "(no package owns " $2 ")"; st = "MISSING" }
    else {
      pkg = P[lib]
      st = (pkg in L) ? "listed" : (pkg in B) ? "base" : (pkg in D) ? "dependency" : "MISSING"
    }
    printf "%-44s %-28s %-10s %s\n", lib, pkg, st, bins
    n++; if (st == "MISSING") { bad++; if (pkg !~ /^\(/) need[pkg] = 1 }; pk[pkg] = 1
  }
  END {
    np = 0; for (p in pk) np++
    u = ""; for (p in L) if (!(p in pk)) u = u " " p
    if (u != "") printf "\nNote: listed but owning none of these libraries (not needed?):%s\n", u
    printf "\n%d libraries from %d packages: ", n, np
    if (!bad) { print "all covered by the runtime stage."; exit 0 }
    printf "%d MISSING.\n", bad
    s = ""; for (p in need) s = s " " p
    if (s != "") print "Add to the runtime stage'"'"'s apt-get install:" s
    exit 1
  }' "$TMP/libs.u"
