#!/usr/bin/env bash
# Packs what the benchmarks need on a Linux x86-64 machine that has Python 3.12 but no
# network (no PyPI), into .offline/ (about 50 MB): cp312 wheels of the project's runtime
# dependencies, nvidia-pytriton's Triton (only the 3.12 python-backend stub), numpy 1.26.4
# for that stub (the backend refuses numpy 2), and this machine's redis-server with the
# libraries Debian links it to. Run it from the repository root where pip reaches PyPI;
# copy the repository with .offline/ over, then `source loadtests/offline/env.sh` there.
#
# It assumes the offline Python already has the scientific stack (numpy, scipy,
# scikit-learn, onnx, onnxruntime, pyarrow, uvloop, psutil, prometheus-client, pyyaml,
# requests, click, pygments, markdown-it-py): pass more names in EXTRA to carry others.
set -euo pipefail
out=.offline
rm -rf "$out" && mkdir -p "$out/wheels" "$out/redis"
platforms=()
for p in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_28_x86_64 \
  manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  platforms+=(--platform "$p")
done
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$1" "${@:2}"
}
pin() { .venv/bin/pip freeze | grep -i "^$1==" ; }
for name in grpcio grpcio-health-checking grpcio-reflection grpcio-status protobuf \
  googleapis-common-protos pydantic pydantic-settings pydantic_core annotated-types \
  typing-inspection typing_extensions python-dotenv structlog opentelemetry-api \
  opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-common \
  opentelemetry-exporter-otlp-common opentelemetry-proto opentelemetry-semantic-conventions \
  importlib_metadata lazy-importer redis hiredis py-consul typer rich skl2onnx tritonclient \
  python-rapidjson aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl \
  idna geventhttpclient gevent greenlet zope.event zope.interface brotli certifi urllib3 \
  ${EXTRA:-}; do
  download "$out/wheels" "$(pin "$name")"
done

work=$(mktemp -d)
download "$work" "$(pin nvidia-pytriton)"
(cd "$work" && unzip -q nvidia_pytriton-*.whl && rm nvidia_pytriton-*.whl \
  && rm -f nvidia_pytriton.libs/libpython3-*.so* \
  && find pytriton/tritonserver/python_backend_stubs -mindepth 1 -maxdepth 1 ! -name 3.12 -exec rm -rf {} + \
  && tar cf - pytriton nvidia_pytriton.libs nvidia_pytriton-*.dist-info) | xz -T0 -9 > "$out/pytriton.tar.xz"
rm -rf "$work" && work=$(mktemp -d)
download "$work" "$(pin numpy)"
(cd "$work" && unzip -q numpy-*.whl && rm numpy-*.whl && tar cf - .) | xz -T0 -6 > "$out/numpy.tar.xz"
rm -rf "$work"

cp "$(command -v redis-server)" "$out/redis/"
for lib in $(ldd "$(command -v redis-server)" | awk '/jemalloc|lzf|atomic/ {print $3}'); do
  cp -L "$lib" "$out/redis/"
done
du -sh "$out"
