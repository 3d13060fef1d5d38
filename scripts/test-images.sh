#!/usr/bin/env bash
# Builds the local test image `busybox:latest` FROM scratch with Debian's busybox-static, since no
# registry can be pulled here. Idempotent: rebuilt only when missing or when --force is given.
set -euo pipefail

image=busybox:latest
if [[ "${1:-}" != "--force" ]] && docker image inspect "$image" >/dev/null 2>&1; then
    exit 0
fi
bb=$(command -v busybox || true)
if [[ -z "$bb" ]] || ! file -L "$bb" 2>/dev/null | grep -q "statically linked"; then
    bb=/bin/busybox
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/bin" "$ctx/tmp" "$ctx/www" "$ctx/etc"
cp "$bb" "$ctx/bin/busybox"
for applet in $("$bb" --list); do
    [[ "$applet" == busybox ]] || ln -s busybox "$ctx/bin/$applet"
done
echo "root:x:0:0:root:/root:/bin/sh" > "$ctx/etc/passwd"
echo "nobody:x:65534:65534:nobody:/:/bin/false" >> "$ctx/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$ctx/etc/group"
echo "ok" > "$ctx/www/index.html"
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY . /
ENV PATH=/bin
CMD ["/bin/sh"]
DOCKERFILE
docker build -q -t "$image" "$ctx" >/dev/null
echo "built $image"
