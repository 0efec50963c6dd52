#!/bin/sh
# pip for the image builds, installed in the build stages as /usr/local/bin/cppo-pip. Where pip finds its
# packages comes from the build, never from a file in the image:
#   - build args PIP_INDEX_URL / PIP_EXTRA_INDEX_URL (pip reads them from the environment; empty is unset);
#   - build secret `pip.conf`: a whole pip configuration (an index with credentials, say), which build args
#     would leave in the image history;
#   - build secret `ca.pem`: CA certificates to trust besides the image's own, for an index behind a
#     TLS-intercepting proxy or with a private CA.
# The RUN lines mount both secrets (`--mount=type=secret,id=pip.conf --mount=type=secret,id=ca.pem`); a
# secret the build does not pass is simply absent.
set -eu
if [ -f /run/secrets/pip.conf ]; then
    export PIP_CONFIG_FILE=/run/secrets/pip.conf
fi
if [ -s /run/secrets/ca.pem ]; then
    # pip's `cert` replaces its CA list rather than adding to it: hand it the image's list plus the extra one.
    bundle=$(mktemp)
    trap 'rm -f "$bundle"' EXIT
    cat /etc/ssl/certs/ca-certificates.crt /run/secrets/ca.pem > "$bundle" 2>/dev/null \
        || cat /run/secrets/ca.pem > "$bundle"
    export PIP_CERT="$bundle"
fi
python3 -m pip "$@"
