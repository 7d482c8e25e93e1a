#!/usr/bin/env bash
# Credentials for a radfed federation: a private CA, the coordinator's TLS certificate, and one
# SuperNode authentication key pair per hospital (OpenSSH ECDSA P-384, as Flower expects).
#   make-credentials.sh OUT_DIR COORDINATOR_HOST SITE_NAME...
# Keep OUT_DIR/ca.key offline; give each hospital its own site key, the coordinator the .pub files.
set -euo pipefail
out=${1:?usage: make-credentials.sh OUT_DIR COORDINATOR_HOST SITE_NAME...}
host=${2:?coordinator host name or IP}
shift 2
mkdir -p "$out"
umask 077
openssl req -x509 -newkey rsa:3072 -nodes -days 825 -subj "/CN=radfed federation CA" \
  -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
openssl req -newkey rsa:3072 -nodes -subj "/CN=$host" -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
if [[ $host =~ ^[0-9.]+$ ]]; then san="IP:$host"; else san="DNS:$host"; fi
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$san" > "$out/server.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial -days 825 \
  -extfile "$out/server.ext" -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext"
for site in "$@"; do
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "radfed $site" -f "$out/$site"
done
chmod 644 "$out/ca.crt" "$out/server.pem" "$out"/*.pub 2>/dev/null || true
echo "credentials in $out: ca.crt, server.pem/server.key, and a key pair per site: $*"
