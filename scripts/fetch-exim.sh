#!/bin/sh
# Fetch Debian's Exim (exim4-daemon-light) and unpack it into a folder of its own, without
# installing it: installing it would remove Postfix, which the test suite needs (both are
# "the MTA"). tests/test_relay_exim.py runs the unpacked binary with a configuration of its
# own; nss_wrapper supplies the user "Debian-exim" that the binary looks up by name, so that
# nothing is added to /etc/passwd.
#
# Usage: scripts/fetch-exim.sh [FOLDER]   (default /var/cache/mxguard/exim)
# Prints the unpacked root (FOLDER/root) on success.
set -eu
folder=${1:-/var/cache/mxguard/exim}
root="$folder/root"
if [ -x "$root/usr/sbin/exim4" ] && [ -e "$root/usr/lib/x86_64-linux-gnu/libnss_wrapper.so" ]; then
    echo "$root"
    exit 0
fi
mkdir -p "$folder"
cd "$folder"
# apt-get download writes into the current folder; _apt cannot write there as root's, which
# apt reports as a warning only.
apt-get download exim4-daemon-light exim4-base libidn12 libnss-wrapper >/dev/null 2>&1 || {
    apt-get update >/dev/null 2>&1
    apt-get download exim4-daemon-light exim4-base libidn12 libnss-wrapper
}
for deb in ./*.deb; do
    dpkg-deb -x "$deb" "$root"
done
echo "$root"
