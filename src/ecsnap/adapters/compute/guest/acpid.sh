#!/bin/sh
# the ACPI power button (QMP system_powerdown) runs /etc/acpi/PWRF/00000080: poweroff
/sbin/acpid -f -c /etc/acpi -l /run/acpid.log -p /run/acpid.pid
sleep 5  # init respawns this script; do not spin if acpid cannot run
