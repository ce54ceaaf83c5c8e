# PIEscope worker + dashboard. CPU by default; for a GPU box build with
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    PIESCOPE_MODELS_CACHE=/data/models_cache PIESCOPE_DATA_DIR=/data
WORKDIR /app
RUN pip install "torch==2.13.0" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY backend ./backend
COPY frontend_dash ./frontend_dash
COPY migrations ./migrations
RUN pip install ".[demo]"
VOLUME /data
# Inside a container the servers must listen beyond loopback; publish the ports deliberately.
ENV PIESCOPE_API_HOST=0.0.0.0 PIESCOPE_DASH_HOST=0.0.0.0
EXPOSE 8000 8050
CMD ["piescope", "--help"]
