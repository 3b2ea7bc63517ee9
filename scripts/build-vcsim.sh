#!/usr/bin/env bash
# Build the vSphere API simulator used by the tests: tools/vcsim/main.go against Debian's
# govmomi source (golang-go, golang-github-vmware-govmomi-dev), in GOPATH mode.
#
# One patch, made in a GOPATH overlay at build time: govmomi 0.24's simulator sets
# TaskInfo.entity to FileManager or VirtualDiskManager on file and disk tasks, which are
# not ManagedEntities, and pyvmomi then cannot decode those tasks' info. The overlay
# copies simulator/ with CreateTask() setting the entity only for real entities; every
# other govmomi directory is symlinked (in GOPATH mode the first GOPATH entry holding a
# directory wins). imagefs itself never reads TaskInfo.entity, so the patch only keeps
# stock pyVim tools usable against the simulator.
#
# Usage: scripts/build-vcsim.sh [OUTPUT]   (default build/vcsim/vcsim)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-build/vcsim/vcsim}")
src=/usr/share/gocode/src/github.com/vmware/govmomi
if [ ! -d "$src/simulator" ] || ! command -v go >/dev/null; then
  echo "build-vcsim: needs the Debian packages golang-go and golang-github-vmware-govmomi-dev" >&2
  exit 1
fi
root=$(pwd)
work=$(mkdir -p build/vcsim && mktemp -d "$root/build/vcsim/gopath.XXXXXX")
trap 'rm -rf "$work"' EXIT
overlay=$work/src/github.com/vmware/govmomi
mkdir -p "$overlay"
for entry in "$src"/*; do
  [ "$(basename "$entry")" = simulator ] || ln -s "$entry" "$overlay/"
done
cp -r "$src/simulator" "$overlay/simulator"
target='	task.Info.Entity = &ref'
grep -qxF "$target" "$overlay/simulator/task.go" || {
  echo "build-vcsim: simulator/task.go has changed; the TaskInfo.entity patch no longer applies" >&2
  exit 1
}
sed -i "s|^$target\$|	if _, ok := e.(mo.Entity); ok { task.Info.Entity = \&ref }|" "$overlay/simulator/task.go"
mkdir -p "$work/src/imagefs-vcsim"
cp tools/vcsim/main.go "$work/src/imagefs-vcsim/"
(cd "$work/src/imagefs-vcsim" &&
  GOPATH="$work:/usr/share/gocode" GO111MODULE=off go build -ldflags "-s -w" -o "$out.tmp" .)
mv "$out.tmp" "$out"
echo "$out"
