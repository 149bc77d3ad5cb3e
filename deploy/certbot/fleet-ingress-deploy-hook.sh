#!/bin/sh
# certbot deploy hook: make fleet-ingress serve the certificate certbot has just
# issued or renewed. certbot runs it as root, once per certificate, only after a
# successful issuance or renewal (never on a failed or skipped one), with
# RENEWED_LINEAGE=/etc/letsencrypt/live/<domain> in the environment.
#
# Install: /usr/local/lib/fleet-ingress/fleet-ingress-deploy-hook.sh, mode 0755, and
# give it as --deploy-hook when the certificate is first issued (certbot records it
# as renew_hook in /etc/letsencrypt/renewal/<domain>.conf; see renewal-example.conf).
#
# Why only a reload: the ingress reads certbot's live/ files directly
# (tls.cert = .../live/<domain>/fullchain.pem, tls.key = .../privkey.pem). Renewal
# repoints those symlinks at the new files, and SIGHUP makes the ingress load them:
# new handshakes get the new certificate, established calls are untouched, and a
# certificate that does not load, or that carriers could not use (expired, not valid
# yet, for none of the names of the one in use), is refused with the old one kept
# serving. The
# HAProxy design had to concatenate fullchain and key into one combined PEM first,
# atomically, in a directory HAProxy could read; that copy step (and the stale copy
# it left behind when it failed) is gone.
set -eu

SERVICE=fleet-ingress
lineage=${RENEWED_LINEAGE:-unknown lineage}

log() {
    # To syslog/journal when logger exists, and always to certbot's own log via stderr.
    logger -t fleet-ingress-deploy-hook -- "$*" 2>/dev/null || true
    echo "fleet-ingress-deploy-hook: $*" >&2
}

if ! systemctl is-active --quiet "$SERVICE"; then
    # The first issuance happens before the ingress has ever started: nothing to
    # reload, it reads the new files when it starts.
    log "$lineage: new certificate; $SERVICE is not running, it will load it when started"
    exit 0
fi

# ExecReload runs `fleet-ingress check` as the service user, then `fleet-ingress
# reload`, which waits for the ingress's own verdict: an unreadable key, a broken
# configuration or a certificate carriers could not use (expired, not valid yet, for
# other names) makes this fail, certbot reports the hook's failure, and the ingress
# goes on serving the previous certificate.
if systemctl reload "$SERVICE"; then
    log "$lineage: new certificate; $SERVICE reloaded, new handshakes use it"
else
    status=$?
    log "$lineage: new certificate, but 'systemctl reload $SERVICE' failed ($status);" \
        "the ingress still serves the previous certificate: see journalctl -u $SERVICE"
    exit "$status"
fi
