# Source from the repository root on the offline machine (see bundle.sh): sets up, once per
# boot, a Python environment in /tmp from .offline/, and exports PATH and PYTHONPATH so that
# `python3 loadtests/bench_*.py` runs there.
#
# Triton's python-backend stub runs its interpreter isolated (it ignores PYTHONPATH) on the
# site-packages of the first `python3` on PATH, so a venv of our own (/tmp/sv) comes first:
# it holds numpy 1.26.4 for the stub, then the machine's own packages (a .pth). The
# benchmark's processes run that venv's python with PYTHONPATH putting the machine's packages
# (its numpy 2, which its scipy needs) and .offline's wheels first. The stub also needs
# libpython3.12.so.1.0 where the loader finds it (Ubuntu's python3.12 has it in /usr/lib; for
# a pyenv build, put its lib/ on LD_LIBRARY_PATH).
_root=$(pwd)
_base=$(python3 -c 'import site; print(site.getsitepackages()[0])')
if [ ! -f /tmp/sv/.ready ]; then
  mkdir -p /tmp/offline-site /tmp/offline-numpy /tmp/offline-redis
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/offline-site .offline/wheels/*.whl \
    && tar xJf .offline/pytriton.tar.xz -C /tmp/offline-site \
    && tar xJf .offline/numpy.tar.xz -C /tmp/offline-numpy \
    && "$(python3 -c 'import sys; print(sys.base_prefix)')/bin/python3" -m venv --without-pip /tmp/sv \
    || return 1
  _sv=$(/tmp/sv/bin/python3 -c 'import site; print(site.getsitepackages()[0])')
  cp -r /tmp/offline-numpy/. "$_sv"/
  echo "import site; site.addsitedir('$_base')" > "$_sv/zz_machine.pth"
  cp .offline/redis/* /tmp/offline-redis/ && mv /tmp/offline-redis/redis-server /tmp/offline-redis/redis-server.bin
  printf '#!/bin/sh\nLD_LIBRARY_PATH=/tmp/offline-redis exec /tmp/offline-redis/redis-server.bin "$@"\n' \
    > /tmp/offline-redis/redis-server
  chmod +x /tmp/offline-redis/redis-server
  touch /tmp/sv/.ready
fi
_src=""
for _d in "$_root"/libs/*/src "$_root"/services/*/src; do _src="$_src:$_d"; done
export PYTHONPATH="/tmp/offline-site$_src:$_base"
export PATH="/tmp/sv/bin:/tmp/offline-redis:$PATH"
export PYTHONUNBUFFERED=1
unset _root _base _src _d _sv
