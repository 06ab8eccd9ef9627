# fieldhand-controller (rpm %post): service user, enable the unit; try-restart on upgrade.
getent group fieldhand-controller >/dev/null || groupadd --system fieldhand-controller
getent passwd fieldhand-controller >/dev/null || useradd --system -g fieldhand-controller \
    -d /var/lib/fieldhand-controller -s /sbin/nologin fieldhand-controller
mkdir -p /etc/fieldhand-controller/pki
chown fieldhand-controller:fieldhand-controller /etc/fieldhand-controller/pki
chmod 0700 /etc/fieldhand-controller/pki
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ]; then systemctl enable fieldhand-controller.service >/dev/null 2>&1 || :; fi
    if [ "$1" -gt 1 ]; then systemctl try-restart fieldhand-controller.service >/dev/null 2>&1 || :; fi
fi
