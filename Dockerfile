# PIEscope worker (and dashboard). CPU by default; for a GPU box build with
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
# Run the worker (it refuses to start without a token, since it listens beyond loopback):
#   docker run -p 8000:8000 -v piescope:/data -e PIESCOPE_API_TOKEN=... \
#              -e PIESCOPE_ALLOWED_HOSTS=localhost,gpu-box piescope
# The dashboard from the same image: ... piescope piescope dash (with PIESCOPE_API_URL set).
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    PIESCOPE_MODELS_CACHE=/data/models_cache PIESCOPE_DATA_DIR=/data
WORKDIR /app
RUN pip install "torch==2.13.0" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY backend ./backend
COPY frontend_dash ./frontend_dash
# A regular (non-editable) install: the migrations ship inside the package.
RUN pip install ".[demo,postgres]"
VOLUME /data
# Inside a container the servers must listen beyond loopback; publish the ports deliberately.
# Requests must name a Host in PIESCOPE_ALLOWED_HOSTS (loopback names unless you set it).
ENV PIESCOPE_API_HOST=0.0.0.0 PIESCOPE_DASH_HOST=0.0.0.0
EXPOSE 8000 8050
CMD ["piescope", "serve"]
