# syntax=docker/dockerfile:1
# ssmstream, CPU: serves the shipped byte-level model (examples/checkpoints/byte-lm) over gRPC.
#
#   docker build -t ssmstream .
#   docker run --rm -p 50051:50051 -v ssm-state:/var/lib/ssmstream ssmstream
#   ssmstream generate --server 127.0.0.1:50051 "def fibonacci(n):"
#
# Extra `serve` flags go after the image name (they are appended to the ENTRYPOINT), e.g.
#   docker run ... ssmstream --max-batch 128 --auth-tokens /run/secrets/tokens
# `docker stop` sends SIGTERM: the server drains, saves its sessions to /var/lib/ssmstream
# and restores them on the next start (give it --grace seconds: docker stop -t 15).
#
# Stage 1 installs torch (CPU wheel) and exports the checkpoint to ONNX (step + prefill
# graphs, parity-checked by the exporter); stage 2 serves the export with onnxruntime only:
# the runtime never imports torch, so the served image carries none.

FROM python:3.11-slim AS export
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# torch first, from the PyTorch CPU index, so nothing later pulls a CUDA build
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY model/ model/
COPY export/ export/
COPY runtime/ runtime/
COPY protos/ protos/
RUN pip install ".[train,export,serve]"
COPY examples/checkpoints/byte-lm/ examples/checkpoints/byte-lm/
RUN ssmstream export examples/checkpoints/byte-lm --out /model --name byte-lm

FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model/ model/
COPY export/ export/
COPY runtime/ runtime/
COPY protos/ protos/
RUN pip install ".[serve,redis]" \
    && rm -rf /src \
    && useradd --create-home --uid 10001 ssm \
    && mkdir -p /var/lib/ssmstream \
    && chown ssm:ssm /var/lib/ssmstream
COPY --from=export /model /srv/model
WORKDIR /home/ssm
USER ssm
EXPOSE 50051
VOLUME ["/var/lib/ssmstream"]
# grpc.health.v1 Check (no token needed); serving with --tls-cert, add --tls-ca (or --tls)
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s CMD ["ssmstream", "health", "--server", "127.0.0.1:50051"]
ENTRYPOINT ["ssmstream", "serve", "/srv/model", "--host", "0.0.0.0", "--port", "50051", "--state-dir", "/var/lib/ssmstream"]
