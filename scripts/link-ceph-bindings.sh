#!/usr/bin/env bash
# Link Debian's Ceph bindings (python3-rados, python3-rbd; not on PyPI) into a venv made from
# the same interpreter, and nothing else of Debian's site-packages. Usage: $0 VENV_PYTHON
set -euo pipefail
python="$1"
site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
tag=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
for module in rados rbd; do
  found=/usr/lib/python3/dist-packages/$module$tag
  if [ -e "$found" ]; then
    ln -sf "$found" "$site/$module$tag"
  else
    echo "warning: $found is missing (apt-get install python3-$module): RBD tests will fail" >&2
  fi
done
"$python" -c 'import rados, rbd' 2>/dev/null || echo "warning: the venv cannot import rados/rbd" >&2
