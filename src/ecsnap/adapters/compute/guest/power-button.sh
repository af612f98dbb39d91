#!/bin/sh
exec /sbin/poweroff
