#!/usr/bin/env bash
# Fetch the prebuilt OHIF viewer (npm's @ohif/app ships it in dist/) by pinned version; npm checks the
# tarball's integrity against the registry. Never committed; pruned of what radfed does not use.
#   fetch-ohif.sh VERSION DEST_DIR      -> DEST_DIR/dist
set -euo pipefail
version=${1:?usage: fetch-ohif.sh VERSION DEST_DIR}
dest=${2:?usage: fetch-ohif.sh VERSION DEST_DIR}
if [ -f "$dest/dist/index.html" ]; then exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack "@ohif/app@$version" --silent >/dev/null)
tar -xzf "$work"/ohif-app-"$version".tgz -C "$work"
# not used by radfed's viewer: the ONNX runtime for OHIF's own AI tools, the microscopy viewer, source maps
rm -rf "$work/package/dist/ort" "$work/package/dist/dicom-microscopy-viewer"
find "$work/package/dist" -name '*.map' -delete
mkdir -p "$dest"
rm -rf "$dest/dist.partial"
mv "$work/package/dist" "$dest/dist.partial"
mv "$dest/dist.partial" "$dest/dist"
echo "OHIF $version in $dest/dist ($(du -sh "$dest/dist" | cut -f1))"
