# fieldhand (rpm %post): status group, enable the unit; try-restart on upgrade ($1 > 1).
getent group fieldhand >/dev/null || groupadd --system fieldhand
mkdir -p /etc/fieldhand/tls && chmod 0750 /etc/fieldhand/tls
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ]; then systemctl enable fieldhand.service >/dev/null 2>&1 || :; fi
    if [ "$1" -gt 1 ]; then systemctl try-restart fieldhand.service >/dev/null 2>&1 || :; fi
fi
