# syntax=docker/dockerfile:1
# protodino image: the coordinator and the worker CLI, built against libtorch 2.11.0 with CUDA.
#
# libtorch comes from the PyPI torch==2.11.0 wheel (its CUDA 13 libraries come as the wheel's own
# dependencies), installed into /opt/torch in both stages so that the rpath that the build embeds
# (LIBTORCH_USE_PYTORCH=1) is valid in the runtime image too.

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04

FROM ${CUDA_DEVEL_IMAGE} AS torch
ENV DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Distribution packages follow the pinned CUDA base image; their versions are not pinned again.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/torch \
 && /opt/torch/bin/pip install --no-cache-dir torch==2.11.0 \
 && nccl_lib="$(/opt/torch/bin/python -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))')" \
 && mkdir -p /opt/torch/nccl \
 && ln -sf "${nccl_lib}/libnccl.so.2" /opt/torch/nccl/libnccl.so.2 \
 && ln -sf "${nccl_lib}/libnccl.so.2" /opt/torch/nccl/libnccl.so

FROM torch AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential curl pkg-config \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/opt/rustup CARGO_HOME=/opt/cargo PATH=/opt/cargo/bin:/opt/torch/bin:${PATH}
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
WORKDIR /src
COPY . .
ENV LIBTORCH_USE_PYTORCH=1 PYTHON=/opt/torch/bin/python
RUN cargo build --release --locked -p protodino-coordinator -p protodino-worker \
 && mkdir -p /out \
 && cp target/release/protodino target/release/protodino-coordinator /out/

FROM ${CUDA_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/protodino --create-home protodino
COPY --from=torch /opt/torch /opt/torch
COPY --from=build /out/ /usr/local/bin/
COPY configs/ /etc/protodino/configs/
# cudarc loads NCCL by the name libnccl.so, which the wheel does not ship (only libnccl.so.2).
ENV PROTODINO_CONFIGS_DIR=/etc/protodino/configs \
    LD_LIBRARY_PATH=/opt/torch/nccl \
    NCCL_DEBUG=WARN
USER 10001
WORKDIR /var/lib/protodino
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/protodino-coordinator"]
