# The gateway and the coordinator: no model runtime (no torch), a few hundred MB.
#   docker build -f deploy/docker/control-plane.Dockerfile -t cyllm-control-plane .
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY cyllm ./cyllm
RUN pip install --no-cache-dir -c constraints.txt . \
 && useradd --uid 10001 --user-group --home-dir /var/lib/cyllm --create-home cyllm \
 && install -d -o 10001 -g 10001 /var/lib/cyllm/shared
USER 10001
ENV HOME=/var/lib/cyllm PYTHONUNBUFFERED=1
EXPOSE 8080 50050 9150
# The gateway by default; a coordinator is the same image with its own command (its
# health is gRPC's: `cyllm probe 127.0.0.1:50050`, as compose and Kubernetes check it).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/api/v1/health/live', timeout=2)"]
CMD ["cyllm", "gateway", "--host", "0.0.0.0", "--port", "8080"]
