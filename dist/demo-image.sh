#!/bin/sh
# Builds the quick start's demo action as an OCI archive (an OCI image layout
# as tar), offline, from busybox-static: one uncompressed layer with busybox
# and /action.sh, which answers {"hello": "<input>"} and fails through
# error.json when the input is "fail".
#
#   sh dist/demo-image.sh OUT.tar [NAME]     (NAME: demo.invalid/echo:latest, a
# registry that never resolves, so a node always runs the imported image)
#
# APPLETS=all links every busybox applet (ps, dd, grep, ...) instead of the few the
# demo needs: the node tier's tests run their commands in the same image.
set -eu
out=$1
name=${2:-demo.invalid/echo:latest}
busybox=${BUSYBOX:-/bin/busybox}
[ -x "$busybox" ] || { echo "demo-image: $busybox is missing (apt-get install busybox-static)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/proc" "$root/sys" "$root/dev" "$work/oci/blobs/sha256"
chmod 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
applets="sh cat echo printf sed tr env ls sleep true false"
[ "${APPLETS:-}" = all ] && applets=$("$busybox" --list | grep -vx busybox)
for applet in $applets; do
  ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
cat > "$root/action.sh" <<'SCRIPT'
#!/bin/sh
# The Direktiv action contract: input in data.in, output in data.out, a
# failure in error.json.
input=$(cat "$DIREKTIV_DIR/data.in")
echo "demo action $DIREKTIV_ACTION_ID got ${#input} bytes" >&2
if [ "$input" = fail ]; then
  printf '{"errorCode":"demo.failed","errorMessage":"you asked me to fail"}' > "$DIREKTIV_DIR/error.json"
  exit 1
fi
printf '{"hello": "%s"}\n' "$(printf '%s' "$input" | sed 's/\\/\\\\/g; s/"/\\"/g')" > "$DIREKTIV_DIR/data.out"
SCRIPT
chmod 755 "$root/action.sh"

# A fixed mtime and owner keep the digests the same from build to build.
layer=$work/layer.tar
tar --sort=name --mtime=@1700000000 --owner=0 --group=0 --numeric-owner -C "$root" -cf "$layer" .

blob() { # FILE -> stores it under blobs/sha256, prints "digest size"
  d=$(sha256sum "$1" | cut -d' ' -f1)
  cp "$1" "$work/oci/blobs/sha256/$d"
  echo "sha256:$d $(stat -c %s "$1")"
}
set -- $(blob "$layer"); layer_digest=$1 layer_size=$2
arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
printf '{"architecture":"%s","os":"linux","created":"2023-11-14T22:13:20Z","config":{"Env":["PATH=/bin"],"Cmd":["/action.sh"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["%s"]}}' \
  "$arch" "$layer_digest" > "$work/config.json"
set -- $(blob "$work/config.json"); config_digest=$1 config_size=$2
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%s}]}' \
  "$config_digest" "$config_size" "$layer_digest" "$layer_size" > "$work/manifest.json"
set -- $(blob "$work/manifest.json"); manifest_digest=$1 manifest_size=$2
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
  "$manifest_digest" "$manifest_size" "$name" > "$work/oci/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' > "$work/oci/oci-layout"
tar --sort=name --mtime=@1700000000 --owner=0 --group=0 --numeric-owner -C "$work/oci" -cf "$out" oci-layout index.json blobs
echo "demo-image: $out ($name, $manifest_digest)"
